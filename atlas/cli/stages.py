"""Imports every command module so their commands register on the app."""

from atlas.cli import (
    sample_cmd,  # noqa: F401
    tiles_cmd,  # noqa: F401
)
