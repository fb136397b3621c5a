"""The feature-inversion renderer, with the real BVLC weights and photos from ../shared."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from conftest import PHOTOS, WEIGHTS, require_shared

from atlas.data import load_image, position_to_pixels, to_tensor
from atlas.errors import AtlasError
from atlas.render import render, sample_patches, visualize
from atlas.store import create_array, write_array

LAYER = "mixed4c"
NAMES = ["n01443537_goldfish.JPEG", "n01514859_hen.JPEG", "n02085620_Chihuahua.JPEG",
         "n02123045_tabby.JPEG", "n03000134_chainlink_fence.JPEG", "n09472597_volcano.JPEG"]


@pytest.fixture(scope="module")
def rnet():
    """A model of our own: the render loop changes the module's memory format while it runs."""
    require_shared()
    from atlas.models import load_model

    return load_model("inceptionv1", WEIGHTS)


@pytest.fixture(scope="module")
def photo_acts(rnet):
    """mixed4c activations (n, 512, 14, 14) of a few real photos."""
    paths = [PHOTOS / n for n in NAMES if (PHOTOS / n).is_file()]
    assert len(paths) >= 4, "expected the shared photos"
    x = torch.stack([to_tensor(load_image(p)) for p in paths])
    with torch.no_grad():
        return paths, rnet.activations(x, [LAYER])[LAYER]


