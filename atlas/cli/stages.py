"""Imports every command module so their commands register on the app."""

from atlas.cli import (
    build_cmd,  # noqa: F401
    concepts_cmd,  # noqa: F401
    fetch_cmd,  # noqa: F401
    info_cmd,  # noqa: F401
    inspect_cmd,  # noqa: F401
    layers_cmd,  # noqa: F401
    layout_cmd,  # noqa: F401
    multilayer_cmd,  # noqa: F401
    patch_cmd,  # noqa: F401
    reconstruct_cmd,  # noqa: F401
    render_cmd,  # noqa: F401
    sample_cmd,  # noqa: F401
    tiles_cmd,  # noqa: F401
    units_cmd,  # noqa: F401
    weights_cmd,  # noqa: F401
)
