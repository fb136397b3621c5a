import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr
from conftest import WEIGHTS

from atlas.errors import AtlasError
from atlas.info import info
from atlas.sample import forward_samples, sample, sample_positions


@pytest.mark.parametrize("forward", ["nchw", "fused"])
def test_attribution_jvp_matches_per_class_gradients(net, forward):
    """h . grad(logit_c) from one forward-mode JVP equals brute-force float32 backward passes of the reference model,
    with the reference kernels and with the default ones (whose JVP runs on the channels-last copy)."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 224, 224)
    k = 2
    positions = {"mixed4c": torch.tensor([[3, 4], [7, 7], [12, 2], [5, 10]])}
    acts, attrs, logits = forward_samples(net, x, ["mixed4c"], positions, attribution=True, forward=forward)
    assert attrs["mixed4c"].shape == (4, 1000)

    captured = {}

    def edit(name, out):
        leaf = out.detach().requires_grad_(True)
        captured[name] = leaf
        return leaf

    classes = [0, 1, 417, 983] + logits.argmax(1).tolist()
    with net.hooks(["mixed4c"], edit=edit, stop=False):
        out = net.module(x)
    h = captured["mixed4c"]
    for c in classes:
        (grad,) = torch.autograd.grad(out[:, c].sum(), h, retain_graph=True)
        for b in range(4):
            y, xx = positions["mixed4c"][b].tolist()
            terms = (h[b // k, :, y, xx] * grad[b // k, :, y, xx]).detach()
            # float32 sums of 512 terms that cancel, in another order (other kernels, other thread splits): the error
            # scales with the terms' magnitudes, not with their (small) sum
            scale = float(terms.abs().sum())
            assert attrs["mixed4c"][b, c].item() == pytest.approx(float(terms.sum()), rel=1e-3, abs=1e-4 + 2e-3 * scale)
    assert torch.allclose(acts["mixed4c"][0], h[0, :, 3, 4].detach(), rtol=1e-4, atol=1e-5)  # other kernels: float rounding
    assert torch.allclose(logits, out.detach(), atol=1e-4)


def test_positions_avoid_border_and_depend_only_on_seed_and_index():
    a = sample_positions(0, 17, 0, (14, 14), 3)
    assert (a >= 1).all() and (a <= 12).all()
    assert len({tuple(p) for p in a}) == 3
    assert np.array_equal(a, sample_positions(0, 17, 0, (14, 14), 3))
    assert not np.array_equal(a, sample_positions(1, 17, 0, (14, 14), 3))


def test_sample_two_layers_batch_size_independent(net, photo_list, tmp_path):
    kwargs = dict(model="inceptionv1", per_image=2, seed=3, workers=0, progress=False, net=net, max_images=6, shard_size=4)
    a = sample(photo_list, ["mixed4c", "mixed5b"], tmp_path / "a", batch_size=4, **kwargs)
    sample(photo_list, ["mixed4c", "mixed5b"], tmp_path / "b", batch_size=3, **kwargs)
    assert a.n_samples == {"mixed4c": 12, "mixed5b": 12}
    ra, rb = zarr.open_group(tmp_path / "a/store.zarr", mode="r"), zarr.open_group(tmp_path / "b/store.zarr", mode="r")
    for layer in ("mixed4c", "mixed5b"):
        assert np.array_equal(ra[f"samples/{layer}/position"][:], rb[f"samples/{layer}/position"][:])
        assert np.array_equal(ra[f"samples/{layer}/image_index"][:], np.repeat(np.arange(6), 2))
        np.testing.assert_allclose(ra[f"samples/{layer}/activations"][:].astype(np.float32),
                                   rb[f"samples/{layer}/activations"][:].astype(np.float32), rtol=2e-2, atol=2e-2)
    assert ra["samples/mixed5b/activations"].shape == (12, 1024)
    assert ra["samples/mixed4c/attributions"].shape == (12, 1000)
    top5 = ra["images/top5"][:]
    assert (top5 >= 0).all()
    meta = dict(ra.attrs)
    for key in ("model", "weights_sha256", "layers", "seed", "preprocessing", "image_list_hash", "atlas_version"):
        assert key in meta


def test_corrupt_images_are_skipped_counted_and_logged(net, photos, tmp_path):
    listing = tmp_path / "list.txt"
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    listing.write_text(f"{photos / 'n04251144_snorkel.JPEG'}\n{bad}\n{photos / 'n01440764_tench.JPEG'}\n")
    result = sample(listing, ["mixed4c"], tmp_path / "run", net=net, workers=0, progress=False, attribution=False)
    assert result.n_skipped == 1 and result.n_samples == {"mixed4c": 2}
    assert "broken.jpg" in (tmp_path / "run/log.txt").read_text()
    summary = info(tmp_path / "run")
    assert summary["n_skipped"] == 1 and summary["layers"]["mixed4c"]["samples"] == 2
    assert summary["layers"]["mixed4c"]["attribution"] is False


def test_other_settings_in_same_folder_are_rejected(net, photo_list, tmp_path):
    sample(photo_list, ["mixed4c"], tmp_path / "r", net=net, workers=0, progress=False, max_images=2, attribution=False)
    with pytest.raises(AtlasError, match="different settings.*seed"):
        sample(photo_list, ["mixed4c"], tmp_path / "r", net=net, workers=0, progress=False, max_images=2, attribution=False, seed=9)


def _atlas(*args, **kwargs):
    return subprocess.run([sys.executable, "-c", "from atlas.cli import main; main()", *args],
                          capture_output=True, text=True, **kwargs)


def test_sigkill_then_resume_gives_exactly_the_uninterrupted_samples(photo_list, tmp_path):
    args = ["sample", "--images", str(photo_list), "--layer", "mixed4c", "--weights", str(WEIGHTS), "--per-image", "2",
            "--batch-size", "2", "--workers", "0", "--shard-size", "2", "--max-images", "12"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", "from atlas.cli import main; main()", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    flags = killed / "store.zarr" / "images" / "shard_done" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if flags.is_dir() and len(os.listdir(flags)) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = zarr.open_group(killed / "store.zarr", mode="r")["images/shard_done"][:]
    assert 0 < done.sum() < done.size
    assert _atlas(*args, "--out", str(killed)).returncode == 0
    assert _atlas(*args, "--out", str(tmp_path / "whole")).returncode == 0
    a = zarr.open_group(killed / "store.zarr", mode="r")
    b = zarr.open_group(tmp_path / "whole/store.zarr", mode="r")
    for name in ("activations", "attributions", "image_index", "position", "valid"):
        assert np.array_equal(a[f"samples/mixed4c/{name}"][:], b[f"samples/mixed4c/{name}"][:]), name
    assert a["samples/mixed4c/valid"][:].sum() == 24


def test_cli_errors_are_one_line(tmp_path):
    result = _atlas("sample", "--images", str(tmp_path / "none"), "--layer", "mixed4c", "--out", str(tmp_path / "r"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "atlas: error:" in result.stderr
    result = _atlas("info", str(tmp_path))
    assert result.returncode == 2 and "no atlas run" in result.stderr


def test_info_json_is_stable(net, photo_list, tmp_path):
    sample(photo_list, ["mixed4c"], tmp_path / "r", net=net, workers=0, progress=False, max_images=3)
    result = _atlas("info", str(tmp_path / "r"), "--json")
    data = json.loads(result.stdout)
    assert data["schema"] == 1 and data["model"] == "inceptionv1" and data["n_images"] == 3
    assert data["layers"]["mixed4c"]["samples"] == 3 and data["layers"]["mixed4c"]["grid_hw"] == [14, 14]
