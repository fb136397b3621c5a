"""Filter sheets: a convolution's weights drawn as images (Krizhevsky et al. 2012, Fig. 3; Zeiler & Fergus 2014, Fig. 5).

The first convolution (the one reading the image, 3 input channels) is drawn in colour: each filter as a small RGB
picture, one per output channel, with its index above it. Its weights are first carried back through the model's
own preprocessing, which is per-pixel affine (InceptionV1's BVLC release reads BGR * 255 minus a mean, torchvision
models read (RGB - mean) / std): the drawn filter is the one the convolution applies to the RGB [0, 1] image, so red
is red whatever the model's channel order. :func:`input_filters` finds that map by probing the convolution's input.

Every deeper convolution is drawn in grey: one row per filter (output channel), one k x k square per input channel.

Values are shown symmetrically around zero, as the papers do: 0 is mid grey (128), ``+m`` white (or full colour) and
``-m`` black, where ``m`` is the largest ``|w|`` of each filter (``normalize="each"``, the papers' choice) or of all
filters drawn (``normalize="all"``, which keeps the filters' relative strengths).

Two measures read the sheets as numbers (:func:`filter_stats`; docs/weights.md):

- **high-frequency share**: the fraction of a filter's spectral energy (2-D DFT of each colour channel of the k x k
  kernel, summed over channels) at spatial frequencies above half the Nyquist frequency (radius > 0.25 cycles per
  pixel), averaged over filters. White noise (a random initialisation) puts energy evenly over the frequency bins;
  trained first-layer filters (smooth edges, blobs and gratings) put it at low frequencies.
- **colour opponency**: per filter, the cosine between the weights of its two most opposed colour channels,
  negated (``-min_{i<j} cos(w_i, w_j)``, each ``w_i`` the k x k kernel of channel i as a vector); a filter counts as
  colour-opponent when this is above 0.5, i.e. two colour channels carry nearly opposite patterns (red on where green
  is off). Independent random channels are nearly orthogonal (cosines around +-1/k), so hardly any random filter is.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from atlas.errors import AtlasError
from atlas.models import Network, StopForward
from atlas.settings import WeightsSettings, parse_channels

GAP = 2  # pixels between filters
BACKGROUND = (255, 255, 255)
LABEL = (60, 60, 60)
HIGH_FREQUENCY = 0.25  # cycles per pixel: half the Nyquist frequency
OPPONENT = 0.5  # -min cos above this: a colour-opponent filter
MAX_PIXELS = 60_000_000  # a sheet larger than this is refused (choose fewer channels or a smaller scale)


def convolutions(net: Network) -> list[str]:
    """Names of every ``nn.Conv2d`` of the model, in the order the modules are registered (torchvision models' without
    the wrapper's ``net.`` prefix, as users write them)."""
    return [_shown(net, name) for name, m in net.module.named_modules() if isinstance(m, nn.Conv2d)]


def _shown(net: Network, path: str) -> str:
    short = path.removeprefix("net.")
    return short if short != path and net.aliases.get(short) == path else path


def _short_list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def find_conv(net: Network, layer: str | None = None) -> tuple[str, nn.Conv2d]:
    """The convolution ``layer`` names: a ``Conv2d`` itself, or a layer holding exactly one (InceptionV1's ``conv2d0``
    is its convolution + ReLU); None: the model's first convolution. Anything else is one line: a layer without
    weights (ReLU, pooling, LRN), a layer holding several convolutions (they are listed), a non-convolution."""
    convs = convolutions(net)
    if not convs:
        raise AtlasError(f"model {net.name} has no convolution")
    if layer is None:
        return convs[0], net.module.get_submodule(net.resolve(convs[0]))
    path = net.resolve(layer)  # unknown names: one line with the known ones
    module = net.module.get_submodule(path)
    if isinstance(module, nn.Conv2d):
        return _shown(net, path), module
    inside = [(_shown(net, f"{path}.{name}"), m) for name, m in module.named_modules() if name and isinstance(m, nn.Conv2d)]
    if len(inside) == 1:
        return inside[0]
    if inside:
        raise AtlasError(f"layer '{layer}' of model {net.name} holds {len(inside)} convolutions; name one: "
                         f"{_short_list([name for name, _ in inside])}")
    kind = type(module).__name__
    has = "has weights but is not a convolution" if any(True for _ in module.parameters()) else "has no weights"
    raise AtlasError(f"layer '{layer}' of model {net.name} ({kind}) {has}; convolutions: {_short_list(convs)}")


def _input_map(net: Network, conv: nn.Conv2d) -> np.ndarray | None:
    """The (3, 3) matrix A with the convolution's input at a pixel ``A @ rgb + b``, found by probing with black, red,
    green, blue and grey images; None when the convolution does not read 3 channels or the map is not affine."""
    size = 16
    probes = torch.zeros(5, 3, size, size)
    for c in range(3):
        probes[c + 1, c] = 1.0
    probes[4] = 0.5  # a grey image: checks that the map is affine
    seen: dict[str, torch.Tensor] = {}

    def grab(_module, inputs):
        seen["x"] = inputs[0].detach()
        raise StopForward

    handle = conv.register_forward_pre_hook(grab)
    try:
        with torch.inference_mode():
            net.module(probes.to(next(net.module.parameters()).device, next(net.module.parameters()).dtype))
    except StopForward:
        pass
    finally:
        handle.remove()
    x = seen.get("x")
    if x is None or x.shape[1] != 3:
        return None
    h, w = x.shape[-2:]
    centre = x[:, :, h // 2, w // 2].double().cpu().numpy()  # (5, 3): black, each unit colour, grey
    a = (centre[1:4] - centre[0]).T  # a[j, c]: input channel j per unit of RGB channel c
    affine = np.allclose(centre[4] - centre[0], 0.5 * a.sum(1), rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(a).max())))
    return a if affine and np.all(np.isfinite(a)) else None


