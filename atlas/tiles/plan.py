"""The pyramid's geometry and the semantic-zoom plan: which grid owns which Deep Zoom level (pure functions)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from atlas.errors import AtlasError


# --------------------------------------------------------------------------------------
# Pyramid geometry
# --------------------------------------------------------------------------------------
def dzi_levels(width: int, height: int) -> list[tuple[int, int]]:
    """(width, height) of every Deep Zoom level, level 0 (1x1) first, the full image last."""
    top = max(1, math.ceil(math.log2(max(width, height)))) if max(width, height) > 1 else 0
    return [(math.ceil(width / 2 ** (top - lvl)), math.ceil(height / 2 ** (top - lvl))) for lvl in range(top + 1)]


def tile_spans(length: int, tile_size: int, overlap: int) -> list[tuple[int, int]]:
    """Pixel span [start, end) of each tile along one axis, overlap included (as DZI readers expect)."""
    n = max(1, math.ceil(length / tile_size))
    return [(max(0, i * tile_size - overlap), min(length, (i + 1) * tile_size + overlap)) for i in range(n)]


@dataclass
class GridPlan:
    """One grid of the atlas and the pyramid level it is drawn at."""

    size: int
    icon: int  # native icon size in the store
    canvas: int  # size * drawn icon size
    level: int = -1
    dim: int = 0  # the owned level's width (== canvas when the sizes line up)


def plan_levels(grids: list[GridPlan]) -> tuple[int, list[tuple[int, int]], list[GridPlan]]:
    """The full image size, its levels and the grids that own a level (finest first).

    Each grid claims the level nearest (in scale) to its canvas; when two grids claim the
    same level the finer grid keeps it, because it holds more specific icons.
    """
    full = max(g.canvas for g in grids)
    levels = dzi_levels(full, full)
    owned: dict[int, GridPlan] = {}
    for g in sorted(grids, key=lambda g: -g.size):
        lvl = min(range(len(levels)), key=lambda i: (abs(math.log2(levels[i][0] / g.canvas)), -i))
        if lvl not in owned:
            g.level, g.dim = lvl, levels[lvl][0]
            owned[lvl] = g
    return full, levels, [owned[k] for k in sorted(owned, reverse=True)]


def level_ranges(owned: list[int]) -> dict[int, tuple[int, int]]:
    """The semantic-zoom plan: owned level -> (coarsest, finest) level drawn from that grid.

    A grid draws its own level and every coarser level down to just above the next owned
    one; the coarsest grid draws every level down to 0 (1x1).
    """
    ranges, below = {}, -1
    for lvl in sorted(set(owned)):
        ranges[lvl] = (below + 1, lvl)
        below = lvl
    return ranges


@dataclass(frozen=True)
class TilePlan:
    """Which grid draws which pyramid level, at which canvas size: the outcome of :func:`plan_tiles`."""

    full: int  # width (== height) of the full image in pixels
    levels: list[tuple[int, int]]  # (width, height) of every level, level 0 first
    grids: list[GridPlan]  # every grid, smallest first; level -1 when a finer grid owns its level
    owners: list[GridPlan]  # the grids that own a level, finest first

    @property
    def skipped(self) -> list[int]:
        """Sizes of the grids not drawn (their level went to a finer grid)."""
        return [g.size for g in self.grids if g.level < 0]

    @property
    def ranges(self) -> dict[int, tuple[int, int]]:
        """Owned level -> (coarsest, finest) level that grid draws (see :func:`level_ranges`)."""
        return level_ranges([g.level for g in self.owners])


def plan_tiles(icon_sizes: dict[int, int], icon_size: int | None = None) -> TilePlan:
    """Plan the pyramid of one atlas from ``{grid size: stored icon size}``.

    Each grid's canvas is ``size * (icon_size or its stored icon size)`` pixels; the grids
    then claim levels as :func:`plan_levels` says. Pure: nothing is read or written.
    """
    if not icon_sizes:
        raise AtlasError("no grids to tile")
    if icon_size is not None and icon_size < 1:
        raise AtlasError(f"icon size must be positive (got {icon_size})")
    grids = [GridPlan(size=s, icon=p, canvas=s * (icon_size or p)) for s, p in sorted(icon_sizes.items())]
    full, levels, owners = plan_levels(grids)
    return TilePlan(full=full, levels=levels, grids=grids, owners=owners)


