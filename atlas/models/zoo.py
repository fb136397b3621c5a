"""The model zoo: :func:`load_model` by name, InceptionV1 or any torchvision classifier (wrapped to take RGB [0, 1]
and to answer to our layer names, e.g. googlenet's ``mixed4c``), with its weights found, checked and hashed.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from atlas.errors import AtlasError
from atlas.models.inception import BVLC_BLOCKS, INCEPTION_LAYERS, InceptionV1, inceptionv1
from atlas.models.layers import Preprocess
from atlas.models.network import Network
from atlas.models.weights import download_reason, imagenet_classes, local_weights, reading_weights, resolve_weights, sha256

# torchvision's googlenet names its blocks inception3a ... inception5b.
GOOGLENET_ALIASES = {n: "inception" + n[len("mixed") :] for n in INCEPTION_LAYERS if n.startswith("mixed")} | {"logits": "fc"}


def load_model(name: str = "inceptionv1", weights: str | Path | None = None, device: str = "cpu", pretrained: bool = True) -> Network:
    """Load a model of the zoo by name, ready for inference on ``device``.

    ``inceptionv1`` reads BVLC (.safetensors) or Lucid inception5h (.pth) weights, found by
    :func:`resolve_weights`; any other name is a torchvision classifier, with ``weights`` a
    local state dict or, when None, torchvision's pretrained weights from torch's own hub cache
    (``torch.hub.get_dir()/checkpoints``, where torchvision itself keeps them: one copy per machine), downloaded
    there with torchvision's hash check when missing.
    ``timm:NAME`` is timm's architecture (:func:`atlas.models.wrap.load_timm`), ``torchvision:NAME`` the same as
    ``NAME``, ``PACKAGE.MODULE:FACTORY`` the user's own (:func:`atlas.models.wrap.load_factory`), and a name given to
    :func:`atlas.models.wrap.wrap` in this process that network.
    ``pretrained=False`` builds the architecture alone when no weights are given (enough
    to list layers): no download, random parameters; for InceptionV1 it still reads local
    weights when there are some, since they decide the variant (BVLC or Lucid).
    """
    from atlas.settings import check_device

    check_device(device)  # before reading weights: --device cuda without a GPU is one line, not a torch traceback
    if name in ("inceptionv1", "inception_v1", "inception5h"):
        path = resolve_weights(weights) if pretrained else local_weights(weights)
        if path is None:
            net = Network(name="inceptionv1", module=InceptionV1(BVLC_BLOCKS, 1000, style="caffe"), weights="", weights_sha256="")
        else:
            with reading_weights(path, "InceptionV1"):
                module = inceptionv1(path)
            net = Network(name="inceptionv1", module=module, weights=str(path), weights_sha256=sha256(path))
    elif name.startswith("timm:"):
        from atlas.models.wrap import load_timm

        net = load_timm(name[len("timm:"):], weights, pretrained)
    elif ":" in name and not name.startswith("torchvision:"):
        from atlas.models.wrap import load_factory, wrapped

        net = wrapped(name) if not weights and wrapped(name) is not None else load_factory(name, weights)
    else:
        from atlas.models.wrap import wrapped

        known = wrapped(name)
        if known is not None and not weights:  # a module wrapped in this process (atlas.models.wrap): no other way back
            return replace(known, module=known.module.to(device))
        net = _torchvision(name.removeprefix("torchvision:"), weights, pretrained)
    net.module.eval().requires_grad_(False).to(device)
    if not net.classes:
        net.classes = imagenet_classes(_num_classes(net.module), net.weights)
    return net


def _num_classes(module: nn.Module) -> int:
    last = [m for m in module.modules() if isinstance(m, nn.Linear)][-1]
    return last.out_features


def _torchvision_state(name: str, default) -> tuple[dict, Path]:
    """torchvision's pretrained state dict for ``default`` (a Weights entry), from torch's hub cache or downloaded into it.

    The folder is torch's own (``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``), the
    one ``torchvision.models.resnet50(weights="DEFAULT")`` uses: weights a user already has are found, not fetched twice.
    """
    model_dir = Path(torch.hub.get_dir()) / "checkpoints"
    file = model_dir / Path(urllib.parse.urlsplit(default.url).path).name
    try:
        # check_hash: torchvision's file names carry the first hex digits of the file's sha256
        state = torch.hub.load_state_dict_from_url(default.url, model_dir=str(model_dir), map_location="cpu", progress=True,
                                                   check_hash=True, weights_only=True)
    except RuntimeError as exc:
        if "hash" not in str(exc):
            raise
        raise AtlasError(f"downloaded {default.url} failed torchvision's sha256 check ({exc}); not used") from None
    except (OSError, ValueError) as exc:
        raise AtlasError(f"no torchvision weights for {name}: none in {model_dir}; tried to download {default.url} and couldn't "
                         f"({download_reason(exc)}); pass --weights PATH to a local state dict") from None
    return state, file


def _torchvision(name: str, weights: str | Path | None, pretrained: bool = True) -> Network:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        known = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models)))
        raise AtlasError(f"unknown model '{name}'; choose inceptionv1 or a torchvision classifier: {known}") from None
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    module = builder(weights=None, **kwargs)
    label, sha = "", ""
    if weights or pretrained:
        if weights:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise AtlasError(f"weights file not found: {path}")
            with reading_weights(path, name):
                state = torch.load(path, map_location="cpu", weights_only=True)
            label = str(path)
        else:
            default = torchvision.models.get_model_weights(name).DEFAULT
            state, path = _torchvision_state(name, default)
            label = f"torchvision:{default}"
        state = {k: v for k, v in state.items() if not k.startswith("aux")}  # the auxiliary heads are not built
        with reading_weights(path, name):
            module.load_state_dict(state)
        sha = sha256(path)
    if hasattr(module, "transform_input"):
        # googlenet / inception_v3 weights expect torchvision's input transform (it is on when torchvision loads them itself)
        module.transform_input = bool(label)
    wrapped = nn.Sequential()
    wrapped.add_module("preprocess", Preprocess(bgr=False, mean=(0.485, 0.456, 0.406), scale=1.0))
    # ImageNet std division, folded into the wrapper so callers give plain RGB [0, 1].
    wrapped.add_module("std", _Scale((0.229, 0.224, 0.225)))
    wrapped.add_module("net", module)
    aliases = {}
    if name == "googlenet":
        aliases = {k: "net." + v for k, v in GOOGLENET_ALIASES.items()}
    return _prefixed(Network(name=name, module=wrapped, aliases=aliases, weights=label, weights_sha256=sha))


class _Scale(nn.Module):
    def __init__(self, std: Sequence[float]):
        super().__init__()
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.std


def _prefixed(net: Network) -> Network:
    """Let users write torchvision module paths without the wrapper's 'net.' prefix."""
    inner = [n for n, _ in net.module.named_modules() if n.startswith("net.")]
    for path in inner:
        net.aliases.setdefault(path[len("net.") :], path)
    return net


def load_run_model(attrs: dict, device: str = "cpu") -> Network:
    """The model a run was sampled with, from its store's root ``attrs`` (``model``, ``weights``, ``weights_sha256``).

    torchvision weights recorded as ``torchvision:NAME`` come from torchvision's cache again; a weights file whose
    sha256 differs from the recorded one is one line (the run's samples were computed with other weights).
    """
    model = attrs.get("model")
    if not model:
        raise AtlasError("the run's store has no 'model' attribute; run `atlas sample` first")
    weights = attrs.get("weights") or None
    if weights and str(weights).startswith(("torchvision:", "timm:")):
        weights = None
    net = load_model(str(model), weights, device)
    want = attrs.get("weights_sha256") or ""
    if want and net.weights_sha256 and want != net.weights_sha256:
        raise AtlasError(f"weights {net.weights} differ from the ones this run was sampled with (sha256 {want[:12]}...)")
    return net