def input_filters(net: Network, layer: str | None = None) -> tuple[str, np.ndarray, bool]:
    """The filters of a convolution as float64 ``(out, in, k, k)``, and whether they are RGB.

    For a convolution that reads the image (3 input channels right after the preprocessing), the filters are carried
    back to RGB [0, 1] input space (see the module docstring) and ``rgb`` is True; otherwise the raw weights.
    """
    path, conv = find_conv(net, layer)
    w = conv.weight.detach().double().cpu().numpy()
    if conv.in_channels == 3 and conv.groups == 1:
        a = _input_map(net, conv)
        if a is not None:
            return path, np.einsum("ojyx,jc->ocyx", w, a), True
    return path, w, False


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _scaled(values: np.ndarray, peak: float) -> np.ndarray:
    """0 -> 128, +peak -> 255, -peak -> 1, as uint8."""
    if peak <= 0:
        return np.full(values.shape, 128, np.uint8)
    return np.clip(np.floor(128.0 + 127.0 * values / peak + 0.5), 0, 255).astype(np.uint8)


def filter_sheet(net: Network, layer: str | None = None, channels: str | None = None, scale: int = 8,
                 normalize: str = "each") -> np.ndarray:
    """A convolution's filters on one sheet, ``(H, W, 3)`` uint8.

    Parameters
    ----------
    net : Network
        The model (:func:`atlas.models.load_model` or :func:`atlas.weights.load_checkpoint`).
    layer : str or None, default None
        A convolution or a layer holding exactly one (``conv2d0``, ``mixed3a.b3.1.0``, ``layer1.0.conv1``); None: the
        model's first convolution.
    channels : str or None, default None
        Output channels (filters) to draw, e.g. ``"0-63"`` or ``"0-9,100"``; None: all.
    scale : int, default 8, 1..64
        Pixels per weight.
    normalize : {"each", "all"}, default "each"
        Scale each filter by its own largest |weight|, or all drawn filters by the largest of them.

    Returns
    -------
    ndarray (H, W, 3) uint8
        RGB filters in a near-square grid, each with its index above it (the first convolution); or one grey row per
        filter, one k x k square per input channel, its index at the left (deeper convolutions).
    """
    s = WeightsSettings(layer=layer, channels=channels, scale=scale, normalize=normalize)  # one line for a bad value
    path, w, rgb = input_filters(net, s.layer)
    chosen = parse_channels(s.channels, w.shape[0], path)
    w = w[chosen]
    peaks = np.abs(w).reshape(len(w), -1).max(1)
    if s.normalize == "all":
        peaks = np.full_like(peaks, peaks.max() if peaks.size else 0.0)
    kh, kw = w.shape[-2:]
    font = _font(max(9, min(14, s.scale * kh // 4)))
    label_h = font.getbbox("0")[3] + 3
    if rgb:
        cols = math.ceil(math.sqrt(len(chosen)))
        rows = math.ceil(len(chosen) / cols)
        cell_w, cell_h = max(kw * s.scale, font.getbbox(str(max(chosen)))[2] + 2), kh * s.scale + label_h
        width, height = GAP + cols * (cell_w + GAP), GAP + rows * (cell_h + GAP)
        _check_size(width, height)
        sheet = Image.new("RGB", (width, height), BACKGROUND)
        draw = ImageDraw.Draw(sheet)
        for i, (index, f) in enumerate(zip(chosen, w, strict=True)):
            r, c = divmod(i, cols)
            x0, y0 = GAP + c * (cell_w + GAP), GAP + r * (cell_h + GAP)
            picture = _scaled(f.transpose(1, 2, 0), peaks[i])
            tile = Image.fromarray(picture, "RGB").resize((kw * s.scale, kh * s.scale), Image.NEAREST)
            sheet.paste(tile, (x0 + (cell_w - kw * s.scale) // 2, y0 + label_h))
            draw.text((x0 + cell_w // 2, y0), str(index), fill=LABEL, font=font, anchor="mt")
        return np.asarray(sheet, dtype=np.uint8)
    n_in = w.shape[1]
    label_w = font.getbbox(str(max(chosen)))[2] + 6
    cell_w, cell_h = kw * s.scale, kh * s.scale
    gap = 1 if s.scale * kh < 8 else GAP
    width, height = label_w + gap + n_in * (cell_w + gap), gap + len(chosen) * (cell_h + gap)
    _check_size(width, height)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for i, (index, f) in enumerate(zip(chosen, w, strict=True)):
        y0 = gap + i * (cell_h + gap)
        grey = _scaled(f, peaks[i])  # (in, k, k)
        row = np.full((cell_h, n_in * (cell_w + gap)), 255, np.uint8)
        for j in range(n_in):
            row[:, j * (cell_w + gap): j * (cell_w + gap) + cell_w] = np.kron(grey[j], np.ones((s.scale, s.scale), np.uint8))
        sheet.paste(Image.fromarray(row, "L").convert("RGB"), (label_w + gap, y0))
        if cell_h >= 8:
            draw.text((label_w - 3, y0 + cell_h // 2), str(index), fill=LABEL, font=font, anchor="rm")
    return np.asarray(sheet, dtype=np.uint8)


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise AtlasError(f"the sheet would be {width} x {height} pixels; choose fewer filters (--channels) or a smaller --scale")


def filter_stats(filters: np.ndarray) -> dict:
    """The two measures of the module docstring for filters ``(out, in, k, k)``: ``high_frequency_share`` (mean over
    filters), ``opponency`` (mean of ``-min cos``) and ``opponent_share`` (fraction above 0.5); the last two are
    None unless the filters have 3 (colour) input channels."""
    w = np.asarray(filters, np.float64)
    n, c, kh, kw = w.shape
    power = (np.abs(np.fft.fft2(w, axes=(-2, -1))) ** 2).sum(1)  # (n, k, k), summed over channels
    fy, fx = np.meshgrid(np.fft.fftfreq(kh), np.fft.fftfreq(kw), indexing="ij")
    high = np.hypot(fy, fx) > HIGH_FREQUENCY
    total = power.reshape(n, -1).sum(1)
    share = np.where(total > 0, (power * high).reshape(n, -1).sum(1) / np.maximum(total, 1e-300), 0.0)
    out = {"filters": int(n), "kernel": [int(kh), int(kw)], "high_frequency_share": float(share.mean()),
           "high_frequency_bins": float(high.mean())}
    if c == 3:
        flat = w.reshape(n, c, -1)
        unit = flat / np.maximum(np.linalg.norm(flat, axis=2, keepdims=True), 1e-300)
        cos = np.einsum("nip,njp->nij", unit, unit)
        i, j = np.triu_indices(c, 1)
        opponency = -cos[:, i, j].min(1)
        out["opponency"] = float(opponency.mean())
        out["opponent_share"] = float((opponency > OPPONENT).mean())
    else:
        out["opponency"] = out["opponent_share"] = None  # colour opponency is a measure of RGB filters only
    return out


def write_filters(net: Network, out: str | Path, layer: str | None = None, channels: str | None = None, scale: int = 8,
                  normalize: str = "each") -> dict:
    """Write :func:`filter_sheet` as a PNG at ``out`` (its folder made); returns ``{"figure", "layer", "filters",
    "rgb", "shape", "size"}`` and :func:`filter_stats` of the filters drawn."""
    out = Path(out).expanduser()
    if out.suffix.lower() != ".png":
        raise AtlasError(f"--out {out}: a filter sheet is a .png file")
    if out.is_dir():
        raise AtlasError(f"--out {out} is a folder; give a .png file")
    sheet = filter_sheet(net, layer, channels, scale, normalize)
    path, w, rgb = input_filters(net, layer)
    chosen = parse_channels(channels, w.shape[0], path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(out)
    return {"figure": str(out), "layer": path, "rgb": rgb, "shape": list(w.shape), "channels": len(chosen),
            "size": [int(sheet.shape[1]), int(sheet.shape[0])], **filter_stats(w[chosen])}
