"""Where the weights and class names come from: the user cache, the lookup order (argument > ``$ATLAS_WEIGHTS`` >
cache > a checked download into it), the download of the BVLC GoogLeNet release and its conversion from Caffe's
format to safetensors (:func:`fetch_weights`), file hashes, one-line errors for unreadable weights files, and the
ImageNet class names (``synset_words.txt`` beside the weights, else torchvision's list).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from atlas.errors import AtlasError

# InceptionV1 as trained by BVLC (Caffe model zoo, models/bvlc_googlenet/readme.md): the canonical URL and the
# sha1 published there. The mirrors serve the same file; whichever answers, its sha1 is checked.
BVLC_URL = "http://dl.caffe.berkeleyvision.org/bvlc_googlenet.caffemodel"
BVLC_MIRRORS = (
    "https://dl.caffe.berkeleyvision.org/bvlc_googlenet.caffemodel",
    "https://www.deepdetect.com/downloads/platform/pretrained/caffe/googlenet/bvlc_googlenet.caffemodel",
)
BVLC_SHA1 = "405fc5acd08a3bb12de8ee5e23a96bec22f08204"
BVLC_FILE = "bvlc_googlenet.safetensors"  # the converted weights in the cache
CAFFEMODEL_FILE = "bvlc_googlenet.caffemodel"  # a caffemodel put into the cache by hand is checked and converted
INCEPTION_FILES = (BVLC_FILE, "inception5h.pth")  # what the cache may hold, in order of preference
DOWNLOAD_TIMEOUT = 30.0  # seconds without a byte before a download counts as failed
_DIGITS = {"sha1": 40, "sha256": 64}


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
    """The InceptionV1 weights file to load: ``weights`` > ``$ATLAS_WEIGHTS`` > the user cache > :func:`fetch_weights`.

    Parameters
    ----------
    weights : str, pathlib.Path or None
        A weights file (``.safetensors`` in BVLC's Caffe names, or Lucid's ``inception5h.pth``); None looks further.

    Returns
    -------
    pathlib.Path
        The file; on first use without any, the BVLC release downloaded, checked and converted into the cache.
    """
    path = local_weights(weights)
    if path is not None:
        return path
    try:
        return fetch_weights().path
    except _NotDownloaded as exc:
        looked = f"--weights not given, ATLAS_WEIGHTS unset, none of {', '.join(INCEPTION_FILES)} in {cache_dir()}"
        raise AtlasError(f"no InceptionV1 weights ({looked}) and {exc}") from None


class _NotDownloaded(AtlasError):
    """No URL answered (offline): the message says what to download and where to put it."""


@dataclass
class Fetched:
    """What :func:`fetch_weights` did: ``path`` the weights file in the cache, ``url`` where it came from (None:
    it was in the cache already, or converted from a caffemodel put there by hand: ``source`` names it)."""

    path: Path
    url: str | None
    source: str


def weights_urls() -> list[str]:
    """Where :func:`fetch_weights` downloads from: ``$ATLAS_WEIGHTS_URL`` alone when set, else the canonical URL and its mirrors."""
    env = os.environ.get("ATLAS_WEIGHTS_URL", "").strip()
    return [env] if env else [BVLC_URL, *BVLC_MIRRORS]


def expected_checksums() -> dict[str, str]:
    """The checksums a download must have: ``$ATLAS_WEIGHTS_SHA1`` and/or ``$ATLAS_WEIGHTS_SHA256`` when set (both
    are checked when both are), else the published sha1 of ``bvlc_googlenet.caffemodel``, whatever the URL (an
    ``$ATLAS_WEIGHTS_URL`` serving another file must come with its checksum)."""
    want = {}
    for algo, digits in _DIGITS.items():
        value = os.environ.get(f"ATLAS_WEIGHTS_{algo.upper()}", "").strip().lower()
        if value:
            if len(value) != digits or any(ch not in "0123456789abcdef" for ch in value):
                raise AtlasError(f"ATLAS_WEIGHTS_{algo.upper()}={value!r} is not a {algo} ({digits} hex digits)")
            want[algo] = value
    return want or {"sha1": BVLC_SHA1}


def _stored_name(url: str) -> str:
    """The cache file a download from ``url`` becomes: a ``.safetensors`` is kept as BVLC's, a ``.pth``/``.pt`` as
    Lucid's inception5h (the two formats InceptionV1 reads), anything else is read as a caffemodel and converted."""
    suffix = Path(urllib.parse.urlsplit(url).path).suffix.lower()
    return "inception5h.pth" if suffix in (".pth", ".pt") else BVLC_FILE


