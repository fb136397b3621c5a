"""Feature-inversion rendering: icons for atlas cells, and single-direction visualisations.

``render`` fills ``icons/{layer}/{atlas}/{size}`` of a run; ``visualize`` is the same
optimisation for arbitrary directions, channels or neurons; ``sample_patches`` cuts the
dataset patches behind sample rows (the cheap, honest alternative to optimised icons).
"""

from atlas.render.examples import sample_patches
from atlas.render.optimize import Result, Settings, visualize
from atlas.render.run import PRESETS, render

__all__ = ["PRESETS", "Result", "Settings", "render", "sample_patches", "visualize"]
