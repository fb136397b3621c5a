"""The image list: :func:`list_images` over a folder or a list file (plain, Caffe-style or CSV/TSV with a header),
labels files (ImageNet's validation ground truth through the
devkit's ``meta.mat`` included), the check of an image source before any model loads, and the comparison of a stored list with a new one.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from atlas.data.folders import _from_folder, _plural
from atlas.data.labels import Classes, _BadLabel
from atlas.data.paths import IMAGE_SUFFIXES, INTEGER, SYNSET_ONLY, printable, storable_path
from atlas.errors import AtlasError

# Column names recognised in the header of a CSV/TSV list.
PATH_COLUMNS = {"path", "file", "filename", "file_name", "filepath", "file_path", "image", "image_path", "imageid", "image_id",
                "img", "fname", "name"}


LABEL_COLUMNS = {"label", "labels", "class", "class_id", "class_index", "class_name", "classname", "category", "target", "synset",
                 "wnid", "predictionstring", "y"}


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
