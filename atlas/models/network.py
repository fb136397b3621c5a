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
    # How images become the input (atlas.models.wrap.Preprocessing.as_dict); empty: ImageNet's, resize 256, bilinear.
    preprocess: dict = field(default_factory=dict)
    # Transformers: tokens before the patch tokens (class, registers) and the patch grid (h, w); see tokens_to_grid.
    prefix_tokens: int = 0
    patch_grid: tuple[int, int] | None = None

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
        return list(dict.fromkeys(list(self.aliases) + names))

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
                grid = self.tokens_to_grid(output)
                if grid is not None:  # a token layer: stages see (N, D, h, w), the model goes on with its tokens
                    replaced = edit(layer, grid) if edit is not None else None
                    captured[layer] = grid if replaced is None else replaced
                    if replaced is not None:
                        output = self.grid_to_tokens(replaced, output)
                    remaining.discard(layer)
                    if stop and not remaining:
                        raise StopForward
                    return output
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

    def tokens_to_grid(self, output) -> torch.Tensor | None:
        """A transformer layer's output (N, T, D) as positions (N, D, h, w): the ``prefix_tokens`` first tokens (class
        and register tokens) dropped, the h * w patch tokens in row-major order reshaped to the patch grid (from the
        model, else square). None for anything else (a CNN's maps, logits, a token count that fits no grid)."""
        if not self.prefix_tokens and self.patch_grid is None:
            return None
        if not isinstance(output, torch.Tensor) or output.ndim != 3:
            return None
        t = output.shape[1]
        grid = self.patch_grid
        for prefix in dict.fromkeys((self.prefix_tokens, 0)):  # patch_embed's output has no prefix tokens yet
            n = t - prefix
            h, w = grid if grid is not None and grid[0] * grid[1] == n else (round(n ** 0.5),) * 2
            if n > 0 and h * w == n:
                patches = output[:, prefix:]
                return patches.transpose(1, 2).reshape(output.shape[0], output.shape[2], h, w)
        return None

    def grid_to_tokens(self, grid: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`tokens_to_grid`: ``grid`` (M, D, h, w) back to tokens, with the prefix tokens of
        ``tokens`` (N, T, D) in front, each repeated M / N times when the grid's batch is (the sampler repeats each
        image once per sampled position)."""
        patches = grid.flatten(2).transpose(1, 2)
        prefix = tokens.shape[1] - patches.shape[1]
        if prefix == 0:
            return patches
        head = tokens[:, :prefix]
        if grid.shape[0] != tokens.shape[0]:
            head = head.repeat_interleave(grid.shape[0] // tokens.shape[0], 0)
        return torch.cat([head, patches], 1)

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
