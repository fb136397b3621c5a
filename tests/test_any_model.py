"""Any model: a plain nn.Module through ``atlas.models.wrap``, timm architectures by name, and Vision Transformers'
token layers read as positions (docs/models.md)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import WEIGHTS, require_shared
from torch import nn

from atlas.errors import AtlasError
from atlas.models import load_model
from atlas.models.wrap import Preprocessing, wrap
from atlas.sample import forward_samples

timm = pytest.importorskip("timm")

VIT_FILE = "/work/shared/models/vit_tiny_patch16_224.safetensors"


@pytest.fixture(scope="module")
def reg_vit():
    """A small random ViT with a class token and 4 register tokens (5 prefix tokens) on a non-square 3 x 4 patch grid."""
    torch.manual_seed(0)
    module = timm.models.vision_transformer.VisionTransformer(
        img_size=(48, 64), patch_size=16, embed_dim=32, depth=3, num_heads=2, reg_tokens=4, num_classes=10)
    return wrap(module, Preprocessing(mean=(0.5,) * 3, std=(0.5,) * 3, size=64), name="test-reg-vit")


def test_token_layer_drops_prefix_tokens_and_keeps_the_patch_grid(reg_vit):
    assert (reg_vit.prefix_tokens, reg_vit.patch_grid) == (5, (3, 4))
    x = torch.rand(2, 3, 48, 64)
    seen = {}
    handle = reg_vit.module.get_submodule("net.blocks.1").register_forward_hook(lambda m, i, o: seen.setdefault("t", o))
    try:
        grid = reg_vit.activations(x, ["blocks.1"])["blocks.1"]
    finally:
        handle.remove()
    tokens = seen["t"]  # (2, 5 + 12, 32)
    assert tokens.shape == (2, 17, 32) and grid.shape == (2, 32, 3, 4)
    # patch token 4 * row + column is position (row, column); the prefix tokens are nowhere in the grid
    assert torch.equal(grid[1, :, 2, 1], tokens[1, 5 + 4 * 2 + 1])
    assert torch.equal(grid[0, :, 0, 0], tokens[0, 5])


def test_attribution_through_attention_and_layernorm_equals_per_class_gradients(reg_vit):
    """The one-JVP attribution (forward-mode AD through softmax attention, LayerNorm and GELU) equals h . d logit_c / d h
    of backward passes, at the sampled patch token only."""
    torch.manual_seed(1)
    x = torch.rand(2, 3, 48, 64)
    k = 2
    pos = torch.tensor([[0, 1], [2, 3], [1, 2], [2, 0]])
    acts, attrs, logits = forward_samples(reg_vit, x, ["blocks.1"], {"blocks.1": pos}, attribution=True)
    captured = {}

    def edit(name, out):
        captured[name] = out.detach().requires_grad_(True)
        return captured[name]

    with torch.enable_grad(), reg_vit.hooks(["blocks.1"], edit=edit, stop=False):
        out = reg_vit.module(x)
        h = captured["blocks.1"]
        for c in range(10):
            (grad,) = torch.autograd.grad(out[:, c].sum(), h, retain_graph=True)
            for b in range(4):
                y, xx = pos[b].tolist()
                want = float((h[b // k, :, y, xx] * grad[b // k, :, y, xx]).sum().detach())
                assert attrs["blocks.1"][b, c].item() == pytest.approx(want, rel=1e-3, abs=1e-5)
    assert torch.allclose(acts["blocks.1"][2], h[1, :, 1, 2].detach(), atol=1e-5)
    assert torch.allclose(logits, out.detach(), atol=1e-5)


@pytest.fixture(scope="module")
def vit():
    require_shared()
    return load_model("timm:vit_tiny_patch16_224", VIT_FILE)


def test_real_vit_through_atlas_loader_equals_plain_timm_loop(vit, photos):
    """16 shared photos. The wrapped model on atlas's loader's pixels gives the logits of a plain timm model (weights
    loaded strictly, timm's own normalisation of the same crops) to 1e-4; and top-1 equals a plain timm loop with
    timm's whole transform (its own decoder and bicubic resize: pixels differ slightly, not the predicted class)."""
    from PIL import Image
    from safetensors.torch import load_file
    from torchvision import transforms

    from atlas.data import ImageDataset, list_images, load_image, real_path

    images = list_images(photos).head(16)
    prep = vit.preprocess
    assert (prep["mean"], prep["std"], prep["interpolation"], prep["size"]) == ([0.5] * 3, [0.5] * 3, "bicubic", 224)
    assert prep["resize"] == 248  # timm's eval rule, floor(224 / crop_pct 0.9): what a plain timm loop resizes to
    data = ImageDataset(images, prep["resize"], prep["size"], interpolation=prep["interpolation"])
    x = torch.stack([data[i][1] for i in range(len(data))])
    with torch.inference_mode():
        ours = vit.module(x)

    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    plain.load_state_dict(load_file(VIT_FILE), strict=True)
    plain.eval()
    config = timm.data.resolve_data_config({}, model=plain)
    normalise = transforms.Compose([transforms.ToTensor(), transforms.Normalize(config["mean"], config["std"])])
    crops = [load_image(p, prep["resize"], prep["size"], "bicubic") for p in images.paths]
    whole = timm.data.create_transform(**config)
    with torch.inference_mode():
        same_pixels = plain(torch.stack([normalise(c) for c in crops]))
        own_loop = plain(torch.stack([whole(Image.open(real_path(p)).convert("RGB")) for p in images.paths]))
    assert torch.allclose(ours, same_pixels, atol=1e-4)
    assert torch.equal(ours.argmax(1), own_loop.argmax(1))


def test_layers_of_timm_models_and_the_missing_extra(monkeypatch):
    from tiny_run import cli

    proc = cli("layers", "--model", "timm:vit_tiny_patch16_224")
    assert proc.returncode == 0, proc.stderr
    assert any(line.split()[:3] == ["blocks.6", "192", "14x14"] for line in proc.stdout.splitlines())
    monkeypatch.setitem(sys.modules, "timm", None)
    proc = cli("layers", "--model", "timm:vit_tiny_patch16_224")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "pip install" in proc.stderr


def test_unknown_timm_model_and_weights_of_another_model_are_one_line():
    with pytest.raises(AtlasError, match="unknown timm model"):
        load_model("timm:no_such_net_at_all", pretrained=False)
    require_shared()
    with pytest.raises(AtlasError, match=r"does not fit timm:vit_tiny_patch16_224: 152 of the model's tensors missing .*; 116 tensors"):
        load_model("timm:vit_tiny_patch16_224", WEIGHTS)


def test_relu_only_methods_are_refused_in_one_line_on_a_vit(reg_vit):
    from atlas.units.projections import project_units
    from atlas.weights.reconstruct import reconstruct

    x = torch.rand(1, 3, 48, 64)
    for method in ("deconvnet", "guided"):
        with pytest.raises(AtlasError, match="ReLU networks only") as info:
            project_units(reg_vit, "blocks.1", x, [[0, 1, 1]], method=method)
        assert "softmax attention" in str(info.value) and "GELU" in str(info.value) and "\n" not in str(info.value)
    assert project_units(reg_vit, "blocks.1", x, [[0, 1, 1]], method="gradient").shape == (1, 3, 48, 64)
    with pytest.raises(AtlasError, match="not ReLU, max pooling or LRN"):
        reconstruct(reg_vit, x[0])


class TinyNet(nn.Module):
    """A user's own small CNN: torch modules only, 6 classes."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4, padding=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                                  nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 6))

    def forward(self, x):
        return self.head(self.body(x))


def test_own_module_through_wrap_builds_an_atlas(photo_list, tmp_path):
    """sample -> project -> grid -> render -> tiles on a user's module given from Python: its module paths are the
    layers, its class names are the run's, and later stages find it by the name it was wrapped under."""
    from atlas.build import DEFAULTS, build, merge
    from atlas.store import open_store

    torch.manual_seed(0)
    classes = [f"thing {i}" for i in range(6)]
    net = wrap(TinyNet(), {"mean": (0.4, 0.4, 0.4), "std": (0.25, 0.25, 0.25), "size": 96, "resize": 110},
               classes=classes, name="tiny-user-net")
    assert net.classes == classes and net.activations(torch.rand(1, 3, 96, 96), ["body.2"])["body.2"].shape == (1, 16, 12, 12)
    config = merge(DEFAULTS, {
        "run": {"images": str(photo_list), "out": str(tmp_path / "run"), "layers": ["body.2"]},
        "sample": {"model": "tiny-user-net", "weights": None, "max_images": 6, "per_image": 4, "workers": 0, "batch_size": 6,
                   "attribution": True},
        "project": {"method": "pca"}, "grid": {"sizes": [3], "min_count": 1},
        "render": {"quality": "draft", "steps": 3, "size": 16}, "tiles": {"examples": False}})
    result = build(config, echo=lambda *_: None)
    assert result.ran == ["sample", "project", "grid", "render", "tiles"]
    root = open_store(tmp_path / "run")
    attrs = dict(root.attrs)
    assert attrs["model"] == "tiny-user-net" and attrs["weights_sha256"] == net.weights_sha256
    assert attrs["preprocessing"]["crop"] == 96 and attrs["preprocessing"]["resize"] == 110
    assert root["samples/body.2/attributions"].shape[1] == 6
    assert (tmp_path / "run" / "tiles" / "index.html").is_file()


def make_tiny_net() -> nn.Module:
    """A factory for ``--model test_any_model:make_tiny_net`` (the user's own code, imported by module path)."""
    torch.manual_seed(0)
    return TinyNet()


def test_factory_and_timm_resnet_by_name():
    """``PACKAGE.MODULE:FACTORY`` and a random timm ResNet: module paths (``layer3.1``) are layers; the channels-last copy
    the sampler runs gives the reference kernels' activations and attributions (no prefix tokens in a CNN)."""
    from tiny_run import cli

    proc = cli("layers", "--model", "test_any_model:make_tiny_net", "--size", "96")
    assert proc.returncode == 0, proc.stderr
    assert any(line.split() == ["body.2", "16", "12x12"] for line in proc.stdout.splitlines())
    assert cli("layers", "--model", "no_such_package_here:make").stderr.startswith("atlas: error: cannot import")

    net = load_model("timm:resnet18", pretrained=False)
    assert net.prefix_tokens == 0 and net.patch_grid is None and net.preprocess["interpolation"] in ("bilinear", "bicubic")
    x = torch.rand(2, 3, 96, 96)
    pos = {"layer3.1": torch.tensor([[1, 2], [3, 0]])}
    ref = forward_samples(net, x, ["layer3.1"], pos, attribution=True, forward="nchw")
    fast = forward_samples(net, x, ["layer3.1"], pos, attribution=True, forward="fused")
    for a, b in zip(ref[:2], fast[:2], strict=True):
        assert torch.allclose(a["layer3.1"], b["layer3.1"], rtol=1e-3, atol=1e-4)


def test_a_token_shows_its_own_patch_in_the_unit_lens(vit):
    from atlas.units.receptive import Field, receptive_field, spatial_layers

    assert receptive_field(vit, "blocks.6") == Field(size=16, stride=16, offset=0.0)
    assert {"blocks.6", "norm"} <= set(spatial_layers(vit)) and "head" not in spatial_layers(vit)
    assert receptive_field(vit, "blocks.6").box(13, 0) == (208, 0, 224, 16)


def test_direction_icons_of_a_token_layer_at_any_icon_size(vit):
    """The renderer's FFT image and transforms on the real ViT: 64 px icons reach the model at its 224 px (resampled in
    the wrapper), the direction is read at the centre token, and optimising raises cos(h, v) over the first step's."""
    from atlas.render.optimize import Settings, visualize

    torch.manual_seed(0)
    v = torch.randn(2, 192)
    settings = Settings(precision="float32")
    first = visualize(vit, "blocks.6", directions=v, size=64, steps=1, settings=settings)
    later = visualize(vit, "blocks.6", directions=v, size=64, steps=24, settings=settings)
    assert later.images.shape == (2, 64, 64, 3)
    assert (later.cosine > first.cosine + 0.1).all(), (first.cosine, later.cosine)


@pytest.fixture(scope="module")
def vit_run(vit, photo_list, tmp_path_factory):
    """A tiny sampled run of the real ViT-Ti at ``blocks.6``: 3 photos x 2 positions, with attribution."""
    from atlas.data import list_images
    from atlas.sample import sample

    run = tmp_path_factory.mktemp("vit") / "run"
    sample(list_images(photo_list).head(3), ["blocks.6"], run, model="timm:vit_tiny_patch16_224", weights=VIT_FILE, per_image=2, workers=0,
           attribution=True, progress=False, net=vit, precision="float32")
    return run


def test_vit_run_sampled_then_unit_lens_top_k_on_the_models_own_pixels(vit, photo_list, vit_run):
    """A ViT run records its bicubic preprocessing and token handling; the unit lens's top-k pass reads the photos as the
    sampler did (bicubic), so each top value is the token's activation on the model's own pixels."""
    from atlas import store
    from atlas.data import list_images, load_image, to_tensor
    from atlas.units.topk import top_examples

    images = list_images(photo_list).head(3)
    root = store.open_store(vit_run)
    prep = dict(root.attrs)["preprocessing"]
    assert (prep["interpolation"], prep["resize"], prep["crop"]) == ("bicubic", vit.preprocess["resize"], 224)
    assert "first 1 (class/register) tokens dropped" in prep["tokens"]
    top_examples(vit_run, "blocks.6", k=2, channels=[0, 5], workers=0, progress=False, net=vit)
    g = root["units/blocks.6/top"]
    value, image, pos = g["value"][:], g["image"][:], g["pos"][:]
    x = torch.stack([to_tensor(load_image(p, prep["resize"], 224, "bicubic")) for p in images.paths])
    with torch.inference_mode():
        acts = vit.activations(x, ["blocks.6"])["blocks.6"]
    for ch in (0, 5):
        assert value[ch, 0] == pytest.approx(float(acts[:, ch].max()), rel=1e-4, abs=1e-4)
        assert value[ch, 0] == pytest.approx(float(acts[image[ch, 0], ch, pos[ch, 0, 0], pos[ch, 0, 1]]), rel=1e-4, abs=1e-4)


def test_occlusion_on_a_vit_shows_the_gradient_projection_in_panel_b(vit, photos):
    """The occlusion view of a Vision Transformer: the maps as for any model; panel (b), a deconvnet projection on a
    ReLU network, is the unit's gradient here (the deconvnet is undefined for GELU and softmax attention), and says so."""
    from atlas.inspect.engine import read_image
    from atlas.inspect.occlusion import occlusion_maps

    x, _ = read_image(str(sorted(photos.glob("*.JPEG"))[0]), 256, 224)
    result = occlusion_maps(vit, x, "blocks.6", occluder=64, stride=80, batch_size=8)
    assert result.projection_method == "gradient" and result.projection is not None and abs(result.projection).max() > 0
    assert result.probability.shape == result.activation.shape and result.probability.size >= 4
    with pytest.raises(AtlasError, match="ReLU networks only"):  # the deconvnet itself is still refused in one line
        from atlas.units import project_units

        project_units(vit, "blocks.6", x[None], [list(result.unit)], method="deconvnet")
    inceptionv1 = load_model("inceptionv1", WEIGHTS)
    assert occlusion_maps(inceptionv1, x, "mixed4c", occluder=64, stride=80, batch_size=8).projection_method == "deconvnet"


def test_unit_lens_on_a_vit_projects_with_the_gradient_and_refuses_the_deconvnet_in_one_line(vit, vit_run):
    """``atlas units`` on a ViT: the default projection (auto) is the gradient, since the deconvnet and guided
    backpropagation have no rule for GELU or softmax attention; asked for by name, they are refused before any work.
    InceptionV1, a ReLU network, keeps the deconvnet."""
    from tiny_run import cli, one_line

    from atlas import store
    from atlas.units import projection_method, units

    assert projection_method(vit, "blocks.6") == "gradient"
    assert projection_method(load_model("inceptionv1", WEIGHTS), "mixed4c") == "deconvnet"
    one_line(cli("units", vit_run, "--projection", "deconvnet", "--no-vis", "--channels", "0-1", "--workers", "0"),
             "ReLU networks only", "GELU")
    with pytest.raises(AtlasError, match="ReLU networks only"):
        units(vit_run, "blocks.6", projections=["guided"], kinds=[], channels="0-1", net=vit, progress=False, echo=None)
    root = store.open_store(vit_run)
    assert not any(f"units/blocks.6/projection/{m}" in root for m in ("deconvnet", "guided"))
    report = units(vit_run, "blocks.6", kinds=[], channels="1-2", top_k=2, workers=0, net=vit, progress=False, echo=None,
                   gallery=False)
    assert list(report["blocks.6"]["projections"]) == ["gradient"]
    assert report["blocks.6"]["projections"]["gradient"]["projections"] == 4
    shown = root["units/blocks.6/projection/gradient/image"][1:3]
    assert shown.std() > 0  # real projections, not the grey of padding


def test_random_timm_convnext_channels_last_and_layernorm2d():
    """A random timm ConvNeXt (LayerNorm2d, depthwise convolutions, GELU): the channels-last copy the sampler runs gives
    the reference kernels' activations and attributions, the attribution is h . d logit_c / d h of backward passes, and
    the unit lens projects it with the gradient (GELU has no deconvnet rule)."""
    from atlas.units import projection_method

    net = load_model("timm:convnext_atto", pretrained=False)
    assert net.prefix_tokens == 0 and net.patch_grid is None
    torch.manual_seed(2)
    x = torch.rand(2, 3, 64, 64)
    layer, pos = "stages.2", {"stages.2": torch.tensor([[1, 2], [3, 0]])}  # 4 x 4 at 64 px; one position per image
    ref = forward_samples(net, x, [layer], pos, attribution=True, forward="nchw")
    fast = forward_samples(net, x, [layer], pos, attribution=True, forward="fused")
    for a, b in zip(ref[:2], fast[:2], strict=True):
        assert torch.allclose(a[layer], b[layer], rtol=1e-3, atol=1e-4)
    captured = {}

    def edit(name, out):
        captured[name] = out.detach().requires_grad_(True)
        return captured[name]

    with torch.enable_grad(), net.hooks([layer], edit=edit, stop=False):
        out = net.module(x)
        h = captured[layer]
        for c in (0, 7, 999):
            (grad,) = torch.autograd.grad(out[:, c].sum(), h, retain_graph=True)
            for b, (y, xx) in enumerate(pos[layer].tolist()):
                want = float((h[b, :, y, xx] * grad[b, :, y, xx]).sum().detach())
                assert ref[1][layer][b, c].item() == pytest.approx(want, rel=1e-3, abs=1e-5)
    assert projection_method(net, layer) == "gradient"


def test_inspect_on_a_vit_run_reads_photos_as_the_model_does(vit, vit_run, photos):
    """``atlas inspect`` end to end on a ViT run: the photo is read as the sampler reads it (the run's bicubic resize to
    248, centre 224, not the bilinear of InceptionV1), its top class is the model's on those pixels, the layer views and
    the occlusion view are written (panel (b) the gradient), and the invariance curves are computed."""
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from atlas.data import load_image, to_tensor
    from atlas.inspect import inspect

    photo = str(photos / "n04251144_snorkel.JPEG")
    summary = inspect([photo], vit_run, net=vit, echo=None, layers=["blocks.2", "blocks.6"], layer="blocks.6", occluder=64,
                      stride=80, shifts=(0, 20), scales=(1.0, 0.8), angles=(0, 30), batch_size=16)
    report = Path(summary["index"]).parent
    entry = summary["images"][0]
    shown = np.asarray(Image.open(report / entry["picture"]))
    resize = vit.preprocess["resize"]
    bicubic = load_image(photo, resize, 224, "bicubic")
    assert np.array_equal(shown, np.asarray(bicubic))
    assert not np.array_equal(shown, np.asarray(load_image(photo, resize, 224, "bilinear")))
    with torch.inference_mode():
        logits = vit.module(to_tensor(bicubic)[None])[0]
    assert entry["top"][0]["index"] == int(logits.argmax())
    assert entry["top"][0]["probability"] == pytest.approx(float(torch.softmax(logits.double(), 0).max()), rel=1e-4)
    assert [v["layer"] for v in entry["layers"]] == ["blocks.2", "blocks.6"]
    assert entry["layers"][1]["shape"] == [192, 14, 14] and all((report / v["figure"]).is_file() for v in entry["layers"])
    occlusion = json.loads((report / entry["occlusion"]["json"]).read_text())
    assert occlusion["projection_method"] == "gradient" and (report / entry["occlusion"]["figure"]).is_file()
    assert summary["invariance"] and entry["atlas"] is None  # the tiny run has no layout to place the photo on


def test_live_engine_on_a_vit_run(vit, vit_run, photo_list):
    """The live page's engine rebuilds the ViT from the run's record, reads the run's photos and uploaded frames with the
    model's bicubic resampling, answers a frame with the layer's maps and the model's top classes, and projects a unit
    with the gradient."""
    import io

    import numpy as np
    from PIL import Image

    from atlas.data import decode_image, list_images, load_image, to_tensor
    from atlas.live import LiveEngine, unpack

    engine = LiveEngine.for_run(vit_run)
    assert engine.net.name == "timm:vit_tiny_patch16_224" and "blocks.6" in [x["name"] for x in engine.hello()["layers"]]
    first = list_images(photo_list).paths[0]
    frame = engine.run_image(0)
    assert np.array_equal(frame.picture, np.asarray(load_image(first, vit.preprocess["resize"], 224, "bicubic")))
    header, maps = unpack(engine.result(frame, "blocks.6"))
    with torch.inference_mode():
        logits = vit.module(to_tensor(load_image(first, vit.preprocess["resize"], 224, "bicubic"))[None])[0]
    assert header["top"][0]["index"] == int(logits.argmax()) and len(maps) == 192 * 14 * 14
    header, jpeg = unpack(engine.projection(frame, "blocks.6", 3))
    assert header["method"] == "gradient" and jpeg[:2] == b"\xff\xd8"
    buffer = io.BytesIO()
    Image.open(first).convert("RGB").save(buffer, "PNG")  # an uploaded frame
    uploaded = engine.decode(buffer.getvalue())
    assert np.array_equal(uploaded.picture, np.asarray(decode_image(buffer.getvalue(), 224, 224, interpolation="bicubic")))
    assert not np.array_equal(uploaded.picture, np.asarray(decode_image(buffer.getvalue(), 224, 224)))


def test_patch_experiments_read_photos_as_the_model_does(vit, photos):
    """The patch experiments paste into the photos as the model reads them: bicubic, timm's shorter side for the ViT,
    not InceptionV1's bilinear 256 -> 224."""
    from atlas.data import list_images, load_image, photo_reading
    from atlas.patches import load_source

    paths = list_images(photos).head(2).paths
    arrays, kept = load_source(paths, reading=photo_reading(vit.preprocess))
    assert kept == [str(p) for p in paths]
    bicubic = np.stack([np.asarray(load_image(p, vit.preprocess["resize"], 224, "bicubic")) for p in paths])
    assert np.array_equal(arrays, bicubic)
    assert not np.array_equal(load_source(paths)[0], bicubic)  # the default reading is InceptionV1's
