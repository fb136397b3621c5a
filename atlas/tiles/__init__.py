"""Deep-zoom tiles of an atlas: a standard DZI pyramid, per-cell metadata and the viewer's manifest.

``make_tiles(run_dir, layer, atlas)`` reads ``grids/{layer}/{atlas}/{size}/*`` and
``icons/{layer}/{atlas}/{size}/*`` and writes, under ``RUN/tiles/``::

    atlases.json                               every tiled atlas of the run (the viewer's menu)
    index.html viewer.js viewer.css            the viewer (atlas.viewer), plus openseadragon/
    {layer}/{atlas}/atlas.dzi                  Deep Zoom descriptor
    {layer}/{atlas}/atlas_files/{level}/{col}_{row}.{fmt}
    {layer}/{atlas}/meta/{size}/{bx}_{by}.json cells of one BLOCK x BLOCK block of one grid
    {layer}/{atlas}/icons/{size}/{bx}_{by}.jpg the icons of one block at full size (a sprite)
    {layer}/{atlas}/examples/{size}/{gy}/{gx}.jpg  the cell's dataset-example patches side by side
    {layer}/{atlas}/highlight/{size}.png       with ``highlight``: an S x S RGBA veil per grid

Semantic zoom: every grid owns the pyramid level whose size matches its canvas
(``size * icon`` pixels) and that level is drawn from its own icons; the levels between two
owned levels are box-downsampled from the finer one, and the levels below the coarsest grid
from that grid. The pyramid is written strip by strip (a band of cells at a time), so memory
holds a few tile rows per level, never a whole canvas.

The rooms: ``plan`` (the pyramid's geometry and which grid owns which level), ``pyramid`` (the streaming
Deep Zoom writer), ``cells`` (metadata records, class names, the veil, the manifest entry: pure functions), ``writer``
(the files of one grid and the manifest, ``write_cells``, ``update_manifest``) and ``stage`` (``make_tiles``: reads the
store, calls them and publishes the result).

The highlight veil darkens each cell by how little it attributes to the class (the cells that
support the class stay bright); the viewer stretches the grid's PNG over the image with
nearest-neighbour scaling, and each cell's value is also in its metadata as ``hl``.
"""

from __future__ import annotations

from atlas.tiles.cells import BLOCK, atlas_entry, cell_records, class_names, example_rows, grid_record, highlight_veil
from atlas.tiles.plan import GridPlan, TilePlan, dzi_levels, level_ranges, plan_levels, plan_tiles, tile_spans
from atlas.tiles.pyramid import BACKGROUND, FORMATS, TileSaver, density_scales, grid_bands, write_pyramid
from atlas.tiles.stage import make_tiles
from atlas.tiles.writer import MANIFEST, update_manifest, write_cells

__all__ = ["BACKGROUND", "BLOCK", "FORMATS", "MANIFEST", "GridPlan", "TilePlan", "TileSaver", "atlas_entry", "cell_records",
           "class_names", "density_scales", "dzi_levels", "example_rows", "grid_bands", "grid_record", "highlight_veil",
           "level_ranges", "make_tiles", "plan_levels", "plan_tiles", "tile_spans", "update_manifest", "write_cells",
           "write_pyramid"]
