"""Human-designed adversarial patches, the Activation Atlas article's last experiment, as tools.

``patch_images`` pastes one patch (any picture, or an atlas cell's icon or best dataset-example patch) into every
image at several sizes and positions and reports what it did to the model's top-1 prediction: per image and overall,
the top-1 before and after, the rate at which the prediction flips to a target class and the mean change of
logit(target) - logit(original), with a figure of the strongest examples.

``guided_search`` is the article's method of finding the steam locomotive that turns snorkels into scuba divers,
done automatically: the cells of a class-difference atlas (``atlas compare A B``) are ranked by their mean
attribution toward B (to B minus to A), each top cell's icon and best dataset patch is pasted into A's images, and
the cells are ranked by how often they flip A to B.

The package's rooms: :mod:`~atlas.patches.core` (placements, pasting, flip rate: pure functions on arrays),
:mod:`~atlas.patches.cells` (the patch: a picture or an atlas cell, read through :mod:`atlas.store` and the render
stage's public ``sample_patches``), :mod:`~atlas.patches.images` (the photos, prepared as the sampler does),
:mod:`~atlas.patches.measure` (the model's logits on the variants, the summary and the figure),
:mod:`~atlas.patches.apply` (:func:`patch_images`) and :mod:`~atlas.patches.search` (:func:`guided_search`).

Definitions (docs/experiments.md):

- an image's *original* class is the model's top-1 on it before pasting (not its label, which may be unknown);
- a *variant* is one image with the patch pasted at one size and one position;
- the *flip rate* is the share of variants whose top-1 is the target, among the variants of images whose original
  class is not already the target (those are counted apart, as ``already_target``);
- *delta* is (logit(target) - logit(original)) of the variant minus the same of the image.
"""

from atlas.patches.apply import patch_images
from atlas.patches.cells import CellRef, cell_patch, load_patch, parse_cell
from atlas.patches.core import CORNERS, NAMED, POSITIONS, Placement, expand_positions, flip_rate, outcome, paste, placements, resize_patch
from atlas.patches.images import augment_images, load_source
from atlas.patches.measure import plot_patched
from atlas.patches.search import guided_search, rank_cells, search_table

__all__ = ["CORNERS", "NAMED", "POSITIONS", "CellRef", "Placement", "augment_images", "cell_patch", "expand_positions", "flip_rate",
           "guided_search", "load_patch", "load_source", "outcome", "parse_cell", "paste", "patch_images", "placements", "plot_patched",
           "rank_cells", "resize_patch", "search_table"]
