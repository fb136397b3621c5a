"""The one exception type users see: the CLI prints its message as a single line."""


class AtlasError(Exception):
    """A problem with the user's input or environment, explained in one line."""
