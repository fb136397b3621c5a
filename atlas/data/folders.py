"""A folder of images, walked in a deterministic order: images directly in it, then each first-level sub-folder
depth-first; symlinks followed but every file and folder taken once; labels from the first-level sub-folder or the
file name's synset.
"""

from __future__ import annotations

import os
from pathlib import Path

from atlas.data.labels import Classes
from atlas.data.paths import IMAGE_SUFFIXES, SYNSET, SYNSET_ONLY, printable


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
