"""Any ``nn.Module`` as a :class:`~atlas.models.network.Network`: :func:`wrap` (a module plus its preprocessing and
class names), and the loaders behind ``--model timm:NAME`` (:func:`load_timm`) and ``--model PACKAGE.MODULE:FACTORY``
(:func:`load_factory`).

A wrapped module takes RGB [0, 1] images like every other model of atlas: the normalisation (mean, std) is folded into
a front module, and the resize, crop and interpolation are recorded in ``Network.preprocess`` for the image loader.
Transformer token layers are read as positions: the hooks of :class:`Network` drop the prefix tokens (class and
register tokens) and reshape the patch tokens to (D, h, w), so every stage sees (C, H, W).
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from atlas.errors import AtlasError
from atlas.models.network import Network
from atlas.models.weights import imagenet_classes, reading_weights, sha256

INTERPOLATIONS = ("bilinear", "bicubic")

# Networks wrapped from Python in this process, by name: later stages (render, tiles, units) rebuild a run's model
# from its recorded name, and a module built in the user's own code has no other way back.
_WRAPPED: dict[str, Network] = {}


@dataclass(frozen=True)
class Preprocessing:
    """How images become the model's input: RGB [0, 1], shorter side ``resize`` with ``interpolation``, centre crop
    ``size``, then ``(x - mean) / std`` per channel.

    Parameters
    ----------
    mean : sequence of float, default (0.485, 0.456, 0.406)
        Per-channel mean subtracted (RGB, on the [0, 1] scale).
    std : sequence of float, default (0.229, 0.224, 0.225)
        Per-channel divisor (RGB).
    size : int, default 224
        Side of the centre crop fed to the model (its input size).
    resize : int or None, default None
        Shorter side before the crop; None: ``size / 0.875`` rounded (256 for 224), the usual ImageNet ratio.
    interpolation : str, default "bilinear"
        Resampling of the resize: "bilinear" or "bicubic".
    """

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    size: int = 224
    resize: int | None = None
    interpolation: str = "bilinear"

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise AtlasError(f"preprocessing needs 3 means and 3 positive stds; got mean {self.mean}, std {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise AtlasError(f"unknown interpolation '{self.interpolation}'; choose {' or '.join(INTERPOLATIONS)}")
        if self.resize is None:
            object.__setattr__(self, "resize", int(round(self.size / 0.875)))
        if not 1 <= self.size <= self.resize:
            raise AtlasError(f"preprocessing needs 1 <= size <= resize; got size {self.size}, resize {self.resize}")

    def as_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "size": self.size, "resize": self.resize,
                "interpolation": self.interpolation}


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel: the model's own normalisation, so callers give RGB [0, 1].

    With ``size`` (a model that takes one input size only, such as a ViT with fixed position embeddings), an input of
    another size is first resampled to it (bilinear, differentiable): the renderer's icons (80 px, padded and zoomed
    views) reach the model at its own size, and a direction's centre position is the centre token of that view.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], size: tuple[int, int] | None = None):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            down = x.shape[-2] > self.size[0] or x.shape[-1] > self.size[1]
            x = F.interpolate(x, self.size, mode="bilinear", align_corners=False, antialias=down)
        return (x - self.mean) / self.std


def _token_layout(module: nn.Module) -> tuple[int, tuple[int, int] | None]:
    """(prefix tokens, patch grid) of a transformer (timm's ``num_prefix_tokens`` and ``patch_embed.grid_size``);
    (0, None) for a module with neither."""
    prefix = int(getattr(module, "num_prefix_tokens", 0) or 0)
    grid = getattr(getattr(module, "patch_embed", None), "grid_size", None)
    grid = (int(grid[0]), int(grid[1])) if grid is not None else None
    return prefix, grid


def _fixed_size(module: nn.Module) -> tuple[int, int] | None:
    """The one input size (h, w) a model takes, if it takes only one: timm's patch embedding with ``strict_img_size``
    and no ``dynamic_img_size`` (its position embeddings are for that grid)."""
    embed = getattr(module, "patch_embed", None)
    if embed is None or getattr(module, "dynamic_img_size", False) or not getattr(embed, "strict_img_size", False):
        return None
    size = getattr(embed, "img_size", None)
    return (int(size[0]), int(size[1])) if size is not None else None


def _plain_attention(module: nn.Module) -> None:
    """Attention by its explicit formula (softmax(q k^T) v) instead of F.scaled_dot_product_attention: the fused
    kernel has no forward-mode AD rule in torch (``_scaled_dot_product_flash_attention_for_cpu``), and the sampler's
    attribution is one JVP through the network. Same values to float rounding."""
    for sub in module.modules():
        if hasattr(sub, "fused_attn"):
            sub.fused_attn = False


def _state_sha256(module: nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, shapes, bytes): what identifies weights given in memory."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def wrap(module: nn.Module, preprocess: Preprocessing | dict | None = None, classes: Sequence[str] | None = None,
         name: str | None = None, weights: str = "", weights_sha256: str = "") -> Network:
    """A plain ``nn.Module`` (a classifier taking normalised images) as the :class:`Network` every stage uses.

    Parameters
    ----------
    module : torch.nn.Module
        The model; it is put in eval mode with gradients off (not copied). Its module paths (``blocks.6``,
        ``layer3.2``) name its layers.
    preprocess : Preprocessing, dict or None, default None
        Its input preprocessing: a :class:`Preprocessing` or a dict of its fields (mean, std, size, resize,
        interpolation); None: ImageNet's mean and std, 224 px, bilinear.
    classes : sequence of str or None, default None
        Class names in logit order; None: ImageNet's names when the last linear layer has 1,000 outputs, else
        ``class_0``, ``class_1``, ...
    name : str or None, default None
        The name runs record; later stages in this process find the network by it. None: the class name of
        ``module``.
    weights : str, default ""
        Where the weights came from (recorded).
    weights_sha256 : str, default ""
        sha256 of the weights; "" computes one over the module's parameters and buffers.

    Returns
    -------
    Network
        Answering to the module's own paths (the front normalisation is hidden), with token layers read as (D, h, w).
    """
    if not isinstance(module, nn.Module):
        raise AtlasError(f"wrap needs a torch.nn.Module; got {type(module).__name__}")
    prep = preprocess if isinstance(preprocess, Preprocessing) else Preprocessing(**(preprocess or {}))
    _plain_attention(module)
    module.eval().requires_grad_(False)
    wrapped = nn.Sequential()
    wrapped.add_module("preprocess", Normalize(prep.mean, prep.std, _fixed_size(module)))
    wrapped.add_module("net", module)
    wrapped.eval().requires_grad_(False)  # inference only: dropout off, BatchNorm on its running statistics
    aliases = {path[len("net."):]: path for path, _ in wrapped.named_modules() if path.startswith("net.")}
    prefix, grid = _token_layout(module)
    names = list(classes) if classes is not None else _default_classes(module)
    net = Network(name=name or type(module).__name__, module=wrapped, aliases=aliases, input_size=prep.size,
                  weights=weights, weights_sha256=weights_sha256 or _state_sha256(module), classes=names,
                  preprocess=prep.as_dict(), prefix_tokens=prefix, patch_grid=grid)
    _WRAPPED[net.name] = net
    return net


def _default_classes(module: nn.Module) -> list[str]:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    n = linears[-1].out_features if linears else 0
    return imagenet_classes(1000) if n == 1000 else [f"class_{i}" for i in range(n)]


def wrapped(name: str) -> Network | None:
    """The network wrapped in this process under ``name``, if any."""
    return _WRAPPED.get(name)


def _read_state(path: Path, what: str) -> dict:
    with reading_weights(path, what):
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # training checkpoints keep the weights one level down
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def _load_weights(module: nn.Module, weights: str | Path, what: str) -> tuple[str, str]:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise AtlasError(f"weights file not found: {path}")
    state = _read_state(path, what)
    want = set(module.state_dict())
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if missing or unexpected:  # strict: every tensor of the model from the file, nothing left over
        parts = [f"{len(missing)} of the model's tensors missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} tensors not in the model (e.g. {unexpected[0]})"] if unexpected else []
        raise AtlasError(f"weights file {path} does not fit {what}: {'; '.join(parts)}")
    with reading_weights(path, what):
        module.load_state_dict(state, strict=True)
    return str(path), sha256(path)


def load_timm(name: str, weights: str | Path | None = None, pretrained: bool = True) -> Network:
    """timm's architecture ``name`` with ``weights`` (a safetensors or .pth state dict, loaded strictly) or, when None
    and ``pretrained``, timm's own pretrained weights (downloaded by timm when online); its preprocessing is timm's
    data config for the model (mean, std, input size, crop ratio, interpolation)."""
    try:
        import timm
    except ImportError:
        raise AtlasError("timm models need timm: pip install 'activation-atlas[timm]'") from None
    try:
        module = timm.create_model(name, pretrained=bool(pretrained and not weights))
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise AtlasError(f"unknown timm model '{name}' (timm.list_models() lists them)") from None
        raise AtlasError(f"timm could not build {name}: {str(exc).splitlines()[0][:160]}") from None
    except OSError as exc:  # no network, no cached file
        raise AtlasError(f"no pretrained weights for timm:{name} ({str(exc).splitlines()[0][:120]}); pass --weights FILE") from None
    label, sha = "", ""
    if weights:
        label, sha = _load_weights(module, weights, f"timm:{name}")
    elif pretrained:
        label = f"timm:{name}"
    config = timm.data.resolve_data_config({}, model=module)
    size = int(config["input_size"][-1])
    prep = Preprocessing(mean=config["mean"], std=config["std"], size=size,
                         resize=math.floor(size / config.get("crop_pct", 0.875)),  # timm's own eval rule
                         interpolation=config["interpolation"] if config["interpolation"] in INTERPOLATIONS else "bilinear")
    return wrap(module, prep, name=f"timm:{name}", weights=label, weights_sha256=sha)


def load_factory(spec: str, weights: str | Path | None = None) -> Network:
    """``PACKAGE.MODULE:FACTORY``: the user's function, called with no arguments, returns an ``nn.Module`` (then wrapped
    with ImageNet preprocessing) or a :class:`Network` (e.g. from :func:`wrap`); ``weights`` is a state dict file
    loaded strictly into the module."""
    where, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(where), attr)
    except ImportError as exc:
        raise AtlasError(f"cannot import {where} for --model {spec}: {exc}") from None
    except AttributeError:
        raise AtlasError(f"{where} has no {attr} (--model {spec})") from None
    made = factory()
    net = made if isinstance(made, Network) else wrap(made) if isinstance(made, nn.Module) else None
    if net is None:
        raise AtlasError(f"{spec} returned {type(made).__name__}, not an nn.Module")
    net.name = spec
    if weights:
        net.weights, net.weights_sha256 = _load_weights(net.module.get_submodule("net"), weights, spec)
    _WRAPPED.pop(spec, None)  # rebuilt from the factory each time, not cached
    return net
