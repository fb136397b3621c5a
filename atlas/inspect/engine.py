"""The inspection engine: one batched forward of the whole network, every requested layer captured on the way.

This is what every part of ``atlas inspect`` (and the live page) calls per image or per batch of edited images
(occluded, shifted, rotated): :func:`forward` returns the activations of the layers asked for and the logits of the
same pass, so a report never runs the network twice for the same input.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from atlas.data import load_image, to_tensor
from atlas.errors import AtlasError
from atlas.models import Network
from atlas.models.inference import channels_last  # noqa: F401  (re-exported: the inspect engine's channels-last copy)


def forward(net: Network, images: torch.Tensor, layers: Sequence[str] = ()) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Activations of ``layers`` and the logits for a batch of RGB [0, 1] images ``(n, 3, H, W)``, in one pass.

    Runs under ``torch.inference_mode`` (nothing is kept for a backward pass); the activations are the layers'
    outputs as the model computes them (float32 on CPU), the logits ``(n, n_classes)`` float32.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise AtlasError(f"images must be a (n, 3, H, W) tensor, got {got}")
    layers = list(dict.fromkeys(layers))
    for layer in layers:
        net.resolve(layer)  # an unknown layer: one line listing the known ones
    with torch.inference_mode(), net.hooks(layers, stop=False) as captured:
        logits = net.module(images)
    missing = [layer for layer in layers if layer not in captured]
    if missing:
        raise AtlasError(f"layer '{missing[0]}' of model {net.name} was not reached by the forward pass; choose a layer the model runs")
    return {layer: captured[layer] for layer in layers}, logits.float()


def batched_forward(net: Network, images: torch.Tensor, layers: Sequence[str] = (), batch_size: int = 32,
                    reduce=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:func:`forward` over ``images`` in batches of ``batch_size``, results concatenated.

    ``reduce(layer, activation) -> tensor``, if given, is applied to each batch's activations before they are kept
    (e.g. one channel's sum), so a large batch of edited images never holds every layer's full maps at once.
    """
    acts: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    logits = []
    for lo in range(0, images.shape[0], batch_size):
        a, z = forward(net, images[lo:lo + batch_size], layers)
        for layer in layers:
            acts[layer].append(a[layer] if reduce is None else reduce(layer, a[layer]))
        logits.append(z)
    if not logits:
        return {layer: torch.zeros(0) for layer in layers}, torch.zeros(0)
    return {layer: torch.cat(v) for layer, v in acts.items()}, torch.cat(logits)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the classes, in float64 for the small probabilities of occluded or rotated images."""
    return torch.softmax(logits.double(), dim=-1)


def top_classes(logits: torch.Tensor, names: Sequence[str], k: int = 5) -> list[dict]:
    """The ``k`` most probable classes of one image's logits ``(n_classes,)``: ``[{"index", "name", "probability"}]``."""
    p = probabilities(logits.reshape(-1))
    values, index = p.topk(min(k, p.numel()))
    return [{"index": int(i), "name": names[int(i)] if int(i) < len(names) else str(int(i)), "probability": float(v)}
            for v, i in zip(values, index, strict=True)]


def read_image(path: str, resize: int = 256, crop: int = 224, interpolation: str = "bilinear") -> tuple[torch.Tensor, np.ndarray]:
    """One photo as the model sees it (shorter side ``resize`` with ``interpolation``, centre crop ``crop``: the
    model's own, :func:`atlas.data.photo_reading`): the (3, crop, crop) tensor in [0, 1] and the (crop, crop, 3)
    uint8 picture. An unreadable file is one line naming it."""
    if os.path.isdir(path):
        raise AtlasError(f"{path} is a folder; give image files (e.g. {os.path.join(str(path), '*.jpg')})")
    try:
        image = load_image(path, resize, crop, interpolation)
    except FileNotFoundError:
        raise AtlasError(f"{path}: no such file") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise AtlasError(f"{path}: cannot read the image ({' '.join(str(exc).split())[:160]})") from None
    return to_tensor(image), np.asarray(image, dtype=np.uint8)
