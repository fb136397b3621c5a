"""Reading a checkpoint (a state dict of a zoo architecture) into a :class:`atlas.models.Network`, checked key by key.

``atlas weights --weights FILE`` and every checkpoint of ``atlas evolution`` come through :func:`load_checkpoint`.
It accepts, for InceptionV1, the two released forms :func:`atlas.models.load_model` reads (BVLC Caffe names in a
``.safetensors``, Lucid's inception5h names in a ``.pth``) and the model's own module names (what
``net.module.state_dict()`` of an atlas InceptionV1 holds, e.g. a training run's checkpoint); for a torchvision
classifier its torchvision state dict. ``.safetensors``, ``.pth`` and ``.pt`` files; a training checkpoint that wraps
the state dict as ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped. A file of another architecture is one
line naming the first key that does not fit.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from atlas.errors import AtlasError
from atlas.models import (
    BVLC_BLOCKS,
    LUCID_BLOCKS,
    InceptionV1,
    Network,
    imagenet_classes,
    load_model,
    sha256,
)
from atlas.models.inception import _bvlc_key_map, _lucid_key_map  # the key maps of the two weight layouts

SUFFIXES = (".safetensors", ".pth", ".pt")
INCEPTION_NAMES = ("inceptionv1", "inception_v1", "inception5h")


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` / ``.pth`` / ``.pt`` file; one line for a missing or unreadable file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AtlasError(f"checkpoint not found: {path}")
    if path.suffix not in SUFFIXES:
        raise AtlasError(f"checkpoint {path} is not a {', '.join(SUFFIXES)} file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and safetensors errors all mean "not a readable state dict"
        text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")[:120]
        raise AtlasError(f"checkpoint {path} is not a readable state dict ({type(exc).__name__}: {text})") from None
    for wrapper in ("state_dict", "model"):  # training loops often save {"epoch": ..., "state_dict": {...}}
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AtlasError(f"checkpoint {path} holds no state dict (a mapping of names to tensors)")
    return state


def _remap(state: dict[str, torch.Tensor], key_map: dict[str, str]) -> dict[str, torch.Tensor]:
    """A released file's names -> the module's; tensors of heads atlas does not build (auxiliary classifiers) are
    left out, as :func:`atlas.models.inceptionv1` does."""
    out = {}
    for key, value in state.items():
        base, _, param = key.rpartition(".")
        if base in key_map:
            out[f"{key_map[base]}.{param}"] = value
    return out


def _inception_variant(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, int]:
    """The state in the module's own names, and the InceptionV1 variant (style, classes) it is of."""
    bases = {k.rpartition(".")[0] for k in state}
    if bases & set(_bvlc_key_map()):
        state, style = _remap(state, _bvlc_key_map()), "caffe"
    elif bases & set(_lucid_key_map()):
        state, style = _remap(state, _lucid_key_map()), "tf"
    else:  # the module's own names; the TF variant puts a SamePad before each convolution (index 1, not 0)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        style = "tf" if "conv2d0.1.weight" in state else "caffe"
    logits = state.get("logits.weight")
    classes = int(logits.shape[0]) if isinstance(logits, torch.Tensor) and logits.dim() == 2 else (1008 if style == "tf" else 1000)
    return state, style, classes


@functools.lru_cache(maxsize=4)
def _inception_shapes(style: str, classes: int) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in an InceptionV1 of that variant (built once: a sequence of checkpoints is checked
    against it without building a model per file)."""
    module = InceptionV1(LUCID_BLOCKS if style == "tf" else BVLC_BLOCKS, classes, style=style)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def check_fits(state: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]], path: Path, model: str) -> None:
    """One line naming the first key (in the architecture's order, ``want``: key -> shape) that is missing, of another
    shape or not the architecture's at all."""
    for key, shape in want.items():
        if key not in state:
            first = next(iter(state), "none")
            raise AtlasError(f"checkpoint {path} is not {model} weights: first mismatching key '{key}' is missing "
                             f"(the checkpoint's first key is '{first}')")
        if tuple(state[key].shape) != tuple(shape):
            raise AtlasError(f"checkpoint {path} is not {model} weights: first mismatching key '{key}' has shape "
                             f"{tuple(state[key].shape)}, {model} has {tuple(shape)}")
    extra = [k for k in state if k not in want]
    if extra:
        raise AtlasError(f"checkpoint {path} is not {model} weights: first mismatching key '{extra[0]}' is not in {model}")


def check_checkpoint(path: str | Path, model: str = "inceptionv1") -> None:
    """What :func:`load_checkpoint` checks (the file reads and fits the architecture), without building the model
    (InceptionV1) or keeping its weights: to check every checkpoint of a sequence before any work."""
    path = Path(path).expanduser()
    state = read_state(path)
    if model in INCEPTION_NAMES:
        state, style, classes = _inception_variant(state)
        check_fits(state, _inception_shapes(style, classes), path, "InceptionV1")
        return
    inner = load_model(model, None, "cpu", pretrained=False).module.get_submodule("net")
    check_fits(_torchvision_keys(state), _shapes(inner), path, model)


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _torchvision_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's own names: no DataParallel ``module.`` or atlas wrapper ``net.`` prefix, no auxiliary heads."""
    return {k.removeprefix("module.").removeprefix("net."): v for k, v in state.items() if not k.startswith("aux")}


def load_checkpoint(path: str | Path, model: str = "inceptionv1", device: str = "cpu") -> Network:
    """A :class:`Network` of architecture ``model`` with the weights of the state dict at ``path``, ready for inference.

    Raises AtlasError (one line) for a missing or unreadable file and for a state dict of another architecture (the
    first mismatching key named).
    """
    path = Path(path).expanduser()
    state = read_state(path)
    if model in INCEPTION_NAMES:
        state, style, classes = _inception_variant(state)
        check_fits(state, _inception_shapes(style, classes), path, "InceptionV1")
        module = InceptionV1(LUCID_BLOCKS if style == "tf" else BVLC_BLOCKS, classes, style=style)
        module.load_state_dict(state)
        net = Network(name="inceptionv1", module=module, weights=str(path), weights_sha256=sha256(path))
        net.module.eval().requires_grad_(False).to(device)
        net.classes = imagenet_classes(module.logits.out_features, path)
        return net
    net = load_model(model, None, device, pretrained=False)  # the architecture alone: no download
    inner = net.module.get_submodule("net")
    state = _torchvision_keys(state)
    check_fits(state, _shapes(inner), path, model)
    inner.load_state_dict(state)
    if hasattr(inner, "transform_input"):  # as load_model does for googlenet / inception_v3 weights
        inner.transform_input = True
    net.weights, net.weights_sha256 = str(path), sha256(path)
    net.module.eval().requires_grad_(False).to(device)
    return net


def random_network(model: str = "inceptionv1", seed: int = 0) -> Network:
    """The architecture ``model`` with PyTorch's default initialisation (seeded): the "before training" reference."""
    torch.manual_seed(seed)
    if model in INCEPTION_NAMES:
        module = InceptionV1(BVLC_BLOCKS, 1000, style="caffe")
        net = Network(name="inceptionv1", module=module, weights="random", weights_sha256="")
        net.module.eval().requires_grad_(False)
        net.classes = imagenet_classes(1000)
        return net
    net = load_model(model, None, "cpu", pretrained=False)
    net.weights = "random"
    return net
