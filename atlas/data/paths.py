"""Names every reader shares: image suffixes, the synset pattern, and paths that are not UTF-8 (kept in the store as
``fs-bytes:`` and their percent-encoded bytes, opened again as those bytes).
"""

from __future__ import annotations

import os
import re
import urllib.parse

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


SYNSET = re.compile(r"^(n\d{8})")


SYNSET_ONLY = re.compile(r"n\d{8}")


INTEGER = re.compile(r"-?\d+")


FS_PREFIX = "fs-bytes:"


def storable_path(path: str | os.PathLike) -> str:
    """``path`` as a UTF-8-safe string: itself when it is valid UTF-8, else ``fs-bytes:`` + its percent-encoded bytes."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:  # surrogate-escaped bytes of a non-UTF-8 name
        return FS_PREFIX + urllib.parse.quote_from_bytes(os.fsencode(text), safe="/ ,+=@()[]~-_.")


def real_path(stored: str | os.PathLike) -> str:
    """The file system path of a ``storable_path`` string (stored paths are absolute, so the prefix cannot clash)."""
    text = os.fspath(stored)
    if text.startswith(FS_PREFIX):
        return os.fsdecode(urllib.parse.unquote_to_bytes(text[len(FS_PREFIX):]))
    return text


def printable(text: str) -> str:
    """``text`` with undecodable bytes shown as ``\\xff``, safe to print or log."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
