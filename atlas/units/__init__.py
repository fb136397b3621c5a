"""The unit lens: what every channel of a layer responds to (Zeiler & Fergus 2014; Yosinski et al. 2015).

For each channel ("unit") of the requested layers of a sampled run, :func:`units` stores under
``units/{layer}/`` of the run's store (docs/units.md has the layout):

1. its top-k dataset examples: the k images of the run whose maximum activation over positions is highest, the
   position, the unit's receptive field there and the patch it covers (one streamed pass, :mod:`atlas.units.topk`,
   receptive fields from the architecture, :mod:`atlas.units.receptive`);
2. their projections back to pixels: deconvnet, guided backpropagation or the plain gradient
   (:mod:`atlas.units.projections`);
3. regularised feature visualisations: Yosinski et al.'s pixel-space presets, the project's FFT + decorrelated
   colour, transparent (alpha) images and diverse sets (:mod:`atlas.units.features`);
4. the classes it contributes to most, from the run's attributions (:func:`class_scores`), checked against the
   unit's direct effect on each logit over its top examples (:mod:`atlas.units.effects`);

then writes the unit gallery under ``RUN/tiles/units/{layer}/`` (:mod:`atlas.units.gallery`), reachable from the
atlas viewer. Every part is resumable: a rerun computes only what is missing. :mod:`atlas.units.lens` runs the
parts in order; :mod:`atlas.units.scores` holds the class scores.

The lens's array cores other instruments build on (:mod:`atlas.inspect`, :mod:`atlas.weights`) are re-exported here,
so that they use the lens through its top module.
"""

from __future__ import annotations

from atlas.settings import UnitsSettings
from atlas.units.gallery import write_gallery
from atlas.units.lens import units
from atlas.units.projections import project_units, projection_method, to_display
from atlas.units.receptive import Field, check_unit_layers, receptive_field
from atlas.units.scores import class_scores, write_class_scores
from atlas.units.topk import fit_patch, max_positions

__all__ = ["Field", "UnitsSettings", "class_scores", "check_unit_layers", "fit_patch", "max_positions", "project_units", "receptive_field",
           "projection_method", "to_display", "units", "write_class_scores", "write_gallery"]