def test_channel_icon_drives_its_channel_far_above_photos(rnet, photo_acts):
    _, acts = photo_acts
    channel = int(acts.mean((0, 2, 3)).argsort()[len(acts[0]) // 2])  # a channel of middling typical activity
    result = visualize(rnet, LAYER, channel=channel, size=48, steps=24, seed=1)
    icon = torch.from_numpy(result.images).permute(0, 3, 1, 2)
    with torch.no_grad():
        got = rnet.activations(icon, [LAYER])[LAYER][0, channel].mean().item()
    photos = acts[:, channel].mean((1, 2))
    assert got > 4 * photos.mean().item() and got > 2 * photos.max().item(), (got, photos.tolist())


def test_direction_objective_improves_and_cosine_is_high(rnet, photo_acts):
    _, acts = photo_acts
    v = acts[:2, :, 6:8, 6:8].mean((2, 3))
    result = visualize(rnet, LAYER, v, size=48, steps=24, seed=0)
    trace = result.trace.mean(1)
    assert trace[-5:].mean() > 3 * trace[:5].mean()
    assert result.objective.shape == (2,) and np.all(result.cosine > 0.4), result.cosine


def test_icons_finite_in_range_and_reproducible(rnet, photo_acts):
    _, acts = photo_acts
    v = acts[:2, :, 7, 7]
    a = visualize(rnet, LAYER, v, size=48, steps=4, seed=3, attempts=2)
    b = visualize(rnet, LAYER, v, size=48, steps=4, seed=3, attempts=2)
    c = visualize(rnet, LAYER, v, size=48, steps=4, seed=4, attempts=2)
    assert a.images.shape == (2, 48, 48, 3) and np.isfinite(a.images).all()
    assert a.images.min() >= 0 and a.images.max() <= 1
    np.testing.assert_array_equal(a.images, b.images)
    assert np.abs(a.images - c.images).mean() > 1e-3
    neuron = visualize(rnet, LAYER, neuron=[5], size=48, steps=4)
    assert neuron.images.shape == (1, 48, 48, 3) and np.isfinite(neuron.cosine).all()


def _tiny_run(tmp_path, rnet, photo_acts):
    """A run store holding what render needs: root attrs, samples, one 2 x 2 grid with 3 cells to render, whitening."""
    paths, acts = photo_acts
    root = zarr.open_group(str(tmp_path / "store.zarr"), mode="w")
    root.attrs.update({"model": rnet.name, "weights": rnet.weights, "weights_sha256": rnet.weights_sha256,
                       "preprocessing": {"resize": 256, "crop": 224}})
    names = root.require_group("images").create_array("path", shape=(len(paths),), dtype=str)  # as atlas.sample stores it
    names[...] = np.asarray([str(p) for p in paths], dtype=object)
    positions = np.array([(3, 4), (7, 7), (10, 2)], dtype=np.int16)
    rows_img = np.repeat(np.arange(len(paths), dtype=np.int32), len(positions))
    rows_pos = np.tile(positions, (len(paths), 1))
    samples = root.require_group(f"samples/{LAYER}")
    samples.attrs["grid_hw"] = [14, 14]
    write_array(samples, "image_index", rows_img)
    write_array(samples, "position", rows_pos)
    write_array(samples, "activations", acts[rows_img, :, rows_pos[:, 0], rows_pos[:, 1]].numpy())
    write_array(samples, "valid", np.ones(len(rows_img), bool))
    grid = root.require_group(f"grids/{LAYER}/full/2")
    mask = np.array([[True, True], [False, True]])
    means = np.zeros((2, 2, acts.shape[1]), np.float32)
    nearest = np.full((2, 2, 8), -1, np.int64)
    for k, (gy, gx) in enumerate(np.argwhere(mask)):
        rows = np.arange(k, len(rows_img), 3)[:4]  # same position, different photos
        means[gy, gx] = samples["activations"][...][rows].mean(0)
        nearest[gy, gx, : len(rows)] = rows
    write_array(grid, "render", mask)
    write_array(grid, "mean_activation", means)
    write_array(grid, "nearest", nearest)
    write_array(grid, "count", mask.astype(np.int32) * 4)
    x = acts.permute(0, 2, 3, 1).reshape(-1, acts.shape[1]).numpy().astype(np.float64)
    corr = x.T @ x / len(x)
    matrix = np.linalg.inv(corr + 1e-2 * np.trace(corr) / len(corr) * np.eye(len(corr)))
    create_array(root.require_group(f"whitening/{LAYER}"), "matrix", matrix.shape, np.float32)[...] = matrix
    return root, mask


def test_render_writes_icons_and_cached_rerun_renders_nothing(tmp_path, rnet, photo_acts):
    root, mask = _tiny_run(tmp_path, rnet, photo_acts)
    first = render(tmp_path, LAYER, [2], steps=6, size=48, batch=2, progress=False, net=rnet)[2]
    icons = zarr.open_group(str(tmp_path / "store.zarr"))[f"icons/{LAYER}/full/2"]
    assert first["rendered_now"] == 3 and first["n_done"] == 3
    assert icons["images"].shape == (2, 2, 48, 48, 3) and icons["images"].dtype == np.uint8
    np.testing.assert_array_equal(icons["done"][...], mask)
    assert np.isfinite(icons["cosine"][...][mask]).all() and np.isnan(icons["cosine"][1, 0])
    assert icons.attrs["mode"] == "optimize" and icons.attrs["settings"]["whitened"] and icons.attrs["key"]
    before = icons["images"][...]
    assert before[mask].std() > 5  # not a blank icon
    again = render(tmp_path, LAYER, [2], steps=6, size=48, batch=2, progress=False, net=rnet)[2]
    assert again["rendered_now"] == 0
    # a lost cell is redone alone, and comes out the same although its batch differs
    done = icons["done"][...]
    done[1, 1] = False
    icons["done"][...] = done
    resumed = render(tmp_path, LAYER, [2], steps=6, size=48, batch=2, progress=False, net=rnet)[2]
    assert resumed["rendered_now"] == 1
    after = icons["images"][...]
    assert np.abs(after.astype(int) - before.astype(int)).max() <= 3
    # other settings are another key: everything is rendered again
    other = render(tmp_path, LAYER, [2], steps=7, size=48, batch=2, progress=False, net=rnet)[2]
    assert other["rendered_now"] == 3


def test_examples_mode_and_sample_patches(tmp_path, rnet, photo_acts):
    paths, _ = photo_acts
    _tiny_run(tmp_path, rnet, photo_acts)
    patches = sample_patches(tmp_path, LAYER, [1, 0, -1], size=32, extent=32)
    assert patches.shape == (3, 32, 32, 3) and patches.dtype == np.uint8
    image = np.asarray(load_image(paths[0]))
    cy, cx = position_to_pixels((7, 7), (14, 14), 224)  # row 1 is photo 0 at (7, 7)
    np.testing.assert_array_equal(patches[0], image[int(cy) - 16 : int(cy) + 16, int(cx) - 16 : int(cx) + 16])
    assert (patches[2] == 127).all()
    summary = render(tmp_path, LAYER, [2], icons="examples", size=40, progress=False)[2]
    icons = zarr.open_group(str(tmp_path / "store.zarr"))[f"icons/{LAYER}/full/2"]
    assert summary["n_done"] == 3 and icons.attrs["mode"] == "examples"
    assert icons["images"].shape == (2, 2, 40, 40, 3) and np.all(icons["cosine"][...][icons["done"][...]] > 0.3)
    assert render(tmp_path, LAYER, [2], icons="examples", size=40, progress=False)[2]["rendered_now"] == 0
    with pytest.raises(AtlasError, match="no grid"):
        render(tmp_path, LAYER, [3], icons="examples", progress=False)
    with pytest.raises(AtlasError, match="quality"):
        render(tmp_path, LAYER, [2], quality="best", progress=False)


def test_cli_render_and_export_icons(tmp_path, rnet, photo_acts):
    from typer.testing import CliRunner

    from atlas.cli import app

    _tiny_run(tmp_path, rnet, photo_acts)
    runner = CliRunner()
    result = runner.invoke(app, ["render", str(tmp_path), "--layer", LAYER, "--grid", "2", "--steps", "2", "--size", "32",
                                 "--quality", "standard", "--attempts", "1"])
    assert result.exit_code == 0, result.output
    assert "3/3 icons (3 new" in result.output
    out = tmp_path / "png"
    result = runner.invoke(app, ["export-icons", str(tmp_path), "--layer", LAYER, "--grid", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["0_0.png", "0_1.png", "1_1.png", "sheet.png"]
    from tiny_run import cli, one_line

    one_line(cli("render", tmp_path, "--layer", LAYER, "--grid", "2", "--steps", "4", "--screen", "4"),
             "render.screen must be less than render.steps (4); got 4")


def test_whitened_cosine_is_what_the_optimiser_aligns(rnet, photo_acts):
    """Result.cosine_whitened is cos(h, S v) of the icon's own float32 activations; with S != I it is not cos(h, v)."""
    from atlas.render.objectives import centre

    _, acts = photo_acts
    v = acts[:2, :, 7, 7]
    x = acts.permute(0, 2, 3, 1).reshape(-1, acts.shape[1]).double()
    s = torch.linalg.inv(x.T @ x / len(x) + 1e-2 * torch.eye(len(x.T))).float()  # a real, far-from-identity S
    result = visualize(rnet, LAYER, v, size=48, steps=6, seed=2, whitening=s, attempts=2)
    with torch.no_grad():
        h = centre(rnet.activations(torch.from_numpy(result.images).permute(0, 3, 1, 2), [LAYER])[LAYER]).float()
    sv = v @ s.T
    want_white = (h * sv).sum(1) / (h.norm(dim=1) * sv.norm(dim=1))
    want_raw = (h * v).sum(1) / (h.norm(dim=1) * v.norm(dim=1))
    np.testing.assert_allclose(result.cosine_whitened, want_white.numpy(), atol=1e-4)
    np.testing.assert_allclose(result.cosine, want_raw.numpy(), atol=1e-4)
    assert np.abs(result.cosine_whitened - result.cosine).min() > 0.01, (result.cosine_whitened, result.cosine)
    plain = visualize(rnet, LAYER, v, size=48, steps=2, seed=2)  # no whitening: the two are one figure
    np.testing.assert_allclose(plain.cosine_whitened, plain.cosine, atol=1e-6)
    assert np.isnan(visualize(rnet, LAYER, neuron=[5], size=32, steps=1).cosine_whitened).all()  # no direction term


def test_render_stores_whitened_cosine_and_old_icons_read_na(tmp_path, rnet, photo_acts):
    from atlas.info import format_info, info
    from atlas.render.objectives import centre

    root, mask = _tiny_run(tmp_path, rnet, photo_acts)
    summary = render(tmp_path, LAYER, [2], steps=6, size=48, batch=2, progress=False, net=rnet)[2]
    group = zarr.open_group(str(tmp_path / "store.zarr"), mode="a")
    icons = group[f"icons/{LAYER}/full/2"]
    white, raw = icons["cosine_whitened"][...], icons["cosine"][...]
    assert np.isfinite(white[mask]).all() and np.isnan(white[~mask]).all()
    assert summary["mean_cosine_whitened"] == pytest.approx(float(white[mask].mean()), abs=1e-4)
    # recomputed from the stored (uint8-rounded) icons: equal up to the rounding; the raw cosine is another figure
    s = torch.from_numpy(group[f"whitening/{LAYER}/matrix"][...])
    v = torch.from_numpy(group[f"grids/{LAYER}/full/2/mean_activation"][...][mask])
    pixels = torch.from_numpy(icons["images"][...][mask].astype(np.float32) / 255).permute(0, 3, 1, 2)
    with torch.no_grad():
        h = centre(rnet.activations(pixels, [LAYER])[LAYER]).float()
    sv = v @ s.T
    np.testing.assert_allclose(white[mask], ((h * sv).sum(1) / (h.norm(dim=1) * sv.norm(dim=1))).numpy(), atol=0.02)
    assert np.abs(white[mask] - raw[mask]).min() > 0.01, (white, raw)
    text = format_info(info(tmp_path))
    assert f"mean whitened cos(h, S v) {summary['mean_cosine_whitened']:.3f}" in text
    assert f"mean raw cos(h, v) {summary['mean_cosine']:.3f}" in text
    # icons rendered before the array existed: still valid (same key, nothing re-rendered), reported as n/a
    key, before = icons.attrs["key"], icons["images"][...]
    del icons["cosine_whitened"]
    old = {k: v for k, v in icons.attrs["summary"].items() if k != "mean_cosine_whitened"}
    icons.attrs["summary"] = old
    assert "mean whitened cos(h, S v) n/a" in format_info(info(tmp_path))
    again = render(tmp_path, LAYER, [2], steps=6, size=48, batch=2, progress=False, net=rnet)[2]
    icons = zarr.open_group(str(tmp_path / "store.zarr"))[f"icons/{LAYER}/full/2"]
    assert again["rendered_now"] == 0 and again["mean_cosine_whitened"] is None and icons.attrs["key"] == key
    np.testing.assert_array_equal(icons["images"][...], before)
    assert "mean whitened cos(h, S v) n/a" in format_info(info(tmp_path))


def test_screened_render_ignores_batch_and_resume_and_is_its_own_key(tmp_path, rnet, photo_acts):
    """Successive halving through the render stage: the icons do not depend on the batch size or on a lost cell being
    redone alone, the trial is part of the icons' key, and a trial not shorter than the run is one line."""
    _tiny_run(tmp_path, rnet, photo_acts)
    opts = dict(steps=6, size=48, attempts=3, screen=2, progress=False, net=rnet)
    first = render(tmp_path, LAYER, [2], batch=3, **opts)[2]
    icons = zarr.open_group(str(tmp_path / "store.zarr"))[f"icons/{LAYER}/full/2"]
    before = icons["images"][...]
    assert first["rendered_now"] == 3 and icons.attrs["settings"]["screen"] == 2
    done = icons["done"][...]
    done[0, 1] = False
    icons["done"][...] = done
    assert render(tmp_path, LAYER, [2], batch=1, **opts)[2]["rendered_now"] == 1
    assert np.abs(icons["images"][...].astype(int) - before.astype(int)).max() <= 3
    unscreened = render(tmp_path, LAYER, [2], batch=3, **(opts | {"screen": 0}))[2]
    reopened = zarr.open_group(str(tmp_path / "store.zarr"))[f"icons/{LAYER}/full/2"]
    assert unscreened["rendered_now"] == 3 and "screen" not in reopened.attrs["settings"]
    with pytest.raises(AtlasError, match=r"^render.screen must be less than render.steps \(6\); got 6$"):
        render(tmp_path, LAYER, [2], **(opts | {"screen": 6}))
    # the standard preset is this strategy at full size: 4 seeds, a 64-step trial, the best to 512 (704 icon-steps)
    from atlas.render.run import optimizer_settings
    from atlas.settings import RenderSettings

    standard, _ = optimizer_settings(RenderSettings())
    assert (standard.steps, standard.attempts, standard.screen, standard.icon_steps) == (512, 4, 64, 704)
    assert optimizer_settings(RenderSettings(steps=64))[0].screen == 0  # a trial no shorter than the run is dropped
