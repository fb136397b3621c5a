"""Projections of units back to pixels (issue 13, part 2): deconvnet, guided backpropagation, the gradient.

- On a tiny conv-relu-maxpool-conv-relu network, each method equals an independent hand-written version
  (explicit max-unpooling by the pooling indices, transposed convolutions, the method's rectification), and the
  deconvnet differs from the gradient: it cuts the negative signals on the way back instead of masking by the
  forward pass.
- With the real BVLC weights on real photos (mixed3a, mixed4c) and a random-weight torchvision resnet18, every
  projection of every method is zero outside the unit's receptive field (atlas.units.receptive) and not zero inside;
  a unit whose activation is 0 projects to exactly 0; the model's own forward and backward are unchanged afterwards.
- to_display's scaling and geometry; the writer against the pure core on a real sampled run, resumable, with its
  one-line errors.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from atlas import store
from atlas.data import load_image
from atlas.errors import AtlasError
from atlas.models import LocalResponseNorm, Network, load_model
from atlas.units.projections import METHODS, project_units, to_display, write_projections
from atlas.units.receptive import receptive_field
from atlas.units.topk import fit_patch

# --------------------------------------------------------------------------- a tiny network, by hand


def tiny_net(lrn: bool = False) -> Network:
    """conv1 -> relu -> [LRN] -> maxpool(2) -> conv2 -> relu, random weights (the LRN strong enough to matter)."""
    torch.manual_seed(0)
    norm = LocalResponseNorm(3, alpha=3.0, beta=0.75, k=1.0) if lrn else nn.Identity()
    module = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 6, 3, padding=1), relu1=nn.ReLU(), norm=norm, pool=nn.MaxPool2d(2, 2),
        conv2=nn.Conv2d(6, 5, 3, padding=1), relu2=nn.ReLU(),
    )).eval().requires_grad_(False)  # fmt: skip
    return Network(name="tiny", module=module)


def by_hand(net: Network, x: torch.Tensor, units: torch.Tensor, method: str) -> torch.Tensor:
    """The three methods written out: explicit unpooling by the pooling indices, transposed convolutions, each method's
    ReLU rule; the LRN (when there is one) passed through by the deconvnet, its own vector-Jacobian product otherwise."""
    m = net.module
    a1 = m.conv1(x)
    r1 = a1.clamp(min=0)
    n1 = m.norm(r1)
    p, switches = F.max_pool2d(n1, 2, 2, return_indices=True)
    a2 = m.conv2(p)
    r2 = a2.clamp(min=0)
    rows = torch.arange(x.shape[0])
    seed = torch.zeros_like(r2)
    seed[rows, units[:, 0], units[:, 1], units[:, 2]] = r2[rows, units[:, 0], units[:, 1], units[:, 2]]

    def rectify(signal: torch.Tensor, forward_input: torch.Tensor) -> torch.Tensor:
        if method == "deconvnet":
            return signal.clamp(min=0)  # rectification of the signal only, whatever the forward did
        if method == "guided":
            return signal * (signal > 0) * (forward_input > 0)
        return signal * (forward_input > 0)  # the gradient of a ReLU

    g = rectify(seed, a2)
    g = F.conv_transpose2d(g, m.conv2.weight, padding=1)  # transposed filters
    g = F.max_unpool2d(g, switches, 2, 2, output_size=n1.shape[-2:])  # the switches
    if isinstance(m.norm, LocalResponseNorm) and method != "deconvnet":
        g = torch.autograd.functional.vjp(lambda t: m.norm(t), r1, g)[1]
    g = rectify(g, a1)
    return F.conv_transpose2d(g, m.conv1.weight, padding=1)


def tiny_inputs(net: Network) -> tuple[torch.Tensor, torch.Tensor]:
    """Four images and, for each, its strongest unit (an active one)."""
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(1)) - 0.3
    out = net.module(x)
    units = []
    for i in range(4):
        flat = int(out[i].flatten().argmax())
        units.append((flat // 36, flat % 36 // 6, flat % 6))
    return x, torch.tensor(units)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_equals_the_hand_written_one_on_a_tiny_network(method):
    net = tiny_net()
    x, units = tiny_inputs(net)
    got = project_units(net, "relu2", x, units, method)
    want = by_hand(net, x, units, method)
    assert got.shape == x.shape and got.dtype == torch.float32
    assert want.abs().amax((1, 2, 3)).min() > 0  # every unit here is active: the comparison is not of zeros
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_the_deconvnet_passes_lrn_through_and_the_gradients_keep_its_backward(method):
    net = tiny_net(lrn=True)
    x, units = tiny_inputs(net)
    got = project_units(net, "relu2", x, units, method)
    torch.testing.assert_close(got, by_hand(net, x, units, method), rtol=1e-5, atol=1e-6)
    # the LRN matters here: without it (the same weights) the projection is another one
    assert (got - project_units(tiny_net(), "relu2", x, units, method)).abs().max() > 1e-3 * got.abs().max()
    assert not any("forward" in mod.__dict__ for mod in net.module.modules())


def test_the_deconvnet_cuts_negative_signals_where_the_gradient_masks_by_the_forward_pass():
    net = tiny_net()
    x, units = tiny_inputs(net)
    deconv = project_units(net, "relu2", x, units, "deconvnet")
    grad = project_units(net, "relu2", x, units, "gradient")
    guided = project_units(net, "relu2", x, units, "guided")
    assert (deconv - grad).abs().max() > 1e-3 * grad.abs().max()
    assert (guided - grad).abs().max() > 1e-3 * grad.abs().max()
    # the gradient is the true one: d(activation)/d(input) times the activation, as plain autograd gives it
    xg = x.clone().requires_grad_(True)
    out = net.module(xg)
    rows = torch.arange(4)
    act = out[rows, units[:, 0], units[:, 1], units[:, 2]]
    (plain,) = torch.autograd.grad(act, xg, grad_outputs=act.detach())
    torch.testing.assert_close(grad, plain)
    # at the layer below the pool, the deconvnet's signal is never negative (it was rectified on the way back),
    # the gradient's is: read both signals where they enter conv1's transposed filters
    seen: dict[str, torch.Tensor] = {}
    signal: list[torch.Tensor] = []
    handle = net.module.conv1.register_full_backward_hook(lambda _m, _gi, go: signal.append(go[0].detach()))
    try:
        for method in ("deconvnet", "gradient"):
            project_units(net, "relu2", x, units, method)
            seen[method] = signal.pop()
    finally:
        handle.remove()
    assert seen["deconvnet"].min() >= 0 and seen["gradient"].min() < 0


def test_a_unit_with_zero_activation_projects_to_zero_in_a_batch_with_active_ones():
    net = tiny_net()
    x, units = tiny_inputs(net)
    out = net.module(x)
    dead = (out == 0).nonzero()[0]  # (image, channel, y, x) of a dead unit of image dead[0]
    units[int(dead[0])] = dead[1:]
    for method in METHODS:
        p = project_units(net, "relu2", x, units, method)
        assert torch.equal(p[int(dead[0])], torch.zeros_like(p[0])), method
        others = [i for i in range(4) if i != int(dead[0])]
        assert p[others].abs().amax((1, 2, 3)).min() > 0, method


# --------------------------------------------------------------------------- the real model on real photos


def real_images(photos: Path, n: int) -> torch.Tensor:
    names = sorted(photos.glob("*.JPEG"))[::97][:n]
    arrays = [np.asarray(load_image(str(p), 256, 224)) for p in names]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def strongest_units(net: Network, layer: str, x: torch.Tensor, channels: list[int], corner: bool = False) -> torch.Tensor:
    """(channel, y, x) per image: the strongest position of a channel (or, with ``corner``, the bottom-right one)."""
    acts = net.activations(x, [layer])[layer]
    h, w = acts.shape[-2:]
    rows = []
    for i, c in enumerate(channels):
        if corner:
            rows.append((c, h - 1, w - 1))
        else:
            flat = int(acts[i, c].flatten().argmax())
            rows.append((c, flat // w, flat % w))
    return torch.tensor(rows)


def assert_inside_fields(net: Network, layer: str, x: torch.Tensor, units: torch.Tensor) -> None:
    field = receptive_field(net, layer, x.shape[-1])
    acts = net.activations(x, [layer])[layer]
    got = {}
    for method in METHODS:
        p = got[method] = project_units(net, layer, x, units, method)
        for i, (c, y, xx) in enumerate(units.tolist()):
            top, left, bottom, right = field.box(y, xx, x.shape[-1])
            inside = torch.zeros(x.shape[-2:], dtype=torch.bool)
            inside[top:bottom, left:right] = True
            support = p[i].abs().sum(0) > 0
            assert not (support & ~inside).any(), (layer, method, i, field, (top, left, bottom, right))
            if float(acts[i, c, y, xx]) > 0:
                assert support.any(), (layer, method, i)  # an active unit projects to something
    active = acts[torch.arange(len(units)), units[:, 0], units[:, 1], units[:, 2]] > 0
    if active.any():  # three different pictures: the rectification on the way back changes the result
        d, g, gb = (got[m][active] for m in METHODS)
        assert (d - g).abs().max() > 0.01 * g.abs().max() and (gb - g).abs().max() > 0.01 * g.abs().max()


@pytest.mark.parametrize("layer", ["mixed3a", "mixed4c"])
def test_projections_are_zero_outside_the_receptive_field_inception(net, photos, layer):
    x = real_images(photos, 3)
    units = strongest_units(net, layer, x, [3, 40, 101])
    assert_inside_fields(net, layer, x, units)
    if layer == "mixed3a":  # a corner unit: its box is clipped at the image border (mixed4c's 299 px field covers it all)
        assert_inside_fields(net, layer, x[:1], strongest_units(net, layer, x[:1], [5], corner=True))


def test_projections_are_zero_outside_the_receptive_field_resnet18(photos):
    torch.manual_seed(0)
    resnet = load_model("resnet18", pretrained=False)  # random weights: none can be downloaded here
    x = real_images(photos, 3)
    for layer in ("layer2.0", "layer1"):  # a residual block with a strided shortcut; the end of a stage
        assert_inside_fields(resnet, layer, x, strongest_units(resnet, layer, x, [1, 17, 30]))


def test_a_real_unit_with_zero_activation_projects_to_exactly_zero(net, photos):
    x = F.interpolate(real_images(photos, 2), size=128, mode="area")  # smaller: the test is of zeros, not of fields
    acts = net.activations(x, ["mixed4c"])["mixed4c"]
    dead = (acts[0] == 0).nonzero()[0].tolist()
    units = torch.tensor([dead, strongest_units(net, "mixed4c", x, [0, 11])[1].tolist()])
    for method in METHODS:
        p = project_units(net, "mixed4c", x, units, method)
        assert torch.equal(p[0], torch.zeros_like(p[0])), method
        assert p[1].abs().max() > 0, method


def plain_gradient(net: Network, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xg = x.clone().requires_grad_(True)
    out = net.module(xg)
    (g,) = torch.autograd.grad(out[:, 3].sum(), xg)
    return out.detach(), g


def test_the_model_is_unchanged_afterwards_also_after_an_error(net, photos):
    x = F.interpolate(real_images(photos, 1), size=128, mode="area")
    before = plain_gradient(net, x)
    for method in METHODS:
        project_units(net, "mixed4c", x, torch.tensor([[5, 3, 3]]), method)
    with pytest.raises(RuntimeError):  # fails inside the forward, while the ReLUs are swapped
        project_units(net, "mixed5b", torch.rand(1, 3, 8, 8), torch.tensor([[0, 0, 0]]), "deconvnet")
    after = plain_gradient(net, x)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert not any("forward" in m.__dict__ for m in net.module.modules())


def test_bad_units_layers_and_methods_are_one_line(net):
    x = torch.rand(1, 3, 64, 64)
    cases = [
        (dict(layer="mixed4c", units=[[600, 0, 0]]), "outside layer 'mixed4c'"),
        (dict(layer="mixed4c", units=[[0, 9, 0]]), "outside layer"),
        (dict(layer="mixed4c", units=[[0, 0, 0], [1, 0, 0]]), "units must be (n, 3)"),
        (dict(layer="nope", units=[[0, 0, 0]]), "unknown layer 'nope'"),
        (dict(layer="logits", units=[[0, 0, 0]]), "no spatial positions (shape (1000,)); layers with positions: conv2d0, "),
        (dict(layer="mixed4c", units=[[0, 0, 0]], method="lrp"), "unknown projection method 'lrp'"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(AtlasError, match=None) as err:
            project_units(net, images=x, **kwargs)
        assert needle in str(err.value) and "\n" not in str(err.value), (kwargs, str(err.value))


def test_functional_relus_and_other_nonlinearities_are_refused_for_deconvnet_and_guided():
    googlenet = load_model("googlenet", pretrained=False)  # torchvision's: F.relu inside BasicConv2d
    x = torch.rand(1, 3, 64, 64)
    for method in ("deconvnet", "guided"):
        with pytest.raises(AtlasError, match="applies ReLU as a function"):
            project_units(googlenet, "mixed3a", x, torch.tensor([[0, 1, 1]]), method)
    assert project_units(googlenet, "mixed3a", x, torch.tensor([[0, 1, 1]]), "gradient").shape == x.shape
    mobilenet = load_model("mobilenet_v2", pretrained=False)  # ReLU6 modules: no deconvnet rule for them
    with pytest.raises(AtlasError, match="applies ReLU6/hardtanh before layer 'features.3'"):
        project_units(mobilenet, "features.3", x, torch.tensor([[0, 1, 1]]), "guided")
    assert project_units(mobilenet, "features.3", x, torch.tensor([[0, 1, 1]]), "gradient").shape == x.shape


# --------------------------------------------------------------------------- display


def test_to_display_scales_around_grey_and_fits_the_box_into_the_patch():
    p = torch.zeros(3, 40, 40)
    p[0, 10, 20] = 2.0  # the maximum |v|
    p[1, 11, 21] = -2.0
    p[2, 12, 22] = 1.0
    p[0, 0, 0] = 99.0  # outside the box: neither shown nor counted in the scale
    out = to_display(p, (10, 20, 20, 40), 8, percentile=100)  # a 10 x 20 box into 8 x 8: 4 x 8, centred (rows 2..5)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert (out[:2] == 127).all() and (out[6:] == 127).all()  # grey around
    full = to_display(p, (10, 20, 20, 40), 20, percentile=100)  # 10 x 20 into 20 x 20: no resampling, rows 5..14
    inner = full[5:15]
    assert inner[0, 0].tolist() == [255, 128, 128]
    assert inner[1, 1].tolist() == [128, 0, 128]
    assert inner[2, 2].tolist() == [128, 128, 191]
    assert (inner[5:] == 128).all()  # zero is mid grey
    zero = to_display(torch.zeros(3, 40, 40), (0, 0, 40, 40), 16)
    assert (zero == 128).all()
    # the default contrast: a lone spike saturates instead of flattening everything else to grey
    texture = torch.linspace(-1, 1, 40 * 40 * 3).reshape(3, 40, 40)
    texture[0, 20, 20] = 1000.0
    shown = to_display(texture, (0, 0, 40, 40), 40).astype(int)
    flat = to_display(texture, (0, 0, 40, 40), 40, percentile=100).astype(int)
    assert shown[20, 20, 0] == 255 and shown.std() > 40 and flat.std() < 3
    # the geometry is the top-k patches' own: the same pixels are covered as by fit_patch of a photo
    for box, size in (((10, 20, 20, 40), 8), ((0, 3, 37, 40), 16), ((5, 5, 6, 6), 4)):
        shown = to_display(torch.ones(3, 40, 40), box, size) != 127
        covered = fit_patch(Image.new("RGB", (40, 40), (0, 0, 0)), box, size) != 127
        np.testing.assert_array_equal(shown, covered)


# --------------------------------------------------------------------------- the writer, on a real sampled run

LAYER = "mixed4c"


@pytest.fixture(scope="module")
def run(tmp_path_factory, photos, net):
    """A real run of 4 photos (copied, so a test can take them away) and its top-5 examples per channel of mixed4c
    from the real top-k pass: 4 examples and one pad per channel."""
    import shutil

    from atlas.sample import sample
    from atlas.units.topk import top_examples

    base = tmp_path_factory.mktemp("proj")
    folder = base / "photos"
    folder.mkdir()
    for path in sorted(photos.glob("*.JPEG"))[::150][:4]:
        shutil.copy(path, folder / path.name)
    out = base / "run"
    sample(folder, [LAYER], out, attribution=False, workers=0, batch_size=4, progress=False, net=net)
    top_examples(out, [LAYER], k=5, patch=32, workers=0, progress=False, net=net)
    paths = [str(p) for p in store.open_store(out)["images/path"][...]]
    x = torch.from_numpy(np.stack([np.asarray(load_image(p, 256, 224)) for p in paths])).permute(0, 3, 1, 2).float() / 255.0
    return out, x


def test_the_writer_stores_what_the_pure_core_computes_and_resumes(run, net):
    out, x = run
    summary = write_projections(out, LAYER, "deconvnet", channels=[7, 300], batch_size=3, progress=False, net=net)
    assert summary["channels"] == 2 and summary["projections"] == 8 and summary["skipped_images"] == 0
    root = store.open_store(out)
    group = root[f"units/{LAYER}/projection/deconvnet"]
    top = root[f"units/{LAYER}/top"]
    assert group["image"].shape == (512, 5, 32, 32, 3)  # full size, the geometry of top/patch
    done = group["done"][...]
    assert done[[7, 300]].all() and done.sum() == 2
    images, scale = group["image"][...], group["scale"][...]
    for c in (7, 300):
        ids, pos, box = top["image"][c], top["pos"][c], top["box"][c]
        assert (ids[:4] >= 0).all() and ids[4] == -1  # four photos, k = 5: one pad
        units = torch.tensor([[c, int(p[0]), int(p[1])] for p in pos[:4]])
        p = project_units(net, LAYER, x[ids[:4]], units, "deconvnet")
        for j in range(4):
            np.testing.assert_array_equal(images[c, j], to_display(p[j], box[j], 32))
            t, left, b, r = box[j]
            assert scale[c, j] == pytest.approx(float(p[j][:, t:b, left:r].abs().max()), rel=1e-6)
            assert scale[c, j] > 0
        assert (images[c, 4] == 127).all() and scale[c, 4] == 0  # the pad
    assert (images[8] == 127).all()  # not asked for: untouched
    # resumable: a rerun skips what is done; a channel whose flag is cleared is redone, the others stay byte-equal
    again = write_projections(out, LAYER, "deconvnet", channels=[7, 300], progress=False, net=net)
    assert again["channels_computed"] == 0 and again["computed"] == 0
    assert again["channels"] == 2 and again["projections"] == 8  # the summary counts what the node holds, not only this call's
    path = f"units/{LAYER}/projection/deconvnet"
    root = store.open_store(out, mode="r+")
    flags = root[f"{path}/done"][...]
    flags[7] = False
    root[f"{path}/done"][...] = flags
    root[f"{path}/image"][7] = np.zeros((5, 32, 32, 3), np.uint8)
    redo = write_projections(out, LAYER, "deconvnet", channels=[7, 300], progress=False, net=net)
    assert redo["channels_computed"] == 1 and redo["computed"] == 4 and redo["projections"] == 8
    np.testing.assert_array_equal(store.open_store(out)[f"{path}/image"][...], images)
    store.verify(out, [path])  # sealed by finish_stage
    # the top-k pass rewrites a channel's row (its examples reordered): that channel's projections are stale and redone
    tpath = f"units/{LAYER}/top"
    order = [1, 0, 2, 3, 4]
    store.begin_stage(out, "units", [tpath])
    root = store.open_store(out, mode="r+")
    for name in ("image", "pos", "box"):
        root[f"{tpath}/{name}"][300] = root[f"{tpath}/{name}"][300][order]
    store.finish_stage(out, "units", [tpath])
    stale = write_projections(out, LAYER, "deconvnet", channels=[7, 300], progress=False, net=net)
    assert stale["channels_computed"] == 1 and stale["computed"] == 4
    now = store.open_store(out)[f"{path}/image"][...]
    np.testing.assert_array_equal(now[300], images[300][order])
    np.testing.assert_array_equal(now[7], images[7])


def test_the_writer_s_bad_input_is_one_line(run, net, tmp_path):
    out, _ = run
    with pytest.raises(AtlasError, match="channel 512 is out of range: the layer has 512 channels"):
        write_projections(out, LAYER, channels=[3, 512], progress=False, net=net)
    with pytest.raises(AtlasError, match="unknown projection method 'deconv'"):
        write_projections(out, LAYER, method="deconv", progress=False, net=net)
    with pytest.raises(AtlasError, match="no top examples for layer 'mixed4b'"):
        write_projections(out, "mixed4b", progress=False, net=net)
    # an unreadable example image is skipped and counted (grey, scale 0, a line in log.txt); the others are computed
    top = store.open_store(out)[f"units/{LAYER}/top"]
    victim = Path(str(store.open_store(out)["images/path"][int(top["image"][7, 0])]))
    original = victim.read_bytes()
    victim.write_bytes(original[:200])  # truncated JPEG
    try:
        summary = write_projections(out, LAYER, "gradient", channels=[7], progress=False, net=net)
    finally:
        victim.write_bytes(original)
    assert summary["skipped_images"] == 1 and summary["projections"] == 3
    group = store.open_store(out)[f"units/{LAYER}/projection/gradient"]
    assert (group["image"][7, 0] == 127).all() and group["scale"][7, 0] == 0 and (group["scale"][7, 1:4] > 0).all()
    assert "1 unreadable example images skipped" in (out / "log.txt").read_text()
    # a run whose photos are gone: the missing folder is named, nothing is written
    folder = Path(str(store.open_store(out)["images/path"][0])).parent
    hidden = folder.with_name("photos-away")
    folder.rename(hidden)
    try:
        with pytest.raises(AtlasError, match=f"folder {folder} not found"):
            write_projections(out, LAYER, "guided", channels=[1], progress=False, net=net)
    finally:
        hidden.rename(folder)
    assert f"units/{LAYER}/projection/guided" not in store.open_store(out)


def test_an_interrupted_writer_keeps_finished_channels_and_resumes(run, net, monkeypatch):
    import atlas.units.projections as projections

    out, _ = run
    real, calls = projections.project_units, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while channel 21 is being computed
        return real(*args, **kwargs)

    monkeypatch.setattr(projections, "project_units", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_projections(out, LAYER, "guided", channels=[20, 21], batch_size=4, progress=False, net=net)
    path = f"units/{LAYER}/projection/guided"
    group = store.open_store(out)[path]
    assert group["done"][20] and not group["done"][21]
    first = group["image"][20]
    with pytest.raises(AtlasError, match="incomplete"):  # a reader is told, not given half-written data
        store.verify(out, [path])
    monkeypatch.setattr(projections, "project_units", real)
    resumed = write_projections(out, LAYER, "guided", channels=[20, 21], batch_size=4, progress=False, net=net)
    assert resumed["channels_computed"] == 1 and resumed["computed"] == 4
    assert resumed["channels"] == 2 and resumed["projections"] == 8  # what the node holds after the resume
    group = store.open_store(out)[path]
    assert group["done"][[20, 21]].all() and (group["scale"][21, :4] > 0).all()
    np.testing.assert_array_equal(group["image"][20], first)
    store.verify(out, [path])
