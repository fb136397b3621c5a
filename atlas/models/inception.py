"""InceptionV1 (GoogLeNet) as in the Activation Atlas paper: the architecture in Caffe (BVLC) and TF (Lucid
inception5h) styles, the block sizes of both releases, their weight key maps and :func:`inceptionv1`, which builds
the model from a weights file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from atlas.errors import AtlasError
from atlas.models.layers import LocalResponseNorm, Preprocess, SamePad, SpaceToDepthConv2d

INCEPTION_LAYERS = [
    "conv2d0", "conv2d1", "conv2d2",
    "mixed3a", "mixed3b",
    "mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e",
    "mixed5a", "mixed5b", "logits",
]  # fmt: skip
_MIXED = [n for n in INCEPTION_LAYERS if n.startswith("mixed")]


def _conv(cin: int, cout: int, k: int, stride: int, same: bool) -> nn.Sequential:
    """Convolution + ReLU; Caffe style pads symmetrically, TF style pads 'SAME'."""
    conv = SpaceToDepthConv2d if stride > 1 else nn.Conv2d
    if same:
        return nn.Sequential(SamePad(k, stride), conv(cin, cout, k, stride), nn.ReLU())
    return nn.Sequential(conv(cin, cout, k, stride, padding=k // 2), nn.ReLU())


def _pool(stride: int, same: bool) -> nn.Module:
    """3x3 max pool: Caffe rounds output sizes up (ceil mode), TF pads 'SAME' with -inf."""
    if same:
        return nn.Sequential(SamePad(3, stride, float("-inf")), nn.MaxPool2d(3, stride))
    return nn.MaxPool2d(3, stride, padding=1 if stride == 1 else 0, ceil_mode=True)


class Mixed(nn.Module):
    """An inception block: 1x1, 1x1->3x3, 1x1->5x5 and pool->1x1 branches, concatenated."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int, same: bool):
        super().__init__()
        self.b1 = _conv(cin, c1, 1, 1, same)
        self.b3 = nn.Sequential(_conv(cin, c3r, 1, 1, same), _conv(c3r, c3, 3, 1, same))
        self.b5 = nn.Sequential(_conv(cin, c5r, 1, 1, same), _conv(c5r, c5, 5, 1, same))
        self.bp = nn.Sequential(_pool(1, same), _conv(cin, cp, 1, 1, same))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = (self.b1, self.b3[0], self.b5[0])  # the three 1x1 convolutions (+ ReLU) that read x
        if any(m._forward_hooks or m._forward_pre_hooks for h in heads for m in h.modules()):
            return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)
        # One convolution instead of three: a larger matrix product, +10% per render step on CPU.
        # (A 1x1 'SAME' pad is empty, so only each head's convolution and ReLU are needed.)
        convs = [h[-2] for h in heads]
        fused = F.conv2d(x, torch.cat([c.weight for c in convs]), torch.cat([c.bias for c in convs]))
        out1, mid3, mid5 = (h[-1](part) for h, part in zip(heads, fused.split([c.out_channels for c in convs], 1), strict=True))
        return torch.cat([out1, self.b3[1](mid3), self.b5[1](mid5), self.bp(x)], 1)


