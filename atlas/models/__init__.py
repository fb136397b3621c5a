"""Model zoo: InceptionV1 (GoogLeNet) as in the Activation Atlas paper, plus torchvision classifiers.

Every model returned by :func:`load_model` takes RGB images in [0, 1] (N, 3, H, W) and
does its own preprocessing, so the sampler and the renderer never see BGR or mean
subtraction. Layers are addressed by name (``mixed4c``) and read with forward hooks,
which lets one mechanism serve early stopping, activation capture and forward-mode
attribution for any architecture.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from atlas.errors import AtlasError

INCEPTION_LAYERS = [
    "conv2d0", "conv2d1", "conv2d2",
    "mixed3a", "mixed3b",
    "mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e",
    "mixed5a", "mixed5b", "logits",
]  # fmt: skip
_MIXED = [n for n in INCEPTION_LAYERS if n.startswith("mixed")]
# torchvision's googlenet names its blocks inception3a ... inception5b.
GOOGLENET_ALIASES = {n: "inception" + n[len("mixed") :] for n in _MIXED} | {"logits": "fc"}


# --------------------------------------------------------------------------------------
# InceptionV1
# --------------------------------------------------------------------------------------
class SamePad(nn.Module):
    """TensorFlow 'SAME' padding for a k x k window with the given stride (TF pads more on the bottom/right)."""

    def __init__(self, kernel: int, stride: int, value: float = 0.0):
        super().__init__()
        self.kernel, self.stride, self.value = kernel, stride, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            out = -(-size // self.stride)
            total = max((out - 1) * self.stride + self.kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads, value=self.value)


def _lrn_base(x: torch.Tensor, band: torch.Tensor, scale: float, k: float) -> torch.Tensor:
    """k + scale * (sum of squares over each channel's window): what LRN raises to -beta."""
    return F.conv2d(x * x, band) * scale + k


class _LocalResponseNorm(torch.autograd.Function):
    """y = x * (k + a * band(x^2))^-beta, with a backward that reuses the forward's power.

    Autograd of the plain expression computes a second ``pow`` and keeps more
    intermediates; here d^(-beta-1) is (d^-beta) / d.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, band: torch.Tensor, scale: float, beta: float, k: float) -> torch.Tensor:
        d = _lrn_base(x, band, scale, k)
        r = torch.exp(torch.log(d) * -beta)
        ctx.save_for_backward(x, d, r, band)
        ctx.scale, ctx.beta = scale, beta
        return x * r

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, d, r, band = ctx.saved_tensors
        gr = grad * r
        back = F.conv2d(gr * x / d, band.transpose(0, 1))
        return gr - (2.0 * ctx.scale * ctx.beta) * x * back, None, None, None, None


class LocalResponseNorm(nn.Module):
    """Cross-channel local response normalisation: the function of ``nn.LocalResponseNorm``, faster.

    The sum of squares over each channel's window is a 1x1 convolution with a 0/1 band
    matrix, which oneDNN runs as one matrix product in either memory format (torch's own
    version average-pools a padded 5-D view, slow in channels-last and in bf16).
    """

    def __init__(self, size: int, alpha: float, beta: float, k: float):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k
        self._bands: dict[tuple, torch.Tensor] = {}

    def _band(self, channels: int, like: torch.Tensor) -> torch.Tensor:
        key = (channels, like.dtype, like.device)
        if key not in self._bands:
            # Made outside inference mode even when first asked for inside it (layer_shapes, sampling without
            # attribution): a cached inference tensor could not be saved for the renderer's backward pass.
            with torch.inference_mode(False):
                c = torch.arange(channels)
                offset = c[None, :] - c[:, None]  # input channel minus output channel
                band = ((offset >= -(self.size // 2)) & (offset <= (self.size - 1) // 2)).to(like.dtype)
                self._bands[key] = band.view(channels, channels, 1, 1).to(like.device)
        return self._bands[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        band = self._band(x.shape[1], x)
        if torch.is_grad_enabled() and x.requires_grad:  # backward-mode: the function above (forward-mode AD uses the plain path)
            return _LocalResponseNorm.apply(x, band, self.alpha / self.size, self.beta, self.k)
        return x * _lrn_base(x, band, self.alpha / self.size, self.k).pow(-self.beta)


class SpaceToDepthConv2d(nn.Conv2d):
    """A strided convolution computed as a stride-1 one on a space-to-depth view of its input.

    Same parameters and function as ``nn.Conv2d`` (kernel zero-padded to a multiple of the
    stride and regrouped; input padded to a multiple of the stride). It exists for the
    gradient with respect to the image, which feature visualisation needs every step: for
    InceptionV1's first layer (7x7, stride 2, 3 input channels) oneDNN computes that
    gradient 2x faster at stride 1 (bf16: 16.5 ms against 7.6 ms for 32 images of 80 px).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, k, p = self.stride[0], self.kernel_size[0], self.padding[0]
        if self.stride != (s, s) or self.kernel_size != (k, k) or self.padding != (p, p) or self.groups != 1 or s == 1:
            return super().forward(x)
        h, w = x.shape[-2:]
        x = F.pad(x, (p, p + (w + 2 * p) % s, p, p + (h + 2 * p) % s))
        kk = -(-k // s) * s
        weight = F.pad(self.weight, (0, kk - k, 0, kk - k))
        cout, cin = weight.shape[:2]
        weight = weight.view(cout, cin, kk // s, s, kk // s, s).permute(0, 1, 3, 5, 2, 4).reshape(cout, cin * s * s, kk // s, kk // s)
        return F.conv2d(F.pixel_unshuffle(x, s), weight, self.bias)


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


class Preprocess(nn.Module):
    """RGB [0, 1] -> the network's own input convention (channel order, scale, mean).

    In channels-last memory it is done as a 1x1 convolution (a permutation times ``scale``,
    minus ``mean``): the same arithmetic as flip, multiply and subtract, and 6x faster in
    bf16, since a flip along the channel axis has no fast kernel there.
    """

    def __init__(self, bgr: bool, mean: Sequence[float], scale: float = 255.0):
        super().__init__()
        self.bgr, self.scale = bgr, scale
        order = torch.eye(3).flip(1) if bgr else torch.eye(3)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("weight", (order * scale).view(3, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return F.conv2d(x, self.weight, -self.mean.view(3))
        return (x.flip(1) if self.bgr else x) * self.scale - self.mean


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(x)
        x = self.lrn(self.pool(self.conv2d0(x)))
        x = self.pool(self.lrn(self.conv2d2(self.conv2d1(x))))
        x = self.mixed3b(self.mixed3a(x))
        x = self.pool(x)
        for name in ("mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e"):
            x = getattr(self, name)(x)
        x = self.mixed5b(self.mixed5a(self.pool(x)))
        return self.logits(x.mean((2, 3)))


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


def inceptionv1(weights: str | Path | None = None) -> InceptionV1:
    """InceptionV1 with BVLC Caffe weights (.safetensors) or Lucid's inception5h (.pth)."""
    path = resolve_weights(weights)
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


# --------------------------------------------------------------------------------------
# Where the weights come from
# --------------------------------------------------------------------------------------
# Lucid's InceptionV1 (inception5h) as ported to PyTorch for lucent. Neither its author nor
# lucent (which downloads it unchecked) has published a sha256 of this file, so there is none
# to check a download against: atlas downloads it but will not use it until the user vouches
# for it (ATLAS_WEIGHTS_SHA256, or --weights pointing at the downloaded file).
LUCENT_URL = "https://github.com/ProGamerGov/pytorch-old-tensorflow-models/raw/master/inception5h.pth"
LUCENT_SHA256: str | None = None
INCEPTION_FILES = ("bvlc_googlenet.safetensors", "inception5h.pth")  # what the cache may hold, in order of preference
DOWNLOAD_TIMEOUT = 30.0  # seconds without a byte before a download counts as failed


def cache_dir() -> Path:
    """atlas's user cache: ``$XDG_CACHE_HOME/atlas``, else ``~/.cache/atlas`` (a relative XDG path is ignored, as the spec says)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "atlas"


def local_weights(weights: str | Path | None) -> Path | None:
    """The InceptionV1 weights file already on this machine: ``weights`` > ``$ATLAS_WEIGHTS`` > the cache; None if none.

    A given ``weights`` or ``$ATLAS_WEIGHTS`` that is not a file is an error, never skipped.
    """
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise AtlasError(f"weights file not found: {path}")
        return path
    env = os.environ.get("ATLAS_WEIGHTS")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise AtlasError(f"weights file not found: {path} (from ATLAS_WEIGHTS)")
        return path
    for name in INCEPTION_FILES:
        if (cache_dir() / name).is_file():
            return cache_dir() / name
    return None


def resolve_weights(weights: str | Path | None) -> Path:
    """The InceptionV1 weights file to load: ``weights`` > ``$ATLAS_WEIGHTS`` > the user cache > a checked download into it.

    The download is ``$ATLAS_WEIGHTS_URL`` (default: lucent's inception5h.pth) and is used only
    when its sha256 equals the known one (``$ATLAS_WEIGHTS_SHA256``; none is published for the
    default file, see ``LUCENT_SHA256``).
    """
    path = local_weights(weights)
    if path is not None:
        return path
    url = os.environ.get("ATLAS_WEIGHTS_URL") or LUCENT_URL
    want = (os.environ.get("ATLAS_WEIGHTS_SHA256") or (LUCENT_SHA256 if url == LUCENT_URL else None) or "").strip().lower() or None
    name = Path(urllib.parse.urlsplit(url).path).name or "weights.pth"
    target = cache_dir() / name
    looked = f"--weights not given, ATLAS_WEIGHTS unset, none of {', '.join(INCEPTION_FILES)} in {cache_dir()}"
    if target.is_file():  # an earlier checked download from this URL (a name other than INCEPTION_FILES)
        return target
    unverified = target.with_name(name + ".unverified")
    if not unverified.is_file():
        try:
            _download(url, unverified)
        except (OSError, ValueError) as exc:  # URLError and timeouts are OSErrors; ValueError: a malformed URL
            raise AtlasError(f"no InceptionV1 weights ({looked}); tried to download {url} and couldn't ({_reason(exc)}); "
                             "pass --weights PATH (BVLC .safetensors or lucent's inception5h.pth) or set ATLAS_WEIGHTS") from None
    got = _sha256(unverified)
    if want is None:
        raise AtlasError(f"downloaded {url} to {unverified}, but no sha256 is known for it, so atlas will not use it unchecked "
                         f"(its sha256 is {got}): if you trust it, set ATLAS_WEIGHTS_SHA256={got} or pass --weights {unverified}")
    if got != want:
        unverified.unlink()
        raise AtlasError(f"downloaded {url} has sha256 {got}, not the expected {want}; deleted it, not used "
                         "(pass --weights PATH to a file you trust)")
    os.replace(unverified, target)
    return target


def _download(url: str, dest: Path) -> None:
    """Stream ``url`` into ``dest`` through a ``.partial`` file, so an interrupted download never looks complete.

    The progress bar appears only once the server answers: a failed connection prints nothing
    but the caller's one-line error.
    """
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}", leave=False) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)


def _reason(exc: BaseException) -> str:
    """A short cause for a failed download: the URLError's reason, else the exception's own text."""
    reason = getattr(exc, "reason", None) or exc
    text = getattr(reason, "strerror", None) or str(reason)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------
# Class names
# --------------------------------------------------------------------------------------
def synset_words(weights: str | Path | None = None) -> list[tuple[str, str]]:
    """(synset, name) pairs from a ``synset_words.txt`` beside the weights, else in the user cache; [] if none.

    The file (Caffe's ILSVRC-2012 list: one ``nXXXXXXXX name, synonyms`` line per class, in
    logit order) is not shipped with atlas; without it class names come from torchvision's
    list and synset ids are unknown (see :func:`imagenet_classes`).
    """
    path = synset_words_file(weights)
    if path is None:
        return []
    lines = path.read_text().splitlines()
    return [(ln.split(" ", 1)[0], ln.split(" ", 1)[1].split(",")[0].strip()) for ln in lines if ln.strip()]


def synset_words_file(weights: str | Path | None = None) -> Path | None:
    """The ``synset_words.txt`` :func:`synset_words` reads, or None.

    Looked for beside the weights file (by default the one :func:`local_weights` finds), then in the user cache.
    """
    if weights is None:  # the default weights (ATLAS_WEIGHTS or the cache) carry their class list beside them
        try:
            weights = local_weights(None)
        except AtlasError:
            weights = None
    places = [Path(weights).expanduser().parent] if weights and not str(weights).startswith("torchvision:") else []
    places.append(cache_dir())
    for place in places:
        if (place / "synset_words.txt").is_file():
            return place / "synset_words.txt"
    return None


def imagenet_classes(num_classes: int = 1000, weights: str | Path | None = None) -> list[str]:
    """Human-readable class names in logit order (synset_words.txt, else torchvision's list)."""
    words = synset_words(weights)
    if len(words) == 1000 and num_classes in (1000, 1008):
        names = [name for _, name in words]
    else:
        from torchvision.models._meta import _IMAGENET_CATEGORIES

        names = list(_IMAGENET_CATEGORIES)
    if num_classes == 1008:  # Lucid's labels: index 0 is 'dummy', then the 1000 classes, then 7 unused
        return ["dummy"] + names + [f"unused_{i}" for i in range(7)]
    if num_classes == 1000:
        return names
    return [f"class_{i}" for i in range(num_classes)]


# --------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------
def native_bf16(device: str | torch.device) -> bool:
    """True where bf16 maths is native: CUDA with bf16, or a CPU with avx512_bf16/AMX (elsewhere bf16 is emulated, slower)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def autocast_dtype(precision: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision name (auto, float32/fp32, bfloat16/bf16); None means float32."""
    names = {"float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    if precision not in names:
        raise AtlasError(f"unknown precision '{precision}'; choose auto, float32 or bfloat16")
    return names[precision]


# --------------------------------------------------------------------------------------
# The wrapper every stage uses
# --------------------------------------------------------------------------------------
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_model(name: str = "inceptionv1", weights: str | Path | None = None, device: str = "cpu", pretrained: bool = True) -> Network:
    """Load a model of the zoo by name, ready for inference on ``device``.

    ``inceptionv1`` reads BVLC (.safetensors) or Lucid inception5h (.pth) weights, found by
    :func:`resolve_weights`; any other name is a torchvision classifier, with ``weights`` a
    local state dict or, when None, torchvision's pretrained weights from the user cache
    (``cache_dir()/torchvision``), downloaded there with torchvision's hash check when missing.
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
            with _weights_file(path, "InceptionV1"):
                module = inceptionv1(path)
            net = Network(name="inceptionv1", module=module, weights=str(path), weights_sha256=_sha256(path))
    else:
        net = _torchvision(name, weights, pretrained)
    net.module.eval().requires_grad_(False).to(device)
    num_classes = _num_classes(net.module)
    net.classes = imagenet_classes(num_classes, net.weights)
    return net


@contextmanager
def _weights_file(path: Path, model: str) -> Iterator[None]:
    """Turn any failure to read or fit a weights file (random bytes, a truncated download, another model's
    tensors) into one line naming the file; torch's and safetensors' own messages span many lines."""
    try:
        yield
    except AtlasError:
        raise
    except Exception as exc:  # noqa: BLE001 - pickle, safetensors, zip and shape errors all mean "not this model's weights"
        text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")[:160]
        if isinstance(exc, KeyError):
            reason = f"it has no tensor {exc.args[0]!r}"
        elif type(exc).__name__ == "SafetensorError":
            reason = f"not a safetensors file: {text}"
        elif "state_dict" in text:
            reason = f"its tensors do not fit: {text}"
        else:  # torch.load's own first line (e.g. "Weights only load failed ...") says nothing about the file
            reason = f"not a PyTorch state dict that torch.load can read: {type(exc).__name__}"
        raise AtlasError(f"weights file {path} is not readable {model} weights ({reason}); pass --weights PATH to a valid file") from None


def _num_classes(module: nn.Module) -> int:
    last = [m for m in module.modules() if isinstance(m, nn.Linear)][-1]
    return last.out_features


def _torchvision_state(name: str, default) -> tuple[dict, Path]:
    """torchvision's pretrained state dict for ``default`` (a Weights entry), from the user cache or downloaded into it."""
    model_dir = cache_dir() / "torchvision"
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
                         f"({_reason(exc)}); pass --weights PATH to a local state dict") from None
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
            with _weights_file(path, name):
                state = torch.load(path, map_location="cpu", weights_only=True)
            label = str(path)
        else:
            default = torchvision.models.get_model_weights(name).DEFAULT
            state, path = _torchvision_state(name, default)
            label = f"torchvision:{default}"
        state = {k: v for k, v in state.items() if not k.startswith("aux")}  # the auxiliary heads are not built
        with _weights_file(path, name):
            module.load_state_dict(state)
        sha = _sha256(path)
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


def describe_layers(net: Network, size: int | None = None) -> list[dict]:
    """Rows for ``atlas layers``: name, channels and spatial size at the input size."""
    rows = []
    for name, shape in net.layer_shapes(size).items():
        if re.match(r"^net\.", name):
            continue
        height, width = (shape[1], shape[2]) if len(shape) == 3 else (1, 1)
        rows.append({"layer": name, "channels": shape[0], "height": height, "width": width})
    return rows
