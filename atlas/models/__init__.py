"""Model zoo: InceptionV1 (GoogLeNet) as in the Activation Atlas paper, plus torchvision classifiers.

Every model returned by :func:`load_model` takes RGB images in [0, 1] (N, 3, H, W) and
does its own preprocessing, so the sampler and the renderer never see BGR or mean
subtraction. Layers are addressed by name (``mixed4c``) and read with forward hooks,
which lets one mechanism serve early stopping, activation capture and forward-mode
attribution for any architecture.

The package, one module per concern (each imports only those listed before it):

- ``layers``: fast building blocks (``SamePad``, ``LocalResponseNorm``, ``SpaceToDepthConv2d``, ``Preprocess``);
- ``precision``: ``native_bf16``, ``autocast_dtype``;
- ``caffe``: a reader of Caffe's ``.caffemodel`` (protobuf wire format, no Caffe needed);
- ``weights``: the cache, the weights lookup, the checked download and conversion of the BVLC release, file hashes,
  class names;
- ``inception``: the InceptionV1 architecture, its block sizes and key maps, ``inceptionv1()``;
- ``network``: the hook-based ``Network`` every stage uses, ``StopForward``, ``describe_layers``;
- ``inference``: cached inference-only copies (channels-last, fused convolution + ReLU) for passes that only read
  activations: ``inference_net``, ``as_input``, ``channels_last``, ``micro_batch``;
- ``wrap``: any ``nn.Module`` with its preprocessing (``wrap``, ``Preprocessing``), timm's models (``timm:NAME``) and
  the user's factories (``PACKAGE.MODULE:FACTORY``);
- ``zoo``: ``load_model`` and the torchvision classifiers.

Every public name is re-exported here, so ``from atlas.models import X`` is the way to use them. A test that
replaces a function (monkeypatch) must patch it in the module that calls it, e.g. ``atlas.models.weights``.
"""

from __future__ import annotations

from atlas.models.inception import (
    BVLC_BLOCKS,
    INCEPTION_LAYERS,
    LUCID_BLOCKS,
    InceptionV1,
    Mixed,
    inceptionv1,
)
from atlas.models.inference import as_input, channels_last, inference_net, micro_batch
from atlas.models.layers import LocalResponseNorm, Preprocess, SamePad, SpaceToDepthConv2d
from atlas.models.network import Network, StopForward, describe_layers
from atlas.models.precision import autocast_dtype, native_bf16
from atlas.models.weights import (
    BVLC_FILE,
    BVLC_SHA1,
    BVLC_URL,
    DOWNLOAD_TIMEOUT,
    INCEPTION_FILES,
    Fetched,
    cache_dir,
    fetch_weights,
    imagenet_classes,
    local_weights,
    resolve_weights,
    sha256,
    synset_words,
    synset_words_file,
)
from atlas.models.wrap import Preprocessing, wrap
from atlas.models.zoo import GOOGLENET_ALIASES, load_model, load_run_model

__all__ = [
    "BVLC_BLOCKS", "BVLC_FILE", "BVLC_SHA1", "BVLC_URL", "DOWNLOAD_TIMEOUT", "Fetched", "GOOGLENET_ALIASES", "INCEPTION_FILES",
    "INCEPTION_LAYERS", "InceptionV1", "LUCID_BLOCKS", "LocalResponseNorm", "Mixed", "Network", "Preprocess", "Preprocessing", "SamePad",
    "SpaceToDepthConv2d", "StopForward", "as_input", "autocast_dtype", "cache_dir", "channels_last",
    "describe_layers", "fetch_weights", "imagenet_classes", "inceptionv1", "inference_net", "load_model", "load_run_model",
    "local_weights", "micro_batch", "native_bf16", "resolve_weights", "sha256", "synset_words", "synset_words_file", "wrap"
]  # fmt: skip
