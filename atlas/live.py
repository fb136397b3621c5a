"""The live page's per-frame computation (Yosinski et al.'s Deep Visualization Toolbox, in the browser).

A frame is an encoded image from the browser (a 224 px JPEG of the webcam, or of a dropped photo). Per frame:
decode it (:func:`decode_frame`, the limits in one line each), one forward of the whole network through the
inspection engine (:func:`atlas.inspect.engine.forward`: the selected layer captured on the way, the logits for the
top-5), and the layer's maps quantised to uint8 on one brightness scale for the whole layer (the toolbox's view,
as :func:`atlas.inspect.views.channel_grid`): the browser draws the DeepVis grid itself from those bytes, which is
cheaper than a PNG per frame (bench/live.py measures both). A channel's deconvnet projection of the current frame
(:func:`atlas.units.project_units`) is computed on request.

Every message to the browser is :func:`pack`: a 4-byte little-endian length, a JSON header of that length, then
the payload bytes. Nothing the client sends names a file: the run's own images are chosen by index.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from atlas.errors import AtlasError

SIZE = 224
FORMATS = ("JPEG", "PNG", "WEBP")
DEFAULT_MAX_BYTES = 2 * 1024 * 1024
DEFAULT_MAX_PIXELS = 4096 * 4096 // 4
MAX_IMAGES = 64  # the run's images the page offers (by index)


class FrameError(AtlasError):
    """A frame the server will not compute (too large, not an image): one line back on the socket."""


@dataclass
class Frame:
    """One decoded frame: the model's input ``(1, 3, SIZE, SIZE)`` in [0, 1], the picture, and a digest of the bytes."""

    tensor: object
    picture: np.ndarray
    digest: str


