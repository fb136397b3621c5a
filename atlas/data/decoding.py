"""Decoding one image: RGB, shrunk while decoding where JPEG allows, resized and centre-cropped; 16-bit, 32-bit and
float images scaled by their own range; images over ``MAX_PIXELS`` refused before decoding; extreme aspect ratios
resampled only where kept; every decoder failure an OSError (or :class:`ImageTooLarge`), which readers skip and count.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from atlas.data.paths import real_path

# Largest image decoded (pixels, after JPEG draft reduction): ~150 MB as RGB, more than a 50-megapixel
# camera frame; larger files (decompression bombs, giant scans) are refused before any pixel is decoded.
MAX_PIXELS = 50_000_000


# Longest side of a resized image, as a multiple of its shorter side: an image of a more extreme aspect ratio (a
# 1 x 4,000,000 strip) is resampled only in the part that is kept, so its intermediate never grows with its length.
MAX_ASPECT = 8
ImageFile.LOAD_TRUNCATED_IMAGES = False  # truncated files must fail, so they are counted


class ImageTooLarge(ValueError):
    """An image with more pixels than ``MAX_PIXELS`` (after JPEG draft reduction)."""


class UnreadableImage(OSError):
    """A file the decoder failed on in a way that is not an OSError (a MemoryError, a PIL DecompressionBombError, a
    struct.error of a damaged header...): an OSError, so that every reader skips and counts it like any other."""


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


def photo_reading(preprocessing: Mapping | None = None) -> tuple[int, int, str]:
    """``(resize, crop, interpolation)``: how a model reads a photo, for every reader that resizes photos for it.

    ``preprocessing`` is a run's record (the store's ``preprocessing`` attribute: ``resize``, ``crop``,
    ``interpolation``) or a model's own (``Network.preprocess``: ``resize``, ``size``, ``interpolation``), so the
    sampler, the unit lens, the example icons, inspect and the live page all give a model the pixels it was trained
    on (bicubic for most ViTs) rather than each its own default. Empty or None (the zoo's models, runs recorded
    before the interpolation was): shorter side 256, centre crop 224, bilinear.

    Parameters
    ----------
    preprocessing : mapping or None, default None
        A run's recorded preprocessing or a model's ``preprocess``.

    Returns
    -------
    tuple of (int, int, str)
        Shorter side after resizing, side of the centre crop, "bilinear" or "bicubic".
    """
    prep = dict(preprocessing or {})
    crop = prep.get("crop", prep.get("size", 224))
    return int(prep.get("resize", 256)), int(crop), str(prep.get("interpolation", "bilinear"))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]."""
    array = np.array(image, dtype=np.uint8, copy=True)
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


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
