"""Image lists and image loading.

Where the images come from (``list_images``), always in a deterministic order:

* **A folder.** Every image directly in the folder *and* every image in its sub-folders (at
  any depth) is taken; nothing is dropped because a sub-folder exists. The order is: the
  images directly in the folder sorted by name, then each first-level sub-folder in sorted
  order, its files depth-first in sorted order. Labels: an image in a sub-folder takes the
  class of its *first-level* sub-folder when that name is a known synset (``train/n01440764/``;
  without a class list, when every first-level sub-folder with images is named like a
  synset, their sorted order gives the indices, as ImageNet's train tree does); otherwise,
  and for images directly in the folder, the class of the synset the file name starts with
  (``n01440764_tench.JPEG``), else -1. Hidden files and folders (``.name``) are ignored.
  Symlinks are followed, but every file and folder is taken once: a folder reached a second
  time (a symlinked copy of the tree, a symlink loop) is skipped, and a file whose real path
  was already listed is dropped, keeping the first in the order above. Entries with an image
  suffix that are not regular files (FIFOs, devices, sockets, broken links) are skipped and
  counted, never opened.
* **A list file**, one image per line: ``path``, ``path label``, ``path,label``, Caffe's
  ``path, label``, ``path<TAB>label``, or a CSV/TSV file with a header naming the columns
  (``path,label``; ImageNet's ``LOC_val_solution.csv`` with ``ImageId,PredictionString``,
  where the first token of the prediction is the synset). Paths are relative to the list
  file's folder. A path without suffix that names no file (``ILSVRC2012_val_00000001``) is
  looked up beside it with each image suffix. In a whitespace-separated line the label is
  the last field(s) only when they parse as a label, so ``my photo.jpg 3`` and ``my photo.jpg``
  both work. Entries are taken as listed (a file listed twice is sampled twice); a listed
  FIFO or device is not opened, it is reported unreadable when loaded (skipped, counted).
* **Labels** anywhere are a class index (0-based, the model's logit order; -1 = unknown),
  a synset (``n01440764``) or a class name: any synonym of synset_words.txt, case-insensitive,
  underscores standing for spaces (``great_white_shark``, ``Great white shark``). A label that
  is none of these is an error naming the line and the closest class names, never -1.
* **A labels file** (``labels=``, ``--labels FILE``) labels a folder's (or a list's) images:
  ``name label`` pairs (name = path relative to the folder, file name, or file name without
  suffix), ImageNet's ``LOC_val_solution.csv``, or one label per line in the order above (for
  a flat folder of ``ILSVRC2012_val_*.JPEG``: sorted file order). ImageNet's
  ``ILSVRC2012_validation_ground_truth.txt`` holds 1-based ILSVRC2012 ids, whose order is
  *not* the synset order; they are mapped through the devkit's ``meta.mat`` (``ILSVRC2012_ID``
  -> ``WNID``), which must lie beside the file; without it the file is refused (give
  synsets, 0-based indices or names per line instead).

File names need not be UTF-8: a path that is not is kept as ``fs-bytes:`` followed by its
percent-encoded bytes (the store holds UTF-8 strings), and ``load_image`` opens it again.

Images are converted to RGB, shrunk while decoding where JPEG allows (PIL draft mode),
resized so the shorter side is ``resize`` and centre-cropped to ``crop``. 16-bit and 32-bit
integer images (PIL modes I;16, I) and float images (mode F) are scaled to 0-255 by the
image's own range (values already within 0-255, or floats within 0-1, are kept as they are),
not clipped. Images of more than ``MAX_PIXELS`` pixels after JPEG draft reduction are refused
before decoding; an image of an extreme aspect ratio (resized long side over ``MAX_ASPECT`` times the
short side) is resampled only in the part that is kept, so no file costs more memory than its decoded
size plus the output. Every reader decodes through :func:`decode_image`. Files that cannot be read,
whatever the decoder raised, are reported to the caller as an OSError (or ``ImageTooLarge``), who
skips and counts them.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import os
import re
import signal
import stat
import urllib.parse
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from atlas.errors import AtlasError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
SYNSET = re.compile(r"^(n\d{8})")
SYNSET_ONLY = re.compile(r"n\d{8}")
INTEGER = re.compile(r"-?\d+")
FS_PREFIX = "fs-bytes:"
# Largest image decoded (pixels, after JPEG draft reduction): ~150 MB as RGB, more than a 50-megapixel
# camera frame; larger files (decompression bombs, giant scans) are refused before any pixel is decoded.
MAX_PIXELS = 50_000_000
# Longest side of a resized image, as a multiple of its shorter side: an image of a more extreme aspect ratio (a
# 1 x 4,000,000 strip) is resampled only in the part that is kept, so its intermediate never grows with its length.
MAX_ASPECT = 8
# Column names recognised in the header of a CSV/TSV list.
PATH_COLUMNS = {"path", "file", "filename", "file_name", "filepath", "file_path", "image", "image_path", "imageid", "image_id",
                "img", "fname", "name"}
LABEL_COLUMNS = {"label", "labels", "class", "class_id", "class_index", "class_name", "classname", "category", "target", "synset",
                 "wnid", "predictionstring", "y"}
ImageFile.LOAD_TRUNCATED_IMAGES = False  # truncated files must fail, so they are counted


class ImageTooLarge(ValueError):
    """An image with more pixels than ``MAX_PIXELS`` (after JPEG draft reduction)."""


class UnreadableImage(OSError):
    """A file the decoder failed on in a way that is not an OSError (a MemoryError, a PIL DecompressionBombError, a
    struct.error of a damaged header...): an OSError, so that every reader skips and counts it like any other."""


@dataclass
class ImageList:
    """Paths in a fixed order, their labels (-1 when unknown) and a hash identifying the list.

    ``paths`` are storable strings (UTF-8; see ``storable_path``); ``summary`` says in one line
    what was found where.
    """

    paths: list[str]
    labels: np.ndarray
    summary: str = ""
    # Indices not to read (reported unreadable without opening): files a resumed run keeps in its list although the
    # list given now no longer names them (:func:`compare_lists`).
    skip: frozenset[int] = frozenset()
    # The longer list this one is the first images of (:meth:`head`): a resumed run compares the image list it was
    # started with against it, since a file gone from the first N brings file N+1 in.
    source: ImageList | None = field(default=None, repr=False, compare=False)

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for path, label in zip(self.paths, self.labels.tolist(), strict=True):
            h.update(f"{path}\t{label}\n".encode())
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.paths)

    def head(self, n: int | None) -> ImageList:
        """The first ``n`` images (None: all); ``source`` says a limit was given, even when the list is shorter."""
        if n is None:
            return self
        if n >= len(self.paths):
            return ImageList(self.paths, self.labels, self.summary, self.skip, source=self.source or self)
        return ImageList(self.paths[:n], self.labels[:n], f"using the first {n:,} of {self.summary}", source=self.source or self)


def compare_lists(stored: ImageList, new: ImageList, window: bool = False) -> tuple[list[int] | None, str]:
    """How ``new`` differs from ``stored``, the list a run was started with (entries are (path, label) pairs).

    Returns ``(removed, description)``. ``removed`` holds the indices of the stored entries ``new`` no longer names
    when that is the only difference: ``new`` is ``stored`` with those entries taken out, in the same order (with
    ``window``, ``new`` may go on past the run's last image, as a longer list cut by ``max_images`` does); else None.
    ``description`` says what differs in a few words: how many files were added, removed or relabelled, the first
    few names of each.
    """
    old = list(zip(stored.paths, stored.labels.tolist(), strict=True))
    now = list(zip(new.paths, new.labels.tolist(), strict=True))
    present = set(now)
    removed: list[int] | None = []
    j = 0
    for i, entry in enumerate(old):
        if j < len(now) and now[j] == entry:
            j += 1
        elif entry not in present:
            removed.append(i)
        else:  # still listed, but elsewhere: reordered, or files were inserted before it
            removed = None
            break
    if removed is not None and not window and j < len(now):
        removed = None  # files added at the end
    old_paths, new_paths = dict(old), dict(now)
    # With a window, only the part of the new list the run's images can stand for is compared.
    seen = new.paths if not window else new.paths[:j] if removed is not None else new.paths[:len(old)]
    parts = []
    for what, names in (("added", [p for p in seen if p not in old_paths]), ("removed", [p for p in stored.paths if p not in new_paths]),
                        ("relabelled", [p for p in stored.paths if p in new_paths and new_paths[p] != old_paths[p]])):
        if names:
            shown = ", ".join(printable(os.path.basename(n)) for n in names[:3])
            parts.append(f"{len(names):,} {what} ({shown}{', ...' if len(names) > 3 else ''})")
    return removed, "; ".join(parts) or "the same files in another order"


# --------------------------------------------------------------------------------------
# Paths that are not UTF-8
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# Classes and labels
# --------------------------------------------------------------------------------------
def _normal(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


class _BadLabel(Exception):
    """A field that is a label but not a valid one; the caller adds where it was."""


class Classes:
    """The model's classes as labels can name them: index, synset or any synonym."""

    def __init__(self, classes: Sequence[str | tuple[str, str | Sequence[str]]] = ()):
        self.synsets: dict[str, int] = {}
        self.shown: list[str] = []  # first name (or synset) of each class, for messages
        # Two tiers: a class's first name wins over another class's synonym ("partridge" is n01807496, not the
        # ruffed grouse that also lists it); a name two classes share in the same tier ("crane") is ambiguous.
        tiers: list[dict[str, list[int]]] = [{}, {}]
        for i, entry in enumerate(classes):
            synset, names = (entry, ()) if isinstance(entry, str) else entry
            if isinstance(names, str):
                names = names.split(",")
            names = [n.strip() for n in names if n.strip()]
            self.synsets.setdefault(synset, i)
            self.shown.append(names[0] if names else synset)
            for tier, name in {(0 if k == 0 else 1, _normal(n)) for k, n in enumerate(names)}:
                if i not in tiers[tier].setdefault(name, []):
                    tiers[tier][name].append(i)
        self.names: dict[str, int] = {}
        self.ambiguous: dict[str, list[int]] = {}
        for tier in reversed(tiers):  # the first-name tier last, so that it overrides
            for name, indices in tier.items():
                self.names.pop(name, None)
                self.ambiguous.pop(name, None)
                if len(indices) == 1:
                    self.names[name] = indices[0]
                else:
                    self.ambiguous[name] = indices
        self.n = len(self.shown)

    def __bool__(self) -> bool:
        return self.n > 0

    def parse(self, text: str) -> int | None:
        """The class index ``text`` names, None when it is not a label at all; raises _BadLabel for an invalid one."""
        text = text.strip()
        if INTEGER.fullmatch(text):
            index = int(text)
            if index < -1 or (self.n and index >= self.n):
                raise _BadLabel(f"class index {index} is out of range (0-{self.n - 1}, or -1 for unknown)" if self.n
                                else f"class index {index} is negative")
            return index
        if SYNSET_ONLY.fullmatch(text):
            if text in self.synsets:
                return self.synsets[text]
            if not self.n:
                raise _BadLabel(f"synset {text} cannot be mapped: no class list (synset_words.txt) was found for the model")
            raise _BadLabel(f"synset {text} is not one of the model's {self.n} classes")
        name = _normal(text)
        if name in self.names:
            return self.names[name]
        if name in self.ambiguous:
            choices = ", ".join(f"{self.shown[i]} = {self._synset(i)}" for i in self.ambiguous[name])
            raise _BadLabel(f"class name '{text}' names several classes ({choices}); give the synset or index")
        return None

    def label(self, text: str, where: str) -> int:
        """The class index ``text`` names, or a one-line AtlasError starting with ``where`` (e.g. "list file F line 3")."""
        try:
            parsed = self.parse(text)
        except _BadLabel as exc:
            raise AtlasError(f"{where}: {exc}") from None
        if parsed is None:
            raise AtlasError(f"{where}: {self.unknown(text)}")
        return parsed

    def unknown(self, text: str) -> str:
        """A one-line explanation of why ``text`` is not a label, with the closest class names."""
        if not self.n:
            return f"unknown label '{text}' (labels are 0-based class indices here: no class list was found for the model)"
        close = difflib.get_close_matches(_normal(text), list(self.names) + list(self.ambiguous), n=3, cutoff=0.6)
        hint = f"closest classes: {', '.join(close)}" if close else f"e.g. 0, {self._synset(0)} or '{self.shown[0]}'"
        return f"unknown label '{text}'; labels are class indices 0-{self.n - 1}, synsets or class names; {hint}"

    def _synset(self, index: int) -> str:
        for synset, i in self.synsets.items():
            if i == index:
                return synset
        return str(index)


def class_table(weights: str | Path | None = None) -> list[tuple[str, list[str]]]:
    """(synset, every synonym) per class of the ImageNet models, from synset_words.txt (empty when none is found).

    ``atlas.models.synset_words`` keeps only each class's first name; labels may use any synonym, so
    the full lines are read again from the same file when it can be found.
    """
    from atlas import models

    pairs = models.synset_words(weights)
    if not pairs:
        return []
    # The places synset_words looks in: beside the weights, then the user cache.
    places = [Path(weights).expanduser().parent] if weights and not str(weights).startswith("torchvision:") else []
    if callable(getattr(models, "cache_dir", None)):
        places.append(models.cache_dir())
    synonyms: dict[str, list[str]] = {}
    for place in places:
        file = place / "synset_words.txt"
        if file.is_file():
            for line in file.read_text(errors="replace").splitlines():
                synset, _, names = line.strip().partition(" ")
                synonyms[synset] = [n.strip() for n in names.split(",") if n.strip()]
            break
    return [(synset, synonyms.get(synset) or [name]) for synset, name in pairs]


# --------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------
def _has_image_suffix(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES and not name.startswith(".")


def _is_image(path: Path) -> bool:
    return _has_image_suffix(path.name)


class _Walk:
    """Depth-first listing in sorted order that visits each real folder and real file once."""

    def __init__(self):
        self.seen_dirs: set[str] = set()
        self.seen_files: set[str] = set()
        self.not_regular = 0
        self.duplicates = 0
        self.repeated_dirs = 0

    def enter(self, folder: str) -> str | None:
        real = os.path.realpath(folder)
        if real in self.seen_dirs:
            self.repeated_dirs += 1
            return None
        self.seen_dirs.add(real)
        return real

    def files(self, folder: str, real_folder: str, recurse: bool) -> list[str]:
        """Image files of ``folder`` (and, with ``recurse``, of every folder below), in Path sort order."""
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return []
        found = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                if recurse and (real := self.enter(entry.path)) is not None:
                    found.extend(self.files(entry.path, real, True))
                continue
            if not _has_image_suffix(entry.name):
                continue
            try:
                regular = entry.is_file()  # follows symlinks; False for FIFOs, devices, sockets, broken links
            except OSError:
                regular = False
            if not regular:
                self.not_regular += 1
                continue
            # The real path of a plain file is its real folder + its name; only a symlink needs resolving.
            real = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real_folder, entry.name)
            if real in self.seen_files:
                self.duplicates += 1
                continue
            self.seen_files.add(real)
            found.append(entry.path)
        return found


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _from_folder(source: Path, classes: Classes, derived_index: bool) -> tuple[list[str], list[int], str]:
    walk = _Walk()
    top = str(source.absolute())
    real_top = walk.enter(top)
    top_files = walk.files(top, real_top, recurse=False)
    subdirs = []
    for entry in sorted(os.scandir(top), key=lambda e: e.name):
        try:
            is_dir = not entry.name.startswith(".") and entry.is_dir()  # follows symlinks
        except OSError:  # a link to itself (ELOOP) or otherwise unreachable: walk.files counted it already
            is_dir = False
        if is_dir:
            real = walk.enter(entry.path)
            if real is not None:
                files = walk.files(entry.path, real, recurse=True)
                if files:
                    subdirs.append((entry.name, files))
    if derived_index and subdirs and all(SYNSET_ONLY.fullmatch(name) for name, _ in subdirs):
        # No class list: an ImageNet-style tree numbers its classes in sorted folder order.
        classes = Classes(sorted(name for name, _ in subdirs))
    paths, labels = [], []
    for file in top_files:
        paths.append(file)
        labels.append(_label_from_name(os.path.basename(file), classes.synsets))
    for name, files in subdirs:
        folder_label = classes.synsets.get(name)
        for file in files:
            paths.append(file)
            labels.append(folder_label if folder_label is not None else _label_from_name(os.path.basename(file), classes.synsets))
    n_sub = sum(len(files) for _, files in subdirs)
    where = []
    if top_files or not subdirs:
        where.append(f"{len(top_files):,} in the top folder")
    if subdirs:
        where.append(f"{n_sub:,} in {_plural(len(subdirs), 'sub-folder')}")
    summary = f"{_plural(len(paths), 'image')} in {printable(source.name or str(source))}: {', '.join(where)}"
    skipped = []
    if walk.duplicates:
        skipped.append(f"{_plural(walk.duplicates, 'file')} seen twice through symlinks")
    if walk.repeated_dirs:
        skipped.append(f"{_plural(walk.repeated_dirs, 'folder')} reached twice (symlinks)")
    if walk.not_regular:
        skipped.append(f"{_plural(walk.not_regular, 'special file')} (FIFO, device or broken link)")
    if skipped:
        summary += f"; skipped {', '.join(skipped)}"
    return paths, labels, summary


def _label_from_name(name: str, index: dict[str, int]) -> int:
    match = SYNSET.match(name)
    return index.get(match.group(1), -1) if match else -1


# --------------------------------------------------------------------------------------
# List files
# --------------------------------------------------------------------------------------
def _read_lines(path: Path) -> list[str]:
    """The file's lines, decoded as UTF-8 with undecodable bytes kept (they may be parts of file names)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AtlasError(f"cannot read {path}: {exc.strerror or exc}") from None
    return data.decode("utf-8", "surrogateescape").lstrip("\ufeff").splitlines()


class _Resolver:
    """Paths of a list, relative to its folder; a name without suffix is looked up with each image suffix."""

    def __init__(self, base: Path):
        self.base = os.path.join(os.fspath(base), "")
        self.listings: dict[str, dict[str, str]] = {}

    def __call__(self, text: str) -> str:
        # Plain string work on the common case: this runs once per line of lists with millions of lines.
        if text.startswith("~"):
            text = os.path.expanduser(text)
        file = text if text.startswith("/") else self.base + text
        if "/." in file or "//" in file:
            file = str(Path(file))  # drops "." parts and doubled slashes, as pathlib did before; ".." is kept
        if not _has_suffix(file) and not os.path.lexists(file):
            folder, stem = os.path.split(file)
            listing = self.listings.get(folder)
            if listing is None:
                listing = self.listings[folder] = {}
                try:
                    for name in sorted(os.listdir(folder)):
                        s, suffix = os.path.splitext(name)
                        if suffix.lower() in IMAGE_SUFFIXES:
                            listing.setdefault(s, name)
                except OSError:
                    pass
            if stem in listing:
                file = os.path.join(folder, listing[stem])
        return file


def _has_suffix(path: str) -> bool:
    dot = path.rfind(".")
    return dot > path.rfind("/") and path[dot:].lower() in IMAGE_SUFFIXES


def _header(fields: list[str]) -> tuple[int, int | None] | None:
    """(path column, label column) when ``fields`` is a header row naming them."""
    names = [f.strip().lower() for f in fields]
    path_col = next((i for i, n in enumerate(names) if n in PATH_COLUMNS), None)
    if path_col is None:
        return None
    label_col = next((i for i, n in enumerate(names) if n in LABEL_COLUMNS and i != path_col), None)
    if label_col is None and len(names) > 1:
        return None
    return path_col, label_col


def _label_field(column: str, text: str) -> str:
    # ImageNet's LOC_val_solution.csv: "n01751748 x0 y0 x1 y1 n01751748 ..." - the first token is the synset.
    return text.split()[0] if column == "predictionstring" and text.split() else text


def _parse_list(path: Path, classes: Classes, resolver: _Resolver, what: str = "list file") -> list[tuple[str | None, int]]:
    """(path or None, label) per entry of a list (or labels) file; None for a line that is only a label."""
    lines = [(n, ln.strip()) for n, ln in enumerate(_read_lines(path), 1)]
    lines = [(n, ln) for n, ln in lines if ln and not ln.startswith("#")]
    if not lines:
        return []
    first = lines[0][1]
    delimiter = "\t" if "\t" in first else ","
    header = _header(next(csv.reader([first], delimiter=delimiter))) if ("," in first or "\t" in first or
                                                                         first.lower() in PATH_COLUMNS) else None
    if header is not None and not os.path.lexists(resolver(first)):
        return _parse_csv(path, lines, delimiter, header, classes, resolver)
    entries = []
    for number, line in lines:
        try:
            entries.append(_parse_line(line, classes, resolver))
        except _BadLabel as exc:
            raise AtlasError(f"{what} {printable(str(path))} line {number}: {exc}") from None
    return entries


def _parse_csv(path: Path, lines: list[tuple[int, str]], delimiter: str, header: tuple[int, int | None], classes: Classes,
               resolver: _Resolver) -> list[tuple[str | None, int]]:
    path_col, label_col = header
    column = next(csv.reader([lines[0][1]], delimiter=delimiter))[label_col].strip().lower() if label_col is not None else ""
    entries = []
    for (number, _), row in zip(lines[1:], csv.reader([ln for _, ln in lines[1:]], delimiter=delimiter), strict=True):
        if len(row) <= max(path_col, label_col or 0):
            raise AtlasError(f"list file {printable(str(path))} line {number}: {len(row)} columns, the header names "
                             f"{max(path_col, label_col or 0) + 1}")
        label = -1
        if label_col is not None and row[label_col].strip():
            label = classes.label(_label_field(column, row[label_col]), f"list file {printable(str(path))} line {number}")
        entries.append((resolver(row[path_col].strip()), label))
    return entries


def _parse_line(line: str, classes: Classes, resolver: _Resolver) -> tuple[str | None, int]:
    """One line of a list without header: ``path``, ``label`` alone, or ``path`` + separator + ``label``."""
    if "\t" in line or "," in line:
        head, _, tail = line.rpartition("\t" if "\t" in line else ",")
        head, tail = head.strip(), tail.strip()
        if not tail:
            return resolver(head), -1
        label = classes.parse(tail)
        if label is not None:
            return (resolver(head) if head else None), label
        if os.path.lexists(resolver(line)):  # a path that contains a comma
            return resolver(line), -1
        found = _split_words(line, classes, resolver)  # "a,b.jpg 3": the comma was part of the path
        if found is not None and found[1] != -1:
            return found
        raise _BadLabel(classes.unknown(tail))
    words = line.split()
    if len(words) == 2 and _has_suffix(words[0]):  # the common "x.jpg 3": no need to look further
        label = classes.parse(words[1])
        if label is not None:
            return resolver(words[0]), label
    if len(words) == 1:
        label = classes.parse(line) if INTEGER.fullmatch(line) or SYNSET_ONLY.fullmatch(line) else None
        return (None, label) if label is not None else (resolver(line), -1)
    found = _split_words(line, classes, resolver)
    if found is not None:
        return found
    if os.path.lexists(resolver(line)):
        return resolver(line), -1
    head = line[: list(re.finditer(r"\S+", line))[-1].start()].rstrip()
    if os.path.lexists(resolver(head)):
        raise _BadLabel(classes.unknown(words[-1]))
    return resolver(line), -1  # neither exists: kept as one path, reported unreadable when loaded


def _split_words(line: str, classes: Classes, resolver: _Resolver) -> tuple[str, int] | None:
    """``path label`` split at whitespace: the label is the last word(s) only if they parse as one (names may have spaces)."""
    spans = list(re.finditer(r"\S+", line))
    for k in range(min(len(spans) - 1, 5), 0, -1):
        tail = line[spans[-k].start():]
        label = classes.parse(tail) if k == 1 else _quiet_parse(classes, tail)
        if label is None:
            continue
        head = line[: spans[-k].start()].rstrip()
        # Only an unusual head (spaces inside, no image suffix) is worth a look at the disk: the common "x.jpg 3" is not.
        unusual = len(spans) - k > 1 or not _has_suffix(head)
        if unusual and os.path.lexists(resolver(line)) and not os.path.lexists(resolver(head)):
            return resolver(line), -1  # "dir/run 3" is a file named "run 3", not "dir/run" labelled 3
        return resolver(head), label
    return None


def _quiet_parse(classes: Classes, text: str) -> int | None:
    """A multi-word tail parses only as a class name; numbers or synsets inside it are not labels."""
    if any(INTEGER.fullmatch(w) or SYNSET_ONLY.fullmatch(w) for w in text.split()):
        return None
    try:
        return classes.parse(text)
    except _BadLabel:
        return None


def _folder_of(path: Path) -> Path:
    """The absolute folder of a list file; '..' parts are resolved as the OS would (through symlinks), not textually."""
    folder = path.absolute().parent
    return folder.resolve() if ".." in folder.parts else folder


def _from_list_file(path: Path, classes: Classes) -> tuple[list[str], list[int], str]:
    entries = _parse_list(path, classes, _Resolver(_folder_of(path)))
    paths = [p for p, _ in entries if p is not None]
    if len(paths) != len(entries):
        number = next(i for i, (p, _) in enumerate(entries, 1) if p is None)
        raise AtlasError(f"list file {printable(str(path))}: entry {number} is a label without a path; "
                         "a file of labels only is given with --labels next to an image folder")
    labels = [label for _, label in entries]
    labelled = sum(1 for label in labels if label >= 0)
    return paths, labels, f"{_plural(len(paths), 'image')} listed in {printable(path.name)} ({labelled:,} labelled)"


# The first bytes of the image formats PIL reads here: a list file given as --images that starts with one is an image.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF", b"P6", b"P5")
_SYNSET_WORDS = re.compile(r"^n\d{8}\s+\S")


def check_image_source(source: str | Path, probe: int = 50) -> None:
    """Refuse, in one line and before any model is loaded or folder created, an ``--images`` file that is no image list.

    An image, a binary file, a class-name list (``synset_words.txt``) or prose (a README) would otherwise be parsed
    line by line into misleading errors about labels or paths. A text file is taken as a list when any of its first
    ``probe`` entries names an image (an image suffix, or a path that exists) or it has a CSV header naming a path
    column; otherwise it is refused when its lines look like synset words or sentences. Folders pass unchecked.

    Parameters
    ----------
    source : str or Path
        The ``--images`` argument.
    probe : int, default 50
        Entries of a text file looked at.

    Raises
    ------
    AtlasError
        One line saying what the file looks like instead, and what ``--images`` takes.
    """
    path = Path(source).expanduser()
    if not path.is_file():
        return
    takes = "--images takes an image folder or a list file of image paths (docs/images.md)"
    name = printable(str(path))
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError as exc:
        raise AtlasError(f"cannot read {name}: {exc.strerror or exc}") from None
    if _has_suffix(str(path)) or head.startswith(_IMAGE_MAGIC):
        raise AtlasError(f"{name} is an image, not an image list; {takes}")
    if b"\x00" in head:
        raise AtlasError(f"{name} is a binary file, not an image list; {takes}")
    lines = [ln.strip() for ln in head.decode("utf-8", "replace").lstrip("\ufeff").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")][:probe]
    if not lines:
        return  # an empty list: list_images says so
    first = lines[0]
    if ("," in first or "\t" in first) and _header(next(csv.reader([first], delimiter="\t" if "\t" in first else ","))):
        return
    resolver = _Resolver(_folder_of(path))
    for line in lines:
        # an entry is a path (an image suffix, or a file that exists), then at most a label of a few words
        cuts = [m.start() for m in re.finditer(r"[\s,]+", line)][:8] + [len(line)]
        for cut in cuts:
            head, tail = line[:cut].strip(), line[cut:]
            if len(tail.split()) <= 5 and (_has_suffix(head) or os.path.lexists(resolver(head))):
                return
    if sum(bool(_SYNSET_WORDS.match(ln)) for ln in lines) * 2 > len(lines):
        raise AtlasError(f"{name} is a list of class names (synset words), not an image list; {takes}")
    if sorted(len(ln.split()) for ln in lines)[len(lines) // 2] >= 4:
        raise AtlasError(f"{name} looks like text, not an image list: none of its first {len(lines)} lines names an image; {takes}")


# --------------------------------------------------------------------------------------
# Label files
# --------------------------------------------------------------------------------------
def _ilsvrc_ids(labels_file: Path) -> dict[int, str] | None:
    """ILSVRC2012_ID -> WNID from the devkit's meta.mat beside ``labels_file``, None when it is absent."""
    meta = labels_file.parent / "meta.mat"
    if not meta.is_file():
        return None
    try:
        from scipy.io import loadmat

        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        return {int(i): str(w) for i, w in zip(synsets["ILSVRC2012_ID"].ravel(), synsets["WNID"].ravel(), strict=True)}
    except Exception as exc:  # noqa: BLE001 - any unreadable meta.mat means the same to the user
        raise AtlasError(f"cannot read the ImageNet devkit's {meta}: {type(exc).__name__}: {exc}") from None


def _apply_labels(paths: list[str], labels: list[int], base: Path, labels_file: Path, classes: Classes) -> tuple[list[int], str]:
    """Labels from ``labels_file`` for ``paths`` (per line in order, or by name); returns them and a summary fragment."""
    if not labels_file.is_file():
        raise AtlasError(f"labels file not found: {labels_file}")
    name = printable(labels_file.name)
    values = [ln.strip() for ln in _read_lines(labels_file) if ln.strip()]
    if "ground_truth" in labels_file.name.lower() and values and INTEGER.fullmatch(values[0]):
        ids = _ilsvrc_ids(labels_file)
        if ids is None:
            raise AtlasError(f"{name} holds 1-based ILSVRC2012 ids, which map to classes only through the devkit's meta.mat "
                             f"(not found beside it in {labels_file.parent}); put meta.mat there, or give a labels file "
                             "with one synset, 0-based class index or class name per line")
        mapped = []
        for number, value in enumerate(values, 1):
            if not INTEGER.fullmatch(value) or int(value) not in ids:
                raise AtlasError(f"{name} line {number}: '{value}' is not an ILSVRC2012 id of meta.mat")
            try:
                label = classes.parse(ids[int(value)])
            except _BadLabel as exc:
                raise AtlasError(f"{name} line {number}: {exc}") from None
            mapped.append(label)
        return _in_order(paths, mapped, name), f"labels from {name} (ILSVRC2012 ids via meta.mat)"
    lines = [(n, ln.strip()) for n, ln in enumerate(_read_lines(labels_file), 1)]
    lines = [(n, ln) for n, ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise AtlasError(f"labels file {name} is empty")
    if any(_is_label(classes, line) for _, line in lines[:10]):  # one label per line, in image order
        values = []
        for number, line in lines:
            values.append(classes.label(line, f"labels file {name} line {number}"))
        return _in_order(paths, values, name), f"labels from {name}, one per line"
    entries = _parse_list(labels_file, classes, _Resolver(base), what="labels file")
    if any(p is None for p, _ in entries):
        raise AtlasError(f"labels file {name} mixes lines with and without a file name")
    by_key: dict[str, int] = {}
    for file, label in entries:
        for key in _keys(file, base):
            by_key.setdefault(key, label)
    out, matched = list(labels), 0
    for i, file in enumerate(paths):
        label = next((by_key[k] for k in _keys(file, base) if k in by_key), None)
        if label is not None:
            out[i], matched = label, matched + 1
    if not matched and all(label == -1 for _, label in entries):  # no line had a label: per-line labels, none of them valid
        raise AtlasError(f"labels file {name} line {lines[0][0]}: {classes.unknown(lines[0][1])}")
    if not matched:
        raise AtlasError(f"labels file {name} names none of the {len(paths):,} images (names are matched as paths relative to "
                         f"{printable(str(base))}, file names or file names without suffix)")
    return out, f"labels from {name} for {matched:,} of {len(paths):,}"


def _is_label(classes: Classes, line: str) -> bool:
    """Whether a whole line is a label (a ``name label`` line never is), valid or not."""
    try:
        return classes.parse(line) is not None
    except _BadLabel:
        return True


def _in_order(paths: list[str], values: list[int], name: str) -> list[int]:
    if len(values) != len(paths):
        raise AtlasError(f"labels file {name} has {len(values):,} labels, one per line, but there are {len(paths):,} images; "
                         "give 'name label' lines to label some of them")
    return values


def _keys(file: str, base: Path) -> list[str]:
    """Names by which a labels file may name ``file``: relative path, file name, file name without suffix."""
    keys = []
    try:
        keys.append(os.path.relpath(file, base))
    except ValueError:
        pass
    name = os.path.basename(file)
    return [*keys, name, os.path.splitext(name)[0]]


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------
def list_images(source: str | Path, synsets: Sequence[str | tuple[str, str | Sequence[str]]] = (),
                labels: str | Path | None = None) -> ImageList:
    """The images of a folder (tree, flat or both) or a list file, in a fixed order, with labels where known.

    ``synsets`` gives the model's classes in logit order: synset ids, or (synset, names) pairs so
    that labels may also be class names (``class_table``). Without it, the sorted sub-folder names
    of an ImageNet-layout tree give the indices. ``labels`` is a labels file (see the module docstring).
    """
    source = Path(source).expanduser()
    classes = Classes(synsets)
    if source.is_file():
        paths, found, summary = _from_list_file(source, classes)
        base = _folder_of(source)
    elif source.is_dir():
        paths, found, summary = _from_folder(source, classes, derived_index=not classes)
        base = source.absolute()
    else:
        raise AtlasError(f"images not found: {printable(str(source))} is neither a folder nor a list file")
    if not paths:
        if source.is_file():
            raise AtlasError(f"list file {printable(str(source))} names no images")
        skipped = summary[summary.index(";"):] if ";" in summary else ""
        raise AtlasError(f"no images in {printable(str(source))} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}){skipped}")
    if labels is not None:
        found, fragment = _apply_labels(paths, found, base, Path(labels).expanduser(), classes)
        summary += f"; {fragment}"
    return ImageList([storable_path(p) for p in paths], np.asarray(found, dtype=np.int32), summary)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------
def _to_8bit(im: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float image as 8-bit grey, scaled by its own range instead of clipped."""
    array = np.asarray(im, dtype=np.float32)
    finite = array[np.isfinite(array)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = array * 255.0
    elif lo >= 0.0 and hi <= 255.0 and (im.mode != "F" or hi > 1.0):
        scaled = array
    elif hi > lo:
        scaled = (array - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(array)
    return Image.fromarray(np.nan_to_num(np.clip(np.rint(scaled), 0, 255)).astype(np.uint8), "L")


def _resample(im: Image.Image, resize: int, crop: int | None, interpolation: str = "bilinear") -> Image.Image:
    """Shorter side to ``resize`` (bilinear, or the model's ``interpolation``: "bicubic" for most ViTs), then the
    centre ``crop`` x ``crop`` (None: not cropped).

    The resized image is never made whole when it would be large: for an image more than ``MAX_ASPECT`` times longer
    than wide (a 1 x 100,000 strip becomes 256 x 25,600,000 pixels, 20 GB), only the part that is kept is resampled,
    straight from the source (PIL's ``box``: the same sample centres and filter support as the whole resize, so the
    same pixels). Ordinary images take the plain path, pixel for pixel what they always gave.
    """
    w, h = im.size
    scale = resize / min(w, h)
    least = crop or 0
    size = (max(least, round(w * scale)), max(least, round(h * scale)))
    limit = MAX_ASPECT * max(resize, least)
    method = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
    if max(size) <= limit:
        im = im.resize(size, method, reducing_gap=None)
        if crop is None:
            return im
        left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
        return im.crop((left, top, left + crop, top + crop))
    out = (crop, crop) if crop is not None else (min(size[0], limit), min(size[1], limit))
    left, top = (size[0] - out[0]) // 2, (size[1] - out[1]) // 2
    fx, fy = w / size[0], h / size[1]
    box = (left * fx, top * fy, (left + out[0]) * fx, (top + out[1]) * fy)
    return im.resize(out, method, box=box, reducing_gap=None)


def decode_image(source: str | os.PathLike | bytes, resize: int = 256, crop: int | None = 224, max_pixels: int = MAX_PIXELS,
                 formats: Sequence[str] | None = None, interpolation: str = "bilinear") -> Image.Image:
    """The one image decoder: a file or encoded bytes -> RGB, shorter side ``resize``, centre crop ``crop`` x ``crop``.

    Every reader of images goes through here (the sampler's workers, the unit lens, inspect, reconstruct, patch, the
    example icons, the live page's frames), so every one has the same limits and the same pixels. The size is read
    from the header first: more than ``max_pixels`` pixels (after JPEG draft reduction) is refused before anything is
    decoded. The memory a file can take is bounded by its decoded size (at most ``max_pixels``) plus the output: an
    image of an extreme aspect ratio is cut to its centre while resampling (:func:`_resample`), never resized whole.

    Parameters
    ----------
    source : str, os.PathLike or bytes
        A file (a ``storable_path`` string works) or an encoded image in memory.
    resize : int, default 256
        Length of the shorter side after resizing (small images are enlarged).
    crop : int or None, default 224
        Side of the centre crop; None: not cropped (the long side is then at most ``MAX_ASPECT`` x ``resize``, the
        centre kept).
    max_pixels : int, default MAX_PIXELS
        Largest image decoded, in pixels after JPEG draft reduction.
    formats : sequence of str or None, default None
        PIL formats accepted (e.g. ``("JPEG", "PNG", "WEBP")``); None: any PIL reads.
    interpolation : str, default "bilinear"
        Resampling of the resize: "bilinear" or "bicubic" (the model's own, ``Network.preprocess``).

    Raises
    ------
    ImageTooLarge
        More than ``max_pixels`` pixels.
    OSError
        Anything else that stops the decoding, whatever the decoder raised (``UnreadableImage`` wraps a MemoryError,
        a DecompressionBombError, a struct.error of a damaged header...): readers skip and count an OSError.
    """
    opened = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels below decides
            with Image.open(opened, formats=formats) as im:
                if im.format == "JPEG":
                    im.draft("RGB", (resize, resize))
                if im.size[0] * im.size[1] > max_pixels:
                    raise ImageTooLarge(f"image too large to decode: {im.size[0]} x {im.size[1]} pixels (limit {max_pixels:,})")
                if im.mode in ("I", "F") or im.mode.startswith("I;16"):
                    im = _to_8bit(im)
                if im.mode in ("P", "PA", "LA", "RGBA") or "transparency" in im.info:
                    im = im.convert("RGBA")
                    background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(background, im)
                return _resample(im.convert("RGB"), resize, crop, interpolation)
    except (ImageTooLarge, OSError):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image too large to decode ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - whatever a decoder raises (MemoryError included) means "unreadable file"
        raise UnreadableImage(f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}") from None


def load_image(path: str | Path, resize: int = 256, crop: int = 224, interpolation: str = "bilinear") -> Image.Image:
    """RGB image of a file, shorter side resized to ``resize`` then centre-cropped to ``crop`` x ``crop``
    (:func:`decode_image`).

    ``path`` may be a ``storable_path`` string. Small images are enlarged; JPEGs are decoded at a
    reduced scale when they are much larger than needed (draft mode), which is most of the
    decoding time for ImageNet. Raises OSError (or ValueError) for unreadable, truncated,
    non-regular (FIFO, device) or oversized files, whatever the decoder itself raised.
    """
    file = real_path(path) if isinstance(path, str) else path
    mode = os.stat(file).st_mode
    if not stat.S_ISREG(mode):  # opening a FIFO would block forever, a device would read without end
        kind = "FIFO" if stat.S_ISFIFO(mode) else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file"
        raise OSError(f"not a regular file ({kind})")
    return decode_image(file, resize, crop, interpolation=interpolation)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]."""
    array = np.array(image, dtype=np.uint8, copy=True)
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


class ImageDataset(torch.utils.data.Dataset):
    """Indexable images for a DataLoader; unreadable files yield an error string instead of raising.

    ``uint8``: each image as a (crop, crop, 3) uint8 tensor, for :func:`batch_to_float` in the process that runs the
    model: a quarter of the bytes through the loader's shared memory, the float conversion done once per batch where
    the model runs, and the batch arrives in channels-last order without a transposing copy (bench/sample.py, (e)).
    """

    def __init__(self, images: ImageList, resize: int = 256, crop: int = 224, indices: Sequence[int] | None = None,
                 uint8: bool = False, interpolation: str = "bilinear"):
        self.images, self.resize, self.crop, self.uint8 = images, resize, crop, uint8
        self.interpolation = interpolation  # the model's resampling of the resize (bicubic for most ViTs)
        self.indices = list(range(len(images))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        try:
            if index in self.images.skip:
                raise OSError("no longer in the image list (the run keeps its own list; nothing of it was sampled)")
            image = load_image(self.images.paths[index], self.resize, self.crop, self.interpolation)
            image = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)) if self.uint8 else to_tensor(image)
            error = ""
        except Exception as exc:  # noqa: BLE001 - a file that fails the decoder in any way is skipped and counted, not the run's end
            image = torch.zeros(self.crop, self.crop, 3, dtype=torch.uint8) if self.uint8 else torch.zeros(3, self.crop, self.crop)
            error = printable(f"{type(exc).__name__}: {exc}".replace("\n", " "))[:200]
        return index, image, error


def image_loader(dataset: ImageDataset, batch_size: int, workers: int, device: str = "cpu") -> torch.utils.data.DataLoader:
    """The stages' DataLoader over ``dataset``: ``workers`` decoding processes (0: in this one) keeping 4 batches each
    ahead of the model; for a CUDA device the batches land in pinned memory, so the copy to the GPU can overlap."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, persistent_workers=False,
                                       prefetch_factor=4 if workers else None, pin_memory=str(device).startswith("cuda"),
                                       worker_init_fn=_stopped_by_parent if workers else None)


def _stopped_by_parent(worker_id: int) -> None:
    """A decoding worker ignores SIGINT and SIGTERM: Ctrl-C (sent to the whole process group) and a SIGTERM to it
    stop the main process, which ends its workers as it leaves the loader. A worker killed by the signal instead would
    make torch report it, with a traceback, on the main process's way out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def device_batch(batch: torch.Tensor, good: np.ndarray, device: str = "cpu", channels_last: bool = True) -> torch.Tensor:
    """The readable images (``good``) of a uint8 batch from :class:`ImageDataset` as float32 on ``device``: copied
    there as uint8 (a quarter of the bytes; asynchronously from pinned memory), then :func:`batch_to_float`."""
    x = batch.to(device, non_blocking=True)
    if not good.all():
        x = x[torch.from_numpy(good).to(x.device)]
    return batch_to_float(x, channels_last)


def batch_to_float(batch: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """(B, H, W, 3) uint8 images as (B, 3, H, W) float32 in [0, 1], the values :func:`to_tensor` gives: channels-last
    memory as it comes (the permutation is a view), or contiguous NCHW."""
    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    return x if channels_last else x.contiguous()


def position_to_pixels(position: tuple[int, int], layer_hw: tuple[int, int], crop: int = 224) -> tuple[float, float]:
    """Centre (y, x), in pixels of the cropped input, of a spatial position of a layer."""
    (y, x), (h, w) = position, layer_hw
    return (y + 0.5) * crop / h, (x + 0.5) * crop / w


def crop_patch(image: Image.Image, center: tuple[float, float], size: int) -> Image.Image:
    """A ``size`` x ``size`` patch around ``center`` (y, x), padded with grey past the borders."""
    cy, cx = center
    left, top = round(cx - size / 2), round(cy - size / 2)
    canvas = Image.new("RGB", (size, size), (127, 127, 127))
    canvas.paste(image.crop((max(left, 0), max(top, 0), min(left + size, image.width), min(top + size, image.height))),
                 (max(-left, 0), max(-top, 0)))
    return canvas
