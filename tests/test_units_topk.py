"""The streamed top-k pass against a brute-force computation over a small real run (12 shared photos + one broken
file, shards of 5 images, k=3, mixed3a and mixed4c), its resume after a real kill, its patches, skips and errors."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_run import snapshot

from atlas import store
from atlas.data import load_image, to_tensor
from atlas.errors import AtlasError
from atlas.units.receptive import receptive_field
from atlas.units.topk import Top, max_positions, merge_topk, top_examples

LAYERS = ["mixed3a", "mixed4c"]
K = 3
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- pure cores
def test_max_positions_takes_the_first_maximum():
    acts = torch.zeros(2, 3, 4, 5)
    acts[0, 0, 2, 3] = 5.0
    acts[0, 1] = 1.0  # all equal: the first position
    acts[1, 2, 3, 4] = -1.0  # max 0 at (0, 0)
    acts[1, 0, 1, 1] = acts[1, 0, 3, 0] = 2.0
    values, pos = max_positions(acts)
    assert values.tolist() == [[5.0, 1.0, 0.0], [2.0, 0.0, 0.0]]
    assert pos.dtype == torch.int32
    assert pos.tolist() == [[[2, 3], [0, 0], [0, 0]], [[1, 1], [0, 0], [0, 0]]]


def _top(values, images, pos=None) -> Top:
    v = np.asarray(values, np.float32)
    i = np.asarray(images, np.int64)
    p = np.zeros((*v.shape, 2), np.int32) if pos is None else np.asarray(pos, np.int32)
    return Top(v, i, p)


def test_merge_topk_orders_breaks_ties_and_pads():
    a = _top([[3.0, 1.0], [0.0, -np.inf]], [[4, 5], [9, -1]])
    b = _top([[3.0, 2.0], [0.0, 0.0]], [[2, 7], [3, 8]])
    m = merge_topk(a, b, 3)
    assert m.value.dtype == np.float32 and m.image.dtype == np.int64 and m.pos.dtype == np.int32
    assert m.value.tolist() == [[3.0, 3.0, 2.0], [0.0, 0.0, 0.0]]
    assert m.image.tolist() == [[2, 4, 7], [3, 8, 9]]  # equal values: the lower image index first
    # fewer candidates than k: -inf / -1 pads, after every real entry
    few = merge_topk(_top([[1.0]], [[0]]), _top([[-np.inf]], [[-1]]), 3)
    assert few.value.tolist() == [[1.0, -np.inf, -np.inf]] and few.image.tolist() == [[0, -1, -1]]
    assert few.pos[0, 1:].tolist() == [[-1, -1], [-1, -1]]
    # any merge order gives the same result
    rng = np.random.default_rng(0)
    parts = [_top(rng.integers(0, 4, (5, 4)).astype(np.float32), np.arange(4)[None].repeat(5, 0) + 4 * s,
                  rng.integers(0, 9, (5, 4, 2))) for s in range(4)]  # fmt: skip
    orders = [[0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]]
    results = []
    for order in orders:
        acc = _top(np.full((5, 0), 0.0), np.zeros((5, 0)), np.zeros((5, 0, 2)))
        for s in order:
            acc = merge_topk(acc, parts[s], 3)
        results.append(acc)
    for r in results[1:]:
        assert all(np.array_equal(x, y) for x, y in zip(r, results[0], strict=True))


# ----------------------------------------------------------------------------- a tiny real run
@pytest.fixture(scope="module")
def folder(tmp_path_factory, photos) -> Path:
    """12 shared photos (links) and one broken JPEG, sorted so the broken one is image 12 (the last)."""
    path = tmp_path_factory.mktemp("photos")
    for name in sorted(p.name for p in photos.glob("*.JPEG"))[::80][:12]:
        os.symlink(photos / name, path / name)
    (path / "zz_broken.JPEG").write_bytes(b"not a jpeg at all")
    return path


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, folder, net) -> Path:
    from atlas.sample import sample

    out = tmp_path_factory.mktemp("units") / "run"
    # float32 pinned: the brute force below is float32 (the bfloat16 pass is tests/test_precision.py's)
    sample(folder, LAYERS, out, max_images=13, attribution=False, shard_size=5, batch_size=4, workers=0, progress=False, net=net,
           precision="float32")
    return out


@pytest.fixture(scope="module")
def done(tmp_path_factory, sampled, net) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("done") / "run"
    shutil.copytree(sampled, out, symlinks=True)
    summary = top_examples(out, LAYERS, k=K, batch_size=4, workers=0, progress=False, net=net)
    return out, summary


def brute_force(net, run: Path, skip=(), layers=tuple(LAYERS), k: int = K) -> dict[str, Top]:
    """Every image's full activation map, then per channel the k best images by (max value, lower index)."""
    root = store.open_store(run)
    paths = root["images/path"][:]
    good = [i for i, p in enumerate(paths) if not p.endswith("zz_broken.JPEG") and i not in skip]
    x = torch.stack([to_tensor(load_image(paths[i])) for i in good])
    with torch.inference_mode():
        acts = net.activations(x, list(layers))
    out = {}
    for layer in layers:
        a = acts[layer].numpy()  # (N, C, H, W)
        n, c, h, w = a.shape
        flat = a.reshape(n, c, h * w)
        arg = flat.argmax(2)
        best = np.take_along_axis(flat, arg[..., None], 2)[..., 0]  # (N, C)
        value = np.zeros((c, k), np.float32)
        image = np.zeros((c, k), np.int64)
        pos = np.zeros((c, k, 2), np.int32)
        for ch in range(c):
            order = sorted(range(n), key=lambda j, ch=ch: (-best[j, ch], good[j]))[:k]
            value[ch] = best[order, ch]
            image[ch] = [good[j] for j in order]
            pos[ch] = [(arg[j, ch] // w, arg[j, ch] % w) for j in order]
        out[layer] = Top(value, image, pos)
    return out


@pytest.fixture(scope="module")
def expected(net, sampled) -> dict[str, Top]:
    return brute_force(net, sampled)


def read_top(run: Path, layer: str) -> Top:
    g = store.open_store(run)[f"units/{layer}/top"]
    return Top(g["value"][:], g["image"][:], g["pos"][:])


def assert_same(got: Top, want: Top, rows=slice(None)) -> None:
    np.testing.assert_allclose(got.value[rows], want.value[rows], rtol=1e-5, atol=1e-4)
    assert np.array_equal(got.image[rows], want.image[rows])
    assert np.array_equal(got.pos[rows], want.pos[rows])


def test_top_k_equals_brute_force_and_is_stored_per_the_spec(done, expected, net):
    run, summary = done
    root = store.open_store(run)
    assert root["images/shard_done"].shape == (3,)  # 13 images in shards of 5: several shards
    for layer in LAYERS:
        got = read_top(run, layer)
        assert_same(got, expected[layer])
        assert np.all(np.diff(got.value, axis=1) <= 0)  # descending
        g = root[f"units/{layer}/top"]
        c, h, w = net.layer_shapes(224)[layer]
        field = receptive_field(net, layer)
        attrs = dict(g.attrs)
        assert (attrs["k"], attrs["channels"], attrs["hw"], attrs["crop"], attrs["n_images"]) == (K, c, [h, w], 224, 13)
        assert attrs["field"] == {"size": field.size, "stride": field.stride, "offset": field.offset}
        assert g["box"].shape == (c, K, 4) and g["patch"].shape == (c, K, 64, 64, 3) and g["patch"].dtype == np.uint8
        box = g["box"][:]
        for ch in (0, c // 2, c - 1):
            for j in range(K):
                y, x = got.pos[ch, j]
                top, left = field.offset + y * field.stride, field.offset + x * field.stride
                want = [max(0, top), max(0, left), min(224, top + field.size), min(224, left + field.size)]
                assert box[ch, j].tolist() == want
        assert g["shard_done"][:].all() and g["done"][:].all() and g["shards/value"].shape == (3, c, K)
        assert summary[layer]["n_skipped"] == 1 and summary[layer]["shards_computed"] == 3
        assert 12 not in got.image  # the broken file: skipped and counted, never an example
    seals = store.read_ledger(run)["seals"]
    assert all(any(key.startswith(f"units/{layer}/top/") for key in seals) for layer in LAYERS)  # sealed by finish_stage
    assert not store.read_ledger(run)["writing"]


def test_patches_are_the_receptive_field_crops(done, net):
    run, _ = done
    root = store.open_store(run)
    paths = root["images/path"][:]
    for layer, ch, j in (("mixed3a", 5, 0), ("mixed3a", 200, 2), ("mixed4c", 17, 1)):
        g = root[f"units/{layer}/top"]
        top, left, bottom, right = (int(v) for v in g["box"][ch, j])
        image = load_image(paths[int(g["image"][ch, j])], 256, 224)
        crop = np.asarray(image)[top:bottom, left:right]
        h, w = crop.shape[:2]
        scale = 64 / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        resized = np.asarray(Image.fromarray(crop).resize(size, Image.LANCZOS)) if size != (w, h) else crop
        patch = g["patch"][ch, j]
        x0, y0 = (64 - size[0]) // 2, (64 - size[1]) // 2
        assert np.array_equal(patch[y0 : y0 + size[1], x0 : x0 + size[0]], resized)
        grey = np.ones((64, 64), bool)
        grey[y0 : y0 + size[1], x0 : x0 + size[0]] = False
        assert (patch[grey] == 127).all()


def test_resume_after_a_real_kill_computes_only_the_missing_shards(tmp_path, sampled, expected):
    run = tmp_path / "run"
    shutil.copytree(sampled, run, symlinks=True)
    code = (f"from atlas.units.topk import top_examples; top_examples({str(run)!r}, ['mixed3a'], k={K}, batch_size=1, workers=0, "
            "progress=False)")  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    flag = run / "store.zarr" / "units" / "mixed3a" / "top" / "shard_done"
    deadline = time.monotonic() + 120
    killed_after = None
    try:
        while time.monotonic() < deadline and child.poll() is None:
            try:
                flags = store.open_store(run)["units/mixed3a/top/shard_done"][:] if flag.exists() else np.zeros(3, bool)
            except Exception:  # noqa: BLE001 - being written right now
                flags = np.zeros(3, bool)
            if flags.any():
                child.send_signal(signal.SIGKILL)
                child.wait()
                killed_after = int(flags.sum())
                break
            time.sleep(0.05)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert killed_after is not None, child.stderr.read().decode()[-2000:]
    root = store.open_store(run)
    flags = root["units/mixed3a/top/shard_done"][:]
    assert not root["units/mixed3a/top/done"][:].any()  # killed before the merge
    missing = int((~flags).sum())
    assert 0 < missing < 3
    # the in-process rerun (a test may share the fixture's model; the weights are the run's)
    from atlas.models import load_run_model

    net = load_run_model(store.attrs(root))
    summary = top_examples(run, ["mixed3a"], k=K, batch_size=4, workers=0, progress=False, net=net)
    assert summary["mixed3a"]["shards_computed"] == missing
    assert_same(read_top(run, "mixed3a"), expected["mixed3a"])
    again = top_examples(run, ["mixed3a"], k=K, batch_size=4, workers=0, progress=False, net=net)
    assert again["mixed3a"]["shards_computed"] == 0 and again["mixed3a"]["channels"] == 0  # all done: nothing recomputed


def test_flag_removed_shard_recomputed_alone_and_channel_subset_with_an_image_gone(tmp_path, done, net):
    run = tmp_path / "run"
    shutil.copytree(done[0], run, symlinks=True)
    root = store.open_store(run, "r+")
    # An image that was readable when sampled fails now: skipped and counted, the others still ranked.
    paths = root["images/path"][:]
    gone = int(root["units/mixed3a/top/image"][5, 0])
    store.write_array(root["images"], "path", np.asarray([p if i != gone else p + ".moved" for i, p in enumerate(paths)], dtype=str))
    for layer in LAYERS:
        del root[f"units/{layer}/top"]
    summary = top_examples(run, ["mixed3a"], k=K, channels=range(0, 8), batch_size=4, workers=0, progress=False, net=net)
    assert summary["mixed3a"]["n_failed_now"] == 1 and summary["mixed3a"]["n_skipped"] == 2 and summary["mixed3a"]["channels"] == 8
    want = brute_force(net, run, skip={gone})["mixed3a"]
    got = read_top(run, "mixed3a")
    assert_same(got, want, slice(0, 8))
    assert gone not in got.image[:8]
    assert np.isneginf(got.value[8:]).all() and (got.image[8:] == -1).all()  # arrays full size, other rows untouched
    g = store.open_store(run)["units/mixed3a/top"]
    assert g["done"][:8].all() and not g["done"][8:].any()
    # A shard whose flag is gone (and whose merge did not happen) is the only one recomputed; the result is the same.
    root = store.open_store(run, "r+")
    root["units/mixed3a/top/shard_done"][1] = False
    root["units/mixed3a/top/done"][:] = False
    root["units/mixed3a/top/shards/value"][1] = -5.0  # garbage that a recomputation must replace
    summary = top_examples(run, ["mixed3a"], k=K, channels="0-7", batch_size=4, workers=0, progress=False, net=net)
    assert summary["mixed3a"]["shards_computed"] == 1
    assert_same(read_top(run, "mixed3a"), want, slice(0, 8))


def test_missing_photos_and_bad_input_are_one_line(tmp_path, sampled, net):
    run = tmp_path / "run"
    shutil.copytree(sampled, run, symlinks=True)
    root = store.open_store(run, "r+")
    paths = root["images/path"][:]
    moved = tmp_path / "photos-not-copied"
    store.write_array(root["images"], "path", np.asarray([str(moved / Path(p).name) for p in paths], dtype=str))
    before = snapshot(run)
    with pytest.raises(AtlasError) as err:
        top_examples(run, ["mixed3a"], k=K, workers=0, progress=False, net=net)
    assert "\n" not in str(err.value) and str(moved) in str(err.value) and "missing" in str(err.value)
    for kwargs, needle in (({"layers": ["logits"]}, "mixed4c"), ({"layers": ["mixed9"]}, "mixed4c"),
                           ({"layers": ["mixed3a"], "channels": range(250, 260)}, "256 channels"),
                           ({"layers": ["mixed3a"], "channels": "0-999"}, "out of range"),
                           ({"layers": ["mixed3a"], "k": 0}, "at least 1")):  # fmt: skip
        with pytest.raises(AtlasError) as err:
            top_examples(run, **{"k": K, "progress": False, "net": net} | kwargs)
        assert "\n" not in str(err.value) and needle in str(err.value), str(err.value)
    assert snapshot(run) == before  # nothing written, nothing marked


def test_photos_gone_during_the_pass_stop_it_keeping_nothing_half_done(tmp_path, sampled, expected, net, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(sampled, run, symlinks=True)
    import atlas.data.loading

    real = atlas.data.load_image

    def gone(*_args, **_kwargs):
        raise FileNotFoundError("No such file or directory")

    # The check before the pass still finds the photos; the pass's decoding (ImageDataset, in atlas.data.loading) no longer does.
    monkeypatch.setattr(atlas.data.loading, "load_image", gone)
    with pytest.raises(AtlasError) as err:
        top_examples(run, ["mixed3a"], k=K, channels="0-3", batch_size=4, workers=0, progress=False, net=net)
    assert "\n" not in str(err.value) and "could not be read" in str(err.value) and "log.txt" in str(err.value)
    g = store.open_store(run)["units/mixed3a/top"]
    assert not g["shard_done"][:].any() and not g["done"][:].any()  # the failed shard is not flagged as done
    monkeypatch.setattr(atlas.data.loading, "load_image", real)
    summary = top_examples(run, ["mixed3a"], k=K, channels="0-3", batch_size=4, workers=0, progress=False, net=net)
    assert summary["mixed3a"]["shards_computed"] == 3 and summary["mixed3a"]["n_failed_now"] == 0
    assert_same(read_top(run, "mixed3a"), expected["mixed3a"], slice(0, 4))


def test_torchvision_resnet_blocks(tmp_path, folder):
    # torchvision's architecture with random weights (none can be downloaded here): a field and a ranking need no training.
    from atlas.models import load_model
    from atlas.sample import sample

    torch.manual_seed(0)
    net = load_model("resnet18", pretrained=False)
    run = tmp_path / "run"
    sample(folder, ["layer3"], run, max_images=6, attribution=False, shard_size=4, workers=0, progress=False, net=net,
           precision="float32")
    summary = top_examples(run, ["layer3", "layer2.0.conv1"], k=2, channels=range(4), workers=0, progress=False, net=net)
    assert summary["layer3"]["shards_computed"] == 2
    want = brute_force(net, run, layers=("layer3", "layer2.0.conv1"), k=2)
    for layer in ("layer3", "layer2.0.conv1"):
        assert_same(read_top(run, layer), want[layer], slice(0, 4))
    g = store.open_store(run)["units/layer3/top"]
    assert dict(g.attrs)["field"] == {"size": 211, "stride": 16, "offset": -105.0} and dict(g.attrs)["hw"] == [14, 14]
