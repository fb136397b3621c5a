"""The default weights from their public source: a caffemodel downloaded, checked, converted and used.

Offline throughout: a local HTTP server stands in for the Caffe model zoo and serves caffemodels this module
writes itself from the shared BVLC tensors with a small protobuf writer (below), in both layouts Caffe has
saved (the V1 ``layers`` list and the current ``layer`` list), with packed and unpacked numbers and with the
legacy 4-d blob sizes and the ``shape`` message. Their sha1 is not the published one, so every download goes
through the documented override (``ATLAS_WEIGHTS_URL`` with ``ATLAS_WEIGHTS_SHA1``/``ATLAS_WEIGHTS_SHA256``).
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PHOTOS, WEIGHTS, http_folder, require_shared
from tiny_run import cli, one_line

from atlas.errors import AtlasError
from atlas.models import BVLC_SHA1, BVLC_URL, fetch_weights, load_model
from atlas.models.caffe import CaffeError, read_caffemodel
from atlas.models.weights import caffemodel_state

# --------------------------------------------------------------------------------------- a protobuf writer


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _int(number: int, value: int) -> bytes:
    return _key(number, 0) + _varint(value)


def _bytes(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _varint(len(payload)) + payload


def _numbers(number: int, values: np.ndarray, packed: bool, double: bool = False) -> bytes:
    """A repeated float (wire type 5) or double (wire type 1) field, packed or one tagged field per value."""
    dtype, wire = ("<f8", 1) if double else ("<f4", 5)
    raw = np.ascontiguousarray(values.reshape(-1), dtype=dtype)
    if packed:
        return _bytes(number, raw.tobytes())
    table = np.empty((raw.size, 1 + raw.itemsize), np.uint8)
    table[:, 0] = _key(number, wire)[0]
    table[:, 1:] = raw.view(np.uint8).reshape(raw.size, raw.itemsize)
    return table.tobytes()


def _blob(values: np.ndarray, legacy: bool, packed: bool, double: bool = False, diff: bool = False) -> bytes:
    """A BlobProto: sizes as legacy num/channels/height/width (padded with leading 1s, as Caffe saved them) or as a
    BlobShape (dims packed when ``packed``), then the values (``data``, or ``double_data``), maybe a ``diff``."""
    if legacy:
        dims = (1,) * (4 - values.ndim) + values.shape
        head = b"".join(_int(n, d) for n, d in zip((1, 2, 3, 4), dims, strict=True))
    else:
        dims_field = _bytes(1, b"".join(_varint(d) for d in values.shape)) if packed else b"".join(_int(1, d) for d in values.shape)
        head = _bytes(7, dims_field)
    body = _numbers(8 if double else 5, values, packed, double)
    extra = _numbers(6, np.zeros(3, np.float32), True) if diff else b""
    return body + head + extra if packed else head + body + extra  # field order is free in protobuf


def _layer(v1: bool, name: str, kind: str, blobs: list[bytes]) -> bytes:
    """One V1LayerParameter (name 4, type 5 enum, blobs 6, bottom 2) or LayerParameter (name 1, type 2, blobs 7, bottom 3)."""
    if v1:
        enum = {"Convolution": 4, "InnerProduct": 14, "ReLU": 18, "Pooling": 17, "Softmax": 20}[kind]
        return _bytes(2, _bytes(2, b"bottom") + _bytes(4, name.encode()) + _int(5, enum) + b"".join(_bytes(6, b) for b in blobs))
    return _bytes(100, _bytes(1, name.encode()) + _bytes(2, kind.encode()) + _bytes(3, b"bottom") + b"".join(_bytes(7, b) for b in blobs))


def write_caffemodel(path: Path, state: dict[str, np.ndarray], v1: bool) -> Path:
    """A caffemodel holding ``state`` (Caffe layer name + .weight/.bias) in Caffe's layer order, with layers that
    hold no parameters and the auxiliary classifiers (which atlas does not keep) in between."""
    rng = np.random.default_rng(0)
    out = [_bytes(1, b"GoogleNet"), _bytes(3, b"data")] + [_int(4, d) for d in (10, 3, 224, 224)]
    names = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in state))
    for i, name in enumerate(names):
        w, b = state[f"{name}.weight"], state[f"{name}.bias"]
        kind = "InnerProduct" if w.ndim == 2 else "Convolution"
        if v1:  # V1 files: the legacy 4-d sizes; floats packed and unpacked in turn
            blobs = [_blob(w, legacy=True, packed=i % 2 == 1), _blob(b, legacy=True, packed=i % 2 == 0)]
        else:  # current files: BlobShape; packed and unpacked in turn; two biases as doubles; a diff to skip
            blobs = [_blob(w, legacy=False, packed=i % 2 == 0, diff=i == 3),
                     _blob(b, legacy=False, packed=i % 2 == 1, double=i in (1, 2))]
        out.append(_layer(v1, name, kind, blobs))
        out.append(_layer(v1, name + "/relu", "ReLU", []))
        if name in ("inception_4a/pool_proj", "inception_4d/pool_proj"):  # the auxiliary heads, small stand-ins
            aux = "loss1" if "4a" in name else "loss2"
            for part, shape in (("conv", (4, 3, 1, 1)), ("fc", (5, 4)), ("classifier", (6, 5))):
                blobs = [_blob(rng.standard_normal(shape).astype(np.float32), legacy=v1, packed=True),
                         _blob(np.zeros(shape[0], np.float32), legacy=v1, packed=False)]
                out.append(_layer(v1, f"{aux}/{part}", "Convolution" if part == "conv" else "InnerProduct", blobs))
    out.append(_layer(v1, "prob", "Softmax", []))
    path.write_bytes(b"".join(out))
    return path


# --------------------------------------------------------------------------------------- fixtures


def _sha(path: Path, algo: str = "sha1") -> str:
    return hashlib.new(algo, path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def shared_state() -> dict[str, np.ndarray]:
    require_shared()
    from safetensors.numpy import load_file

    return load_file(str(WEIGHTS))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, shared_state):
    """Caffemodels written from the shared tensors (V1, V2 and a corrupted copy) served over HTTP on localhost."""
    folder = tmp_path_factory.mktemp("zoo")
    write_caffemodel(folder / "v1.caffemodel", shared_state, v1=True)
    good = write_caffemodel(folder / "v2.caffemodel", shared_state, v1=False)
    data = bytearray(good.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # 64 bytes of one blob zeroed: still parses, wrong checksum
    (folder / "corrupt.caffemodel").write_bytes(bytes(data))
    with http_folder(folder) as (url, served):
        yield {"url": url, "folder": folder, "served": served}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """No ATLAS_WEIGHTS (conftest sets it), no override, an empty user cache under tmp_path; returns atlas's cache folder."""
    for name in ("ATLAS_WEIGHTS", "ATLAS_WEIGHTS_URL", "ATLAS_WEIGHTS_SHA1", "ATLAS_WEIGHTS_SHA256"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "atlas"


def _serve(monkeypatch, zoo, name: str, sha1: str | None = None, sha256: str | None = None) -> str:
    url = f"{zoo['url']}/{name}"
    monkeypatch.setenv("ATLAS_WEIGHTS_URL", url)
    for algo, value in (("SHA1", sha1), ("SHA256", sha256)):
        if value:
            monkeypatch.setenv(f"ATLAS_WEIGHTS_{algo}", value)
    zoo["served"].clear()
    return url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------- the reader


@pytest.mark.parametrize("name", ["v1.caffemodel", "v2.caffemodel"])
def test_reader_sees_every_layer_of_both_layouts(zoo, shared_state, name):
    layers = read_caffemodel(zoo["folder"] / name)
    by_name = {layer.name: layer for layer in layers}
    assert by_name["conv1/7x7_s2"].type == "Convolution" and by_name["loss3/classifier"].type == "InnerProduct"
    assert by_name["conv1/7x7_s2/relu"].blobs == [] and by_name["prob"].type == "Softmax"
    assert {"loss1/conv", "loss1/fc", "loss2/classifier"} <= set(by_name)
    w = by_name["loss3/classifier"].blobs[0]
    # V1 files keep the legacy 4-d size of an inner product (1, 1, out, in); the current ones its own shape
    assert w.shape == ((1, 1, 1000, 1024) if name.startswith("v1") else (1000, 1024))
    assert np.array_equal(w.reshape(1000, 1024), shared_state["loss3/classifier.weight"])


@pytest.mark.parametrize("name", ["v1.caffemodel", "v2.caffemodel"])
def test_conversion_equals_the_shared_tensors_and_drops_the_auxiliary_heads(zoo, shared_state, name):
    state = caffemodel_state(zoo["folder"] / name)
    assert sorted(state) == sorted(shared_state)  # the same 116 tensors: no loss1/loss2
    for key, value in shared_state.items():
        assert state[key].dtype == np.float32 and state[key].shape == value.shape, key
        assert np.array_equal(state[key], value), key


def test_bad_files_are_one_line(zoo, tmp_path, shared_state):
    good = (zoo["folder"] / "v2.caffemodel").read_bytes()
    damaged = dict(shared_state, **{"conv2/3x3.bias": np.full(192, np.nan, np.float32)})
    nan = write_caffemodel(tmp_path / "nan.caffemodel", damaged, v1=False).read_bytes()
    cases = {
        "empty": b"",
        "random": np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "text": b"name: 'GoogleNet'\nlayer { name: 'conv1' }\n",
        "truncated": good[: len(good) // 3],
        "truncated_late": good[:-7],
        "safetensors": WEIGHTS.read_bytes()[:200_000],
        "nan": nan,
    }
    for case, data in cases.items():
        path = tmp_path / f"{case}.caffemodel"
        path.write_bytes(data)
        with pytest.raises(AtlasError) as info:
            caffemodel_state(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value), (case, str(info.value))
    for seed in range(20):  # the reader itself: nothing but CaffeError on random bytes
        path.write_bytes(np.random.default_rng(seed).integers(0, 256, 512, dtype=np.uint8).tobytes())
        with pytest.raises(CaffeError):
            read_caffemodel(path)


# --------------------------------------------------------------------------------------- the download


@pytest.mark.parametrize("name", ["v1.caffemodel", "v2.caffemodel"])
def test_fetch_checks_converts_and_caches(zoo, cache, shared_state, monkeypatch, name):
    from safetensors.numpy import load_file

    path = zoo["folder"] / name
    url = _serve(monkeypatch, zoo, name, sha1=_sha(path), sha256=_sha(path, "sha256") if name.startswith("v1") else None)
    fetched = fetch_weights()
    assert fetched.path == cache / "bvlc_googlenet.safetensors" and fetched.url == url
    assert sorted(p.name for p in cache.iterdir()) == ["bvlc_googlenet.safetensors"]  # no caffemodel, no temporary file
    converted = load_file(str(fetched.path))
    assert sorted(converted) == sorted(shared_state)
    assert all(np.array_equal(converted[k], v) and converted[k].dtype == v.dtype for k, v in shared_state.items())
    again = fetch_weights()  # a second call: the cached file, nothing downloaded
    assert again.path == fetched.path and again.url is None and zoo["served"] == [f"/{name}"]


def test_a_corrupted_download_is_refused_and_nothing_is_left(zoo, cache, monkeypatch):
    good = _sha(zoo["folder"] / "v2.caffemodel")
    _serve(monkeypatch, zoo, "corrupt.caffemodel", sha1=good)
    with pytest.raises(AtlasError, match=rf"has sha1 [0-9a-f]{{40}}, not the expected {good}; deleted it, not used") as info:
        fetch_weights()
    assert "\n" not in str(info.value)
    assert list(cache.iterdir()) == []
    result = cli("fetch-weights")  # the same through the command: one line, nothing left
    one_line(result, "corrupt.caffemodel", f"not the expected {good}")
    assert list(cache.iterdir()) == []


def test_an_override_without_its_checksum_is_checked_against_the_published_sha1(zoo, cache, monkeypatch):
    path = zoo["folder"] / "v1.caffemodel"
    _serve(monkeypatch, zoo, "v1.caffemodel")  # a URL but no ATLAS_WEIGHTS_SHA1: the file must be the published one
    with pytest.raises(AtlasError, match=rf"has sha1 {_sha(path)}, not the expected {BVLC_SHA1}.*ATLAS_WEIGHTS_SHA1={_sha(path)}"):
        fetch_weights()
    assert list(cache.iterdir()) == []
    monkeypatch.setenv("ATLAS_WEIGHTS_SHA256", "ab" * 32)  # a sha256 given instead: that one is checked
    with pytest.raises(AtlasError, match=rf"has sha256 {_sha(path, 'sha256')}, not the expected {'ab' * 32}"):
        fetch_weights()
    monkeypatch.setenv("ATLAS_WEIGHTS_SHA1", "not-hex")
    with pytest.raises(AtlasError, match=r"ATLAS_WEIGHTS_SHA1='not-hex' is not a sha1 \(40 hex digits\)"):
        fetch_weights()


def test_a_checksum_that_matches_bytes_that_are_no_caffemodel_is_one_line(zoo, cache, monkeypatch, tmp_path):
    (zoo["folder"] / "garbage.caffemodel").write_bytes(b"\x0a\xff\xff\xff\x0fnot a model")
    _serve(monkeypatch, zoo, "garbage.caffemodel", sha1=_sha(zoo["folder"] / "garbage.caffemodel"))
    with pytest.raises(AtlasError, match=r"downloaded .*garbage.caffemodel is not a readable Caffe model \(field 1 at byte 0 runs"):
        fetch_weights()
    assert list(cache.iterdir()) == []


def test_offline_is_one_line_naming_the_url_and_the_cache_path(cache, monkeypatch):
    url = f"http://127.0.0.1:{_free_port()}/bvlc_googlenet.caffemodel"  # a closed port: as offline
    monkeypatch.setenv("ATLAS_WEIGHTS_URL", url)
    line = one_line(cli("fetch-weights"), f"could not download {url}", str(cache / "bvlc_googlenet.caffemodel"), "ATLAS_WEIGHTS")
    assert "--weights" in line
    # first use: the same, and where atlas looked
    with pytest.raises(AtlasError, match=rf"no InceptionV1 weights \(--weights not given, ATLAS_WEIGHTS unset.*could not download {url}"):
        load_model("inceptionv1")
    assert not cache.exists() or list(cache.iterdir()) == []


def test_a_caffemodel_put_in_the_cache_by_hand_is_converted_offline(zoo, cache, shared_state, monkeypatch):
    from safetensors.numpy import load_file

    source = zoo["folder"] / "v1.caffemodel"
    monkeypatch.setenv("ATLAS_WEIGHTS_URL", f"http://127.0.0.1:{_free_port()}/bvlc_googlenet.caffemodel")  # offline
    monkeypatch.setenv("ATLAS_WEIGHTS_SHA1", _sha(source))  # its checksum (a real BVLC file matches the published one)
    cache.mkdir(parents=True)
    (cache / "bvlc_googlenet.caffemodel").write_bytes(source.read_bytes())
    fetched = fetch_weights()
    assert fetched.url is None and fetched.source == str(cache / "bvlc_googlenet.caffemodel")
    assert sorted(p.name for p in cache.iterdir()) == ["bvlc_googlenet.safetensors"]
    assert np.array_equal(load_file(str(fetched.path))["conv1/7x7_s2.weight"], shared_state["conv1/7x7_s2.weight"])


def test_cli_fetch_weights_then_first_use_loads_them(zoo, cache, monkeypatch, net):
    from atlas.data import decode_image

    path = zoo["folder"] / "v1.caffemodel"
    _serve(monkeypatch, zoo, "v1.caffemodel", sha1=_sha(path))
    result = cli("fetch-weights")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines == [f"InceptionV1 weights: {cache / 'bvlc_googlenet.safetensors'} (downloaded from {zoo['url']}/v1.caffemodel)"]
    result = cli("fetch-weights")
    assert result.stdout.strip().endswith("(already in the cache, nothing downloaded)") and len(zoo["served"]) == 1
    fetched = load_model("inceptionv1")  # no --weights, no ATLAS_WEIGHTS: the cache
    assert fetched.weights == str(cache / "bvlc_googlenet.safetensors") and len(zoo["served"]) == 1
    photos = [PHOTOS / "n04251144_snorkel.JPEG", PHOTOS / "n10565667_scuba_diver.JPEG"]
    x = torch.stack([torch.from_numpy(np.asarray(decode_image(p), dtype=np.float32) / 255).permute(2, 0, 1) for p in photos])
    with torch.no_grad():
        ours, shared = fetched.module(x), net.module(x)
    assert torch.equal(ours, shared)  # the same tensors give the same logits, bit for bit
    assert [fetched.classes[i] for i in ours.argmax(1)] == [net.classes[i] for i in shared.argmax(1)]


def test_the_default_source_is_the_caffe_model_zoo():
    assert BVLC_URL == "http://dl.caffe.berkeleyvision.org/bvlc_googlenet.caffemodel"
    assert BVLC_SHA1 == "405fc5acd08a3bb12de8ee5e23a96bec22f08204"  # published in the model zoo's readme