def pack(header: dict, payload: bytes = b"") -> bytes:
    """A binary message: uint32 LE length of the JSON header, the header, the payload."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<I", len(head)) + head + payload


def unpack(message: bytes) -> tuple[dict, bytes]:
    """The inverse of :func:`pack` (for clients in Python: tests and bench/live.py)."""
    (n,) = struct.unpack_from("<I", message)
    return json.loads(message[4:4 + n]), message[4 + n:]


def decode_frame(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
                 interpolation: str = "bilinear") -> Frame:
    """A frame's bytes (JPEG, PNG or WebP) -> :class:`Frame`; :class:`FrameError` (one line) for anything else.

    Decoded by :func:`atlas.data.decode_image`, the decoder of every other reader (shorter side to ``SIZE``, centre
    crop, resampled with the model's ``interpolation``: bicubic for a ViT): the same limits on size and aspect ratio,
    the same handling of 16-bit and transparent images.
    """
    import torch

    from atlas.data import ImageTooLarge, decode_image

    if len(data) > max_bytes:
        raise FrameError(f"frame too large: {len(data):,} bytes, the limit is {max_bytes:,}; send a downscaled JPEG")
    if not data:
        raise FrameError("empty frame; send a JPEG, PNG or WebP image")
    try:
        im = decode_image(bytes(data), SIZE, SIZE, max_pixels=max_pixels, formats=FORMATS, interpolation=interpolation)
    except ImageTooLarge as exc:
        size = str(exc).split(": ", 1)[-1].split(" (")[0]  # "W x H pixels" as the decoder read it from the header
        raise FrameError(f"frame too large: {size}, the limit is {max_pixels:,} pixels; send a downscaled JPEG") from None
    except (OSError, ValueError):
        raise FrameError("frame is not a decodable JPEG, PNG or WebP image") from None
    picture = np.asarray(im, dtype=np.uint8)
    tensor = torch.from_numpy(picture.copy()).permute(2, 0, 1).float().div_(255.0)[None]
    return Frame(tensor, picture, hashlib.blake2b(data, digest_size=16).hexdigest())


def quantise(acts: np.ndarray) -> tuple[bytes, float, int]:
    """One image's layer maps ``(C, H, W)`` -> (uint8 bytes C*H*W, the layer's peak, the strongest channel).

    0 is black and the layer's largest value 255, for every channel (the toolbox's scale, as
    :func:`atlas.inspect.views.channel_grid` with ``scale="layer"``); negative values are 0.
    """
    a = np.nan_to_num(np.maximum(np.asarray(acts, np.float32), 0.0))
    tops = a.reshape(a.shape[0], -1).max(axis=1)
    peak = float(tops.max()) if tops.size else 0.0
    q = np.rint(a * (255.0 / peak)) if peak > 0 else np.zeros_like(a)
    return np.clip(q, 0, 255).astype(np.uint8).tobytes(), peak, int(tops.argmax())


def encode_jpeg(picture: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class LiveEngine:
    """The model and the run's images for the live page; every method runs on the server's worker thread."""

    def __init__(self, net, run_dir: Path | None = None, image_paths: list[str] | None = None, threads: int | None = None,
                 default_layer: str | None = None) -> None:
        import torch

        from atlas.inspect import view_layers

        # both cores for the network (the default), never more than the machine has
        torch.set_num_threads(max(1, threads or min(2, os.cpu_count() or 1)))
        self.net = net
        # how the model reads photos (atlas.data.photo_reading): its resize and resampling, bicubic for a ViT
        from atlas.data import photo_reading

        self.resize, _, self.interpolation = photo_reading(net.preprocess)
        self._methods: dict[str, str] = {}  # per layer, the unit projection the model allows (the deconvnet or the gradient)
        self.run_dir = run_dir
        self.paths = list(image_paths or [])[:MAX_IMAGES]
        shapes = net.layer_shapes(SIZE)
        self.layers = view_layers(net, SIZE)
        self.shapes = {layer: tuple(int(v) for v in shapes.get(layer) or shapes[net.aliases.get(layer, layer)]) for layer in self.layers}
        self.default_layer = default_layer if default_layer in self.layers else ("mixed4c" if "mixed4c" in self.layers else self.layers[-1])
        self._cache: OrderedDict[tuple[str, str], tuple[np.ndarray, list[dict]]] = OrderedDict()

    @classmethod
    def for_run(cls, run_dir: Path, threads: int | None = None) -> LiveEngine:
        """The run's model (as recorded in its store) and its first images."""
        from atlas import store
        from atlas.models import load_run_model

        root = store.open_store(run_dir)
        attrs = store.attrs(root)
        net = load_run_model(attrs)
        paths: list[str] = []
        if "images" in root and "path" in root["images"]:
            from atlas.data import real_path

            paths = [real_path(str(p)) for p in root["images/path"][:MAX_IMAGES]]
        layers = attrs.get("layers") or []
        return cls(net, run_dir, paths, threads, layers[0] if layers else None)

    # ------------------------------------------------------------------ messages
    def hello(self) -> dict:
        units = []
        if self.run_dir is not None:
            manifest = Path(self.run_dir) / "tiles" / "units.json"
            try:
                units = [x["layer"] for x in json.loads(manifest.read_text()).get("layers", []) if isinstance(x, dict)]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                units = []
        return {"type": "hello", "model": self.net.name, "layer": self.default_layer, "size": SIZE,
                "layers": [{"name": layer, "shape": list(self.shapes[layer])} for layer in self.layers],
                "images": len(self.paths), "units": units, "atlases": self.atlases(),
                "max_bytes": DEFAULT_MAX_BYTES, "max_pixels": DEFAULT_MAX_PIXELS}

    def atlases(self) -> list[dict]:
        """The run's rendered atlases of layers the page offers (from ``tiles/atlases.json``): what the strip can show."""
        if self.run_dir is None:
            return []
        try:
            listing = json.loads((Path(self.run_dir) / "tiles" / "atlases.json").read_text()).get("atlases", [])
        except (OSError, ValueError, AttributeError):
            return []
        keys = ("layer", "atlas", "base", "width", "height", "levels", "tile_size", "format")
        return [{k: a[k] for k in keys} for a in listing
                if isinstance(a, dict) and all(k in a for k in keys) and a["layer"] in self.layers]

    def on_atlas(self, frame: Frame, layer: str, atlas: str, k: int = 8) -> dict:
        """The ``onatlas`` message: the frame's activation at every position of ``layer`` placed on the run's atlas
        (:func:`atlas.inspect.onatlas.place_on_atlas`, k nearest samples), with each position's attribution to the
        frame's top class (:func:`atlas.inspect.onatlas.image_positions`). ``(layer, atlas)`` must be a listed atlas."""
        from atlas import store
        from atlas.inspect import image_positions, place_on_atlas
        from atlas.models.inference import run_kernels

        if not any(a["layer"] == layer and a["atlas"] == atlas for a in self.atlases()):
            raise AtlasError(f"atlas: the run has no rendered atlas {str(layer)[:60]}/{str(atlas)[:60]}")
        t0 = time.perf_counter()
        if getattr(self, "_arithmetic", None) is None:  # the run's precision and kernels: read once, not per frame
            self._arithmetic = run_kernels(store.attrs(store.open_store(self.run_dir)))
        acts, attribution, hw, target = image_positions(self.net, frame.tensor[0], layer, arithmetic=self._arithmetic)
        placement = place_on_atlas(self.run_dir, layer, acts, atlas=atlas, k=k)
        points = [[round(float(x), 4), round(float(y), 4), round(float(v), 3)] for (x, y), v in zip(placement.xy, attribution, strict=True)]
        return {"type": "onatlas", "layer": layer, "atlas": atlas, "hw": list(hw), "target": self.net.classes[target],
                "points": points, "compute_ms": round((time.perf_counter() - t0) * 1000, 1)}

    @property
    def image_count(self) -> int:
        return len(self.paths)

    def image_names(self) -> list[dict]:
        """The run's images offered: index and file stem only (the run's paths are never sent)."""
        return [{"index": i, "name": Path(p).stem} for i, p in enumerate(self.paths)]

    def decode(self, data: bytes) -> Frame:
        return decode_frame(data, interpolation=self.interpolation)

    def run_image(self, index: int) -> Frame:
        """One of the run's images (by index), decoded as the sampler reads it (the model's resize and resampling,
        centre ``SIZE``)."""
        from atlas.inspect import read_image

        tensor, picture = read_image(self.paths[index], self.resize, SIZE, self.interpolation)
        return Frame(tensor[None], picture, f"image:{index}")

    def picture(self, frame: Frame) -> bytes:
        return pack({"type": "picture"}, encode_jpeg(frame.picture))

    def compute(self, frame: Frame, layer: str) -> tuple[np.ndarray, list[dict]]:
        """(maps (C, H, W) float32, top-5) of a frame at ``layer``: one forward; the same frame again is not recomputed."""
        import torch

        from atlas.inspect import channels_last, forward, top_classes

        key = (frame.digest, layer)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        # the channels-last copy: ~1.8x the NCHW forward on this CPU (bench/live.py), equal to float noise
        acts, logits = forward(channels_last(self.net), frame.tensor.contiguous(memory_format=torch.channels_last), [layer])
        out = (acts[layer][0].numpy(), top_classes(logits[0], self.net.classes, 5))
        self._cache[key] = out
        while len(self._cache) > 4:
            self._cache.popitem(last=False)
        return out

    def result(self, frame: Frame, layer: str, **extra) -> bytes:
        """The ``result`` message: top-5 and the layer's maps as uint8 (C*H*W bytes, channel-major)."""
        t0 = time.perf_counter()
        maps, top = self.compute(frame, layer)
        data, peak, strongest = quantise(maps)
        header = {"type": "result", "layer": layer, "shape": list(maps.shape), "peak": peak, "strongest": strongest,
                  "top": top, "compute_ms": round((time.perf_counter() - t0) * 1000, 1), **extra}
        return pack(header, data)

    def projection(self, frame: Frame, layer: str, channel: int) -> bytes:
        """The ``projection`` message: the channel's deconvnet projection of the frame from its strongest position
        (the gradient on a model that is no ReLU network, e.g. a ViT: :func:`atlas.units.projection_method`), shown as
        the unit lens shows projections (0 grey, the 99.5th percentile of |value| black or white), as JPEG."""
        from atlas.units import project_units, projection_method, to_display

        maps, _ = self.compute(frame, layer)
        if not 0 <= channel < maps.shape[0]:
            raise AtlasError(f"unit: layer {layer} has channels 0 .. {maps.shape[0] - 1}, got {channel}")
        flat = int(np.argmax(maps[channel]))
        y, x = divmod(flat, maps.shape[2])
        value = float(maps[channel, y, x])
        if layer not in self._methods:
            self._methods[layer] = projection_method(self.net, layer, "auto", SIZE)
        proj = project_units(self.net, layer, frame.tensor, [[channel, y, x]], method=self._methods[layer])[0]
        picture = to_display(proj, (0, 0, SIZE, SIZE), patch=SIZE)
        return pack({"type": "projection", "layer": layer, "channel": channel, "position": [y, x], "value": value,
                     "method": self._methods[layer]},
                    encode_jpeg(picture))
