"""Feature-inversion rendering: icons for atlas cells, and visualisations of any composed objective.

``render`` fills ``icons/{layer}/{atlas}/{size}`` of a run; ``visualize`` is the same
optimisation for arbitrary directions, channels, neurons or objectives built with
:mod:`atlas.render.objectives` (``direction(...) - 0.1 * l2()``, ``channel(...) + diversity(...)``);
``sample_patches`` cuts the dataset patches behind sample rows (the cheap, honest
alternative to optimised icons). Parameterisations (:mod:`atlas.render.param`) are small
modules: ``decorrelated(fft_image(seeds, size))`` is the default.
"""

from atlas.render import objectives
from atlas.render.examples import sample_patches
from atlas.render.objectives import (
    Objective,
    State,
    channel,
    direction,
    diversity,
    l1,
    l2,
    neuron,
    total_variation,
    wrap_objective,
)
from atlas.render.optimize import Result, Settings, visualize
from atlas.render.param import Parameterization, decorrelated, fft_image
from atlas.render.run import PRESETS, render

__all__ = ["PRESETS", "Objective", "Parameterization", "Result", "Settings", "State", "channel", "decorrelated", "direction",
           "diversity", "fft_image", "l1", "l2", "neuron", "objectives", "render", "sample_patches", "total_variation",
           "visualize", "wrap_objective"]