def _placed_name(url: str) -> str:
    """Where a user puts by hand the file that ``url`` serves (the offline message says so)."""
    suffix = Path(urllib.parse.urlsplit(url).path).suffix.lower()
    return _stored_name(url) if suffix in (".pth", ".pt", ".safetensors") else CAFFEMODEL_FILE


def fetch_weights(force: bool = False) -> Fetched:
    """Put InceptionV1's default weights, BVLC GoogLeNet, into the user cache, once.

    The caffemodel is downloaded from :func:`weights_urls` (the canonical URL, then its mirrors; or
    ``$ATLAS_WEIGHTS_URL``) with a progress bar, its checksum compared with :func:`expected_checksums` (the published
    sha1 unless ``$ATLAS_WEIGHTS_SHA1``/``$ATLAS_WEIGHTS_SHA256`` say otherwise), converted to
    ``cache_dir()/bvlc_googlenet.safetensors`` (a temporary file renamed into place, so a half-written file never
    exists under that name) and deleted. A file that fails the check is deleted and never used. A
    ``bvlc_googlenet.caffemodel`` put into the cache by hand (offline machines) is checked and converted the same way.

    Parameters
    ----------
    force : bool, default False
        Download again even when the cache already holds the weights.

    Returns
    -------
    Fetched
        The weights file and where it came from.

    Raises
    ------
    AtlasError
        One line: no URL answered (what to download and where to put it), a checksum mismatch, a download that is
        not a Caffe model.
    """
    cache = cache_dir()
    urls = weights_urls()
    want = expected_checksums()
    target = cache / _stored_name(urls[0])
    if target.is_file() and not force:
        return Fetched(target, None, str(target))
    placed = cache / CAFFEMODEL_FILE
    if target.name == BVLC_FILE and placed.is_file():
        got = file_checksums(placed)
        _check(got, want, str(placed), delete=None)
        convert_caffemodel(placed, target)
        placed.unlink()
        return Fetched(target, None, str(placed))
    failures: list[str] = []
    for i, url in enumerate(urls):
        try:
            download, got = _download(url, cache)
        except (OSError, ValueError) as exc:  # URLError and timeouts are OSErrors; ValueError: a malformed URL
            failures.append(f"{url} ({download_reason(exc)})")
            continue
        try:
            _check(got, want, f"downloaded {url}", delete=download, trust=bool(os.environ.get("ATLAS_WEIGHTS_URL")))
            if Path(urllib.parse.urlsplit(url).path).suffix.lower() in (".safetensors", ".pth", ".pt"):
                os.replace(download, cache / _stored_name(url))
            else:
                convert_caffemodel(download, target, what=f"downloaded {url}")
        except AtlasError:
            if i == len(urls) - 1:
                raise
            failures.append(f"{url} (not the expected file)")  # a mirror serving something else: try the next one
            continue
        finally:
            download.unlink(missing_ok=True)
        return Fetched(cache / _stored_name(url), url, url)
    more = f"; also tried {len(failures) - 1} mirror(s)" if len(failures) > 1 else ""
    raise _NotDownloaded(f"could not download {failures[0]}{more}: download that file yourself and put it at "
                         f"{cache / _placed_name(urls[0])} (checked and converted on first use or by `atlas fetch-weights`), "
                         "or pass --weights PATH or set ATLAS_WEIGHTS to a weights file")


def _check(got: dict[str, str], want: dict[str, str], what: str, delete: Path | None, trust: bool = False) -> None:
    """Compare checksums; on a mismatch delete ``delete`` (a download) and raise one line."""
    for algo, value in want.items():
        if got[algo] != value:
            if delete is not None:
                delete.unlink(missing_ok=True)
            done = "deleted it, not used" if delete is not None else "not used"
            hint = f" (if you trust that file, set ATLAS_WEIGHTS_{algo.upper()}={got[algo]})" if trust else ""
            raise AtlasError(f"{what} has {algo} {got[algo]}, not the expected {value}; {done}{hint}")


