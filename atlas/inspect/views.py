"""Layer views (Yosinski et al. 2015): every channel of a layer for one image, as a grid of small grayscale maps.

The Deep Visualization Toolbox shows a layer as a near-square grid of its channels' activation maps, one
brightness scale for the whole layer (so a strong channel looks strong next to its neighbours), the selected
channel outlined. :func:`channel_grid` is that picture as a pure function of one activation tensor; the live
page draws the same layout from the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from atlas.errors import AtlasError
from atlas.models import Network

# Smallest side of one channel's tile: a 7x7 map (mixed5b) is enlarged by whole pixels to stay readable.
MIN_TILE = 14
MARK = (255, 128, 0)  # the strongest channel's outline


@dataclass(frozen=True)
class GridLayout:
    """Where each channel's tile sits on a :func:`channel_grid` picture: channel c at row ``c // columns``, column
    ``c % columns``; its top-left pixel is ``(row * (tile + pad) + pad, col * (tile + pad) + pad)``."""

    channels: int
    columns: int
    rows: int
    tile: int
    pad: int

    def box(self, c: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) pixels of channel ``c``'s tile."""
        r, q = divmod(c, self.columns)
        top, left = r * (self.tile + self.pad) + self.pad, q * (self.tile + self.pad) + self.pad
        return top, left, top + self.tile, left + self.tile

    def as_dict(self) -> dict:
        return {"channels": self.channels, "columns": self.columns, "rows": self.rows, "tile": self.tile, "pad": self.pad}


def grid_layout(channels: int, height: int, width: int, pad: int = 1, min_tile: int = MIN_TILE) -> GridLayout:
    """The near-square layout of ``channels`` maps of ``height`` x ``width`` (columns = ceil(sqrt(C)))."""
    if channels < 1:
        raise AtlasError(f"a layer view needs at least one channel, got {channels}")
    columns = math.ceil(math.sqrt(channels))
    rows = math.ceil(channels / columns)
    scale = max(1, math.ceil(min_tile / max(height, width)))
    return GridLayout(channels, columns, rows, max(height, width) * scale, pad)


def strongest_channel(acts: np.ndarray) -> int:
    """The channel with the largest activation anywhere in its map (the first of equal maxima)."""
    return int(np.asarray(acts).reshape(acts.shape[0], -1).max(axis=1).argmax())


def channel_grid(acts: np.ndarray, pad: int = 1, mark: int | None = None, scale: str = "layer",
                 min_tile: int = MIN_TILE) -> tuple[np.ndarray, GridLayout]:
    """Every channel's activation map of one image as a grid of grayscale tiles: ``acts`` (C, H, W) -> RGB uint8.

    Parameters
    ----------
    acts : array (C, H, W)
        One image's activations at one layer (after its ReLU: non-negative for InceptionV1).
    pad : int, default 1
        Pixels of dark grey between tiles.
    mark : int or None, default None
        The channel to outline in orange; None: the strongest (:func:`strongest_channel`). -1: none.
    scale : {"layer", "channel"}, default "layer"
        "layer": 0 is black and the layer's largest value white, for every tile (the toolbox's view: strong
        channels stand out); "channel": each tile stretched to its own maximum (weak channels' shapes visible).
        Negative values (layers before a ReLU) are shown as black.
    min_tile : int, default 14
        Smallest tile side in pixels; smaller maps are enlarged by a whole factor (nearest neighbour).

    Returns
    -------
    (picture, layout) : (uint8 array (rows*(tile+pad)+pad, columns*(tile+pad)+pad, 3), GridLayout)
    """
    a = np.asarray(acts, dtype=np.float32)
    if a.ndim != 3:
        raise AtlasError(f"a layer view needs (channels, height, width) activations, got shape {a.shape}")
    if scale not in ("layer", "channel"):
        raise AtlasError(f"scale must be 'layer' or 'channel', got {scale!r}")
    c, h, w = a.shape
    layout = grid_layout(c, h, w, pad, min_tile)
    a = np.nan_to_num(np.maximum(a, 0.0))
    top = a.reshape(c, -1).max(axis=1)
    div = np.full(c, top.max()) if scale == "layer" else top
    gray = np.where(div[:, None, None] > 0, a / np.maximum(div, 1e-30)[:, None, None], 0.0)
    tiles = np.rint(np.clip(gray, 0.0, 1.0) * 255).astype(np.uint8)
    f = layout.tile // max(h, w)
    tiles = tiles.repeat(f, axis=1).repeat(f, axis=2)
    height = layout.rows * (layout.tile + pad) + pad
    width = layout.columns * (layout.tile + pad) + pad
    picture = np.full((height, width, 3), 40, np.uint8)
    for ch in range(c):
        t, lft, _, _ = layout.box(ch)
        picture[t:t + tiles.shape[1], lft:lft + tiles.shape[2]] = tiles[ch][:, :, None]
    mark = strongest_channel(a) if mark is None else mark
    if 0 <= mark < c and pad > 0:
        t, lft, b, r = layout.box(mark)
        picture[max(t - pad, 0):t, max(lft - pad, 0):r + pad] = MARK
        picture[b:b + pad, max(lft - pad, 0):r + pad] = MARK
        picture[t:b, max(lft - pad, 0):lft] = MARK
        picture[t:b, r:r + pad] = MARK
    return picture, layout


def view_layers(net: Network, size: int = 224) -> list[str]:
    """The layers a report shows by default: every named layer with spatial positions (InceptionV1's conv2d0 ..
    mixed5b; for a torchvision model its short aliases, e.g. ResNet's layer1 .. layer4, when it has them)."""
    shapes = net.layer_shapes(size)
    names: Sequence[str] = list(net.aliases) if net.aliases and not net.name.startswith("inception") else net.layer_names()
    return [n for n in names if len(shapes.get(n) or shapes.get(net.aliases.get(n, n), ())) == 3]
