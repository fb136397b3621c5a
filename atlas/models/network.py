"""The wrapper every stage uses: :class:`Network` (a classifier, its layer names, classes and provenance) reads
layers by name with forward hooks, which serve early stopping (:class:`StopForward`), activation capture and
forward-mode attribution for any architecture; :func:`describe_layers` lists the layers for ``atlas layers``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from atlas.errors import AtlasError
from atlas.models.inception import INCEPTION_LAYERS, InceptionV1


class StopForward(Exception):
    """Raised by a hook once the deepest requested layer is computed."""


@dataclass
class Network:
    """A classifier plus what the stages need to know about it: names, layers, classes, provenance."""

    name: str
    module: nn.Module
    aliases: dict[str, str] = field(default_factory=dict)
    input_size: int = 224
    weights: str = ""
    weights_sha256: str = ""
    classes: list[str] = field(default_factory=list)

    def resolve(self, layer: str) -> str:
        """Module path of a layer name; unknown names fail with the list of known ones."""
        path = self.aliases.get(layer, layer)
        modules = dict(self.module.named_modules())
        if path not in modules or path == "":
            known = ", ".join(self.layer_names())
            raise AtlasError(f"unknown layer '{layer}' for model {self.name}; layers: {known}")
        return path

    def layer_names(self) -> list[str]:
        if isinstance(self.module, InceptionV1):
            return list(INCEPTION_LAYERS)
        names = [n for n, _ in self.module.named_modules() if n]
        return list(self.aliases) + names

    def module_of(self, layer: str) -> nn.Module:
        return self.module.get_submodule(self.resolve(layer))

    @contextmanager
    def hooks(self, layers: Sequence[str], edit=None, stop: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        """Capture the outputs of ``layers`` into the yielded dict during a forward.

        ``edit(layer, output)`` may return a replacement output (forward-mode tangents are
        attached this way). With ``stop``, the forward ends right after the deepest layer.
        """
        captured: dict[str, torch.Tensor] = {}
        handles = []
        remaining = set(layers)

        def make_hook(layer: str):
            def hook(_module, _inputs, output):
                if edit is not None:
                    replaced = edit(layer, output)
                    output = output if replaced is None else replaced
                captured[layer] = output
                remaining.discard(layer)
                if stop and not remaining:
                    raise StopForward
                return output

            return hook

        try:
            for layer in layers:
                handles.append(self.module_of(layer).register_forward_hook(make_hook(layer)))
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def activations(self, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Activations of ``layers`` for RGB [0, 1] images, computing no deeper than needed."""
        with self.hooks(layers) as captured:
            try:
                self.module(images)
            except StopForward:
                pass
        return dict(captured)

    def layer_shapes(self, size: int | None = None) -> dict[str, tuple[int, ...]]:
        """(channels, height, width) of every named layer for one input of ``size`` px."""
        size = size or self.input_size
        names = self.layer_names()
        if not isinstance(self.module, InceptionV1):
            names = [n for n in names if n in self.aliases or not list(self.module.get_submodule(n).children())]
        x = torch.zeros(1, 3, size, size)
        shapes = {}
        with torch.inference_mode():
            out = self.activations(x, names)
        for name in names:
            t = out.get(name)
            if isinstance(t, torch.Tensor):
                shapes[name] = tuple(t.shape[1:])
        return shapes


def describe_layers(net: Network, size: int | None = None) -> list[dict]:
    """Rows for ``atlas layers``: name, channels and spatial size at the input size."""
    rows = []
    for name, shape in net.layer_shapes(size).items():
        if re.match(r"^net\.", name):
            continue
        height, width = (shape[1], shape[2]) if len(shape) == 3 else (1, 1)
        rows.append({"layer": name, "channels": shape[0], "height": height, "width": width})
    return rows
