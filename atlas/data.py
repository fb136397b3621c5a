"""Image lists and image loading.

Three sources, all giving a deterministic order:

* a folder tree in ImageNet layout (``train/n01440764/*.JPEG``): labels from the sub-folder;
* a flat folder whose file names start with the synset (``n01440764_tench.JPEG``);
* a text file with one path per line, optionally followed by whitespace and a label
  (a class index or a synset).

Images are converted to RGB, shrunk while decoding where JPEG allows (PIL draft mode),
resized so the shorter side is ``resize`` and centre-cropped to ``crop``. Files that cannot
be read are reported to the caller, who skips and counts them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from atlas.errors import AtlasError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
SYNSET = re.compile(r"^(n\d{8})")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # truncated files must fail, so they are counted


@dataclass
class ImageList:
    """Paths in a fixed order, their labels (-1 when unknown) and a hash identifying the list."""

    paths: list[str]
    labels: np.ndarray

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for path, label in zip(self.paths, self.labels.tolist(), strict=True):
            h.update(f"{path}\t{label}\n".encode())
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.paths)

    def head(self, n: int | None) -> ImageList:
        if n is None or n >= len(self.paths):
            return self
        return ImageList(self.paths[:n], self.labels[:n])


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_images(source: str | Path, synsets: Sequence[str] = ()) -> ImageList:
    """The images of a folder (tree or flat) or a list file, sorted, with labels where known.

    ``synsets`` maps synset ids to class indices (their position); without it, the sorted
    sub-folder names of an ImageNet-layout tree give the indices.
    """
    source = Path(source).expanduser()
    index = {s: i for i, s in enumerate(synsets)}
    if source.is_file():
        return _from_list_file(source, index)
    if not source.is_dir():
        raise AtlasError(f"images not found: {source} is neither a folder nor a list file")
    subdirs = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs:
        if not index and all(SYNSET.match(d.name) for d in subdirs):
            index = {d.name: i for i, d in enumerate(subdirs)}
        paths, labels = [], []
        for d in subdirs:
            for p in sorted(d.rglob("*")):
                if p.is_file() and _is_image(p):
                    paths.append(str(p))
                    labels.append(index.get(d.name, -1))
    else:
        files = sorted(p for p in source.iterdir() if p.is_file() and _is_image(p))
        paths = [str(p) for p in files]
        labels = [_label_from_name(p.name, index) for p in files]
    if not paths:
        raise AtlasError(f"no images in {source} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return ImageList(paths, np.asarray(labels, dtype=np.int32))


def _label_from_name(name: str, index: dict[str, int]) -> int:
    match = SYNSET.match(name)
    return index.get(match.group(1), -1) if match else -1


def _from_list_file(path: Path, index: dict[str, int]) -> ImageList:
    paths, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        label = -1
        if len(parts) == 2 and (parts[1].lstrip("-").isdigit() or SYNSET.match(parts[1])):
            line, tag = parts
            label = int(tag) if tag.lstrip("-").isdigit() else index.get(tag, -1)
        file = Path(line).expanduser()
        if not file.is_absolute():
            file = path.parent / file
        paths.append(str(file))
        labels.append(label)
        del number
    if not paths:
        raise AtlasError(f"list file {path} names no images")
    return ImageList(paths, np.asarray(labels, dtype=np.int32))


def load_image(path: str | Path, resize: int = 256, crop: int = 224) -> Image.Image:
    """RGB image, shorter side resized to ``resize`` then centre-cropped to ``crop`` x ``crop``.

    Small images are enlarged; JPEGs are decoded at a reduced scale when they are much
    larger than needed (draft mode), which is most of the decoding time for ImageNet.
    Raises OSError (or ValueError) for unreadable or truncated files.
    """
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft("RGB", (resize, resize))
        if im.mode in ("P", "PA", "LA", "RGBA") or "transparency" in im.info:
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        im = im.convert("RGB")
        w, h = im.size
        scale = resize / min(w, h)
        size = (max(crop, round(w * scale)), max(crop, round(h * scale)))
        im = im.resize(size, Image.BILINEAR, reducing_gap=None)
        left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
        return im.crop((left, top, left + crop, top + crop))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]."""
    array = np.array(image, dtype=np.uint8, copy=True)
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


class ImageDataset(torch.utils.data.Dataset):
    """Indexable images for a DataLoader; unreadable files yield ``ok=False`` instead of raising."""

    def __init__(self, images: ImageList, resize: int = 256, crop: int = 224, indices: Sequence[int] | None = None):
        self.images, self.resize, self.crop = images, resize, crop
        self.indices = list(range(len(images))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        try:
            image = to_tensor(load_image(self.images.paths[index], self.resize, self.crop))
            error = ""
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            image = torch.zeros(3, self.crop, self.crop)
            error = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:200]
        return index, image, error


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