def convert_caffemodel(source: Path, dest: Path, what: str | None = None) -> Path:
    """Convert BVLC GoogLeNet's caffemodel to the safetensors atlas loads, written atomically to ``dest``.

    Keeps the layers InceptionV1 uses (the main classifier, not the auxiliary ``loss1``/``loss2`` heads) under their
    Caffe names with ``.weight``/``.bias``; convolutions OIHW, the classifier (out, in); float32.

    Parameters
    ----------
    source : pathlib.Path
        The ``.caffemodel``.
    dest : pathlib.Path
        The ``.safetensors`` to write (its folder is made if needed).
    what : str or None, default None
        How the one-line error names the file; None: its path.

    Returns
    -------
    pathlib.Path
        ``dest``.
    """
    from safetensors.numpy import save_file

    state = caffemodel_state(source, what)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"source": f"{CAFFEMODEL_FILE} (BVLC, Caffe model zoo), converted by atlas",
                                        "layout": "conv OIHW, fc (out,in); input BGR 0-255 minus mean [104,117,123]"})
        os.replace(tmp, dest)
    except OSError as exc:  # a full disk, a read-only cache
        raise AtlasError(f"could not write {dest}: {exc.strerror or exc}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def caffemodel_state(source: Path, what: str | None = None) -> dict:
    """The InceptionV1 tensors of a BVLC GoogLeNet caffemodel: Caffe layer name + ``.weight``/``.bias`` -> float32
    array, checked against the shapes of atlas's InceptionV1 (one line naming the first that differs)."""
    import numpy as np

    from atlas.models.caffe import CaffeError, read_caffemodel
    from atlas.models.inception import BVLC_BLOCKS, InceptionV1, _bvlc_key_map

    what = what or str(source)
    key_map = _bvlc_key_map()  # exactly the layers the model uses
    try:
        layers = read_caffemodel(source, keep=key_map.__contains__)
    except CaffeError as exc:
        raise AtlasError(f"{what} is not a readable Caffe model ({exc})") from None
    expected = InceptionV1(BVLC_BLOCKS, 1000, style="caffe").state_dict()
    state: dict[str, np.ndarray] = {}
    for layer in layers:
        if layer.name not in key_map:
            continue
        if layer.type not in ("Convolution", "InnerProduct") or len(layer.blobs) != 2:
            raise AtlasError(f"{what}: layer {layer.name!r} is a {layer.type} with {len(layer.blobs)} blobs, not a "
                             "convolution or inner product with weight and bias: not BVLC GoogLeNet")
        for param, blob in zip(("weight", "bias"), layer.blobs, strict=True):
            shape = tuple(expected[f"{key_map[layer.name]}.{param}"].shape)
            if blob.size != int(np.prod(shape)) or (layer.type == "Convolution" and param == "weight" and blob.shape != shape):
                raise AtlasError(f"{what}: {layer.name}.{param} has shape {blob.shape}, InceptionV1 has {shape}: not BVLC GoogLeNet")
            if not np.isfinite(blob).all():  # trained weights are finite; NaN or inf means damaged bytes
                raise AtlasError(f"{what}: {layer.name}.{param} holds non-finite values: not usable weights")
            # V1 files store an inner product's weight as 1x1xOxI and biases as 1x1x1xO: drop the unit axes
            state[f"{layer.name}.{param}"] = np.ascontiguousarray(blob.reshape(shape), dtype=np.float32)
    missing = [name for name in key_map if f"{name}.weight" not in state]
    if missing:
        raise AtlasError(f"{what} has no layer {missing[0]!r} ({len(missing)} of InceptionV1's {len(key_map)} missing): "
                         "not BVLC GoogLeNet")
    return state


def _download(url: str, folder: Path) -> tuple[Path, dict[str, str]]:
    """Stream ``url`` into a temporary file in ``folder``, hashing as it comes; returns the file and its checksums.

    A unique temporary name: two processes fetching at once never write the same file, and an interrupted
    download is removed. The progress bar (on a terminal) appears only once the server answers: a failed
    connection prints nothing but the caller's one-line error.
    """
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    name = Path(urllib.parse.urlsplit(url).path).name or "weights"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".partial")
    hashes = {algo: hashlib.new(algo) for algo in _DIGITS}
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            # disable=None: a bar on a terminal, nothing in a log file or a captured stream (where it would be noise
            # in front of the one-line error, or of the command's one-line result)
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}", leave=False, disable=None) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    for h in hashes.values():
                        h.update(block)
                    bar.update(len(block))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp), {algo: h.hexdigest() for algo, h in hashes.items()}


def file_checksums(path: Path) -> dict[str, str]:
    """Hex sha1 and sha256 of a file, read in 1 MiB blocks."""
    hashes = {algo: hashlib.new(algo) for algo in _DIGITS}
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            for h in hashes.values():
                h.update(block)
    return {algo: h.hexdigest() for algo, h in hashes.items()}


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
