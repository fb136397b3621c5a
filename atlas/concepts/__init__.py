"""Concepts on the map: a sparse dictionary of a layer's sampled activations, placed on the atlas.

:func:`concepts` learns ``K`` concept directions over the rows ``atlas sample`` stored for one layer
(:mod:`atlas.concepts.dictionary`: a TopK sparse autoencoder or NMF), codes every row, and for every concept stores
its top dataset patches (by code, one per image), the classes it contributes to (when the run has attributions), its
veil (mean code per cell of each atlas grid, with its share of the cell's mean activation) and an icon (a feature
visualisation of its direction with the atlas's objective and whitening). Everything lives under
``concepts/{layer}/`` of the run's store (docs/concepts.md has the layout); :func:`write_panel` writes the viewer's
concepts panel under ``RUN/tiles/concepts/{layer}/``.

Each part is resumable: a rerun with the same settings keeps the dictionary and every finished part (icons per
batch); other settings, or samples changed since, replace the dictionary and everything built on it.
"""

from atlas.concepts.writer import Concepts, concepts, read_concepts, write_panel
from atlas.settings import ConceptsSettings

__all__ = ["Concepts", "ConceptsSettings", "concepts", "read_concepts", "write_panel"]
