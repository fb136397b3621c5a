"""Where the weights and class names come from: the user cache, the lookup order (argument > ``$ATLAS_WEIGHTS`` >
cache > a sha256-checked download), the download itself, file hashes, one-line errors for unreadable weights
files, and the ImageNet class names (``synset_words.txt`` beside the weights, else torchvision's list).
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from atlas.errors import AtlasError

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
            raise AtlasError(f"no InceptionV1 weights ({looked}); tried to download {url} and couldn't ({download_reason(exc)}); "
                             "pass --weights PATH (BVLC .safetensors or lucent's inception5h.pth) or set ATLAS_WEIGHTS") from None
    got = sha256(unverified)
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


def download_reason(exc: BaseException) -> str:
    """A short cause for a failed download: the URLError's reason, else the exception's own text."""
    reason = getattr(exc, "reason", None) or exc
    text = getattr(reason, "strerror", None) or str(reason)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (weights files are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def reading_weights(path: Path, model: str) -> Iterator[None]:
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
