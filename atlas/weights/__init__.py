"""Weights you can look at: filter sheets, features over training, and the reconstructed equivalent model.

- :func:`filter_sheet` / :func:`write_filters` (:mod:`atlas.weights.filters`): a convolution's filters as images,
  the first layer's in colour (``atlas weights``), with :func:`filter_stats` (high-frequency share, colour opponency);
- :func:`evolution` (:mod:`atlas.weights.evolution`): each unit's strongest patch and its projection at every
  checkpoint of a training run (Zeiler & Fergus 2014, Fig. 4; ``atlas evolution``);
- :func:`load_checkpoint` (:mod:`atlas.weights.checkpoint`): a state dict of a zoo architecture as a Network, checked.

docs/weights.md describes them.
"""

from __future__ import annotations

from atlas.weights.checkpoint import load_checkpoint, random_network
from atlas.weights.evolution import evolution, evolve, write_evolution
from atlas.weights.filters import filter_sheet, filter_stats, input_filters, write_filters
from atlas.weights.reconstruct import reconstruct, reconstruct_report, table_markdown

__all__ = ["evolution", "evolve", "filter_sheet", "filter_stats", "input_filters", "load_checkpoint", "random_network",
           "reconstruct", "reconstruct_report", "table_markdown", "write_evolution", "write_filters"]