class InceptionV1(nn.Module):
    """GoogLeNet / InceptionV1, with the layer names of the paper and Lucid.

    ``style="caffe"`` is the BVLC release (ceil-mode pools, LRN size 5, BGR input minus
    the Caffe mean); ``style="tf"`` is Lucid's ``inception5h`` (TF 'SAME' padding, LRN
    size 9 / beta 0.5, RGB*255 - 117, 1008 classes).
    """

    def __init__(self, blocks: dict[str, tuple[int, ...]], num_classes: int, style: str = "caffe"):
        super().__init__()
        same = style == "tf"
        self.style = style
        if same:
            self.preprocess = Preprocess(bgr=False, mean=(117.0, 117.0, 117.0))
            self.lrn = LocalResponseNorm(9, alpha=9.99999974738e-05, beta=0.5, k=1.0)
        else:
            self.preprocess = Preprocess(bgr=True, mean=(104.0, 117.0, 123.0))
            self.lrn = LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
        self.conv2d0 = _conv(3, 64, 7, 2, same)
        self.conv2d1 = _conv(64, 64, 1, 1, same)
        self.conv2d2 = _conv(64, 192, 3, 1, same)
        self.pool = _pool(2, same)
        for name in _MIXED:
            setattr(self, name, Mixed(*blocks[name], same=same))
        self.logits = nn.Linear(blocks["mixed5b"][1] + blocks["mixed5b"][3] + blocks["mixed5b"][5] + blocks["mixed5b"][6], num_classes)

    def steps(self) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        """The forward pass as a list of (layer name, function) steps, "" for the unnamed ones (pools, LRN, the
        spatial mean), so a pass can start after a layer (:meth:`forward_after`)."""
        pool, lrn = self.pool, self.lrn
        named = lambda *names: [(name, getattr(self, name)) for name in names]  # noqa: E731
        return [*named("preprocess", "conv2d0"), ("", pool), ("", lrn), *named("conv2d1", "conv2d2"), ("", lrn), ("", pool),
                *named("mixed3a", "mixed3b"), ("", pool), *named("mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e"),
                ("", pool), *named("mixed5a", "mixed5b"), ("", lambda x: x.mean((2, 3))), *named("logits")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, step in self.steps():
            x = step(x)
        return x

    def forward_after(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """The logits, from ``x``, the output of the named ``layer`` (the steps after it)."""
        steps = self.steps()
        names = [name for name, _ in steps]
        if not layer or layer not in names:
            raise AtlasError(f"'{layer}' is not a layer of the InceptionV1 forward pass; layers: {', '.join(n for n in names if n)}")
        for _, step in steps[names.index(layer) + 1 :]:
            x = step(x)
        return x


BVLC_BLOCKS: dict[str, tuple[int, ...]] = {
    "mixed3a": (192, 64, 96, 128, 16, 32, 32),
    "mixed3b": (256, 128, 128, 192, 32, 96, 64),
    "mixed4a": (480, 192, 96, 208, 16, 48, 64),
    "mixed4b": (512, 160, 112, 224, 24, 64, 64),
    "mixed4c": (512, 128, 128, 256, 24, 64, 64),
    "mixed4d": (512, 112, 144, 288, 32, 64, 64),
    "mixed4e": (528, 256, 160, 320, 32, 128, 128),
    "mixed5a": (832, 256, 160, 320, 32, 128, 128),
    "mixed5b": (832, 384, 192, 384, 48, 128, 128),
}
# Lucid's inception5h differs only in mixed4a's 3x3 branch (204 channels, so 508 out).
LUCID_BLOCKS = BVLC_BLOCKS | {
    "mixed4a": (480, 192, 96, 204, 16, 48, 64),
    "mixed4b": (508, 160, 112, 224, 24, 64, 64),
}

_BRANCHES = {"1x1": "b1.0", "3x3_reduce": "b3.0.0", "3x3": "b3.1.0", "5x5_reduce": "b5.0.0", "5x5": "b5.1.0", "pool_proj": "bp.1.0"}
_LUCID_BRANCHES = {
    "1x1": "1x1", "3x3_reduce": "3x3_bottleneck", "3x3": "3x3", "5x5_reduce": "5x5_bottleneck", "5x5": "5x5", "pool_proj": "pool_reduce",
}


def _bvlc_key_map() -> dict[str, str]:
    """Caffe layer names -> our module paths (without .weight/.bias)."""
    keys = {"conv1/7x7_s2": "conv2d0.0", "conv2/3x3_reduce": "conv2d1.0", "conv2/3x3": "conv2d2.0", "loss3/classifier": "logits"}
    for name in _MIXED:
        for caffe, ours in _BRANCHES.items():
            keys[f"inception_{name[5:]}/{caffe}"] = f"{name}.{ours}"
    return keys


def _lucid_key_map() -> dict[str, str]:
    """Lucent's inception5h.pth names -> our module paths (TF style adds a SamePad at index 0)."""
    keys = {
        "conv2d0_pre_relu_conv": "conv2d0.1",
        "conv2d1_pre_relu_conv": "conv2d1.1",
        "conv2d2_pre_relu_conv": "conv2d2.1",
        "softmax2_pre_activation_matmul": "logits",
    }
    for name in _MIXED:
        for caffe, lucid in _LUCID_BRANCHES.items():
            ours = _BRANCHES[caffe].split(".")
            ours[-1] = "1"  # the conv sits after its SamePad
            keys[f"{name}_{lucid}_pre_relu_conv"] = f"{name}." + ".".join(ours)
    return keys


def _remap(state: dict[str, torch.Tensor], key_map: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        base, _, param = key.rpartition(".")
        if base in key_map:
            out[f"{key_map[base]}.{param}"] = torch.as_tensor(value)
    return out


def inceptionv1(weights: str | Path) -> InceptionV1:
    """InceptionV1 with the weights of the file ``weights``: BVLC Caffe (.safetensors) or Lucid's inception5h (.pth).

    Finding (or fetching) the file is :func:`atlas.models.weights.resolve_weights`'s, which ``load_model`` calls first:
    the architecture does not depend on where weights come from (and the fetch converts into this architecture)."""
    path = Path(weights)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
        model = InceptionV1(BVLC_BLOCKS, state["loss3/classifier.weight"].shape[0], style="caffe")
        mapped = _remap(state, _bvlc_key_map())
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = InceptionV1(LUCID_BLOCKS, state["softmax2_pre_activation_matmul.weight"].shape[0], style="tf")
        mapped = _remap(state, _lucid_key_map())
    missing, _ = model.load_state_dict(mapped, strict=False)
    if missing:
        raise AtlasError(f"weights file {path} does not fit InceptionV1: missing {len(missing)} tensors, e.g. {missing[0]}")
    return model
