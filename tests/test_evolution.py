"""Features over training (issue 16, part 3; Zeiler & Fergus Fig. 4) on a checkpoint sequence the test makes itself:
InceptionV1's default random initialisation, the BVLC weights, and two checkpoints of a short fine-tuning run of the
BVLC weights on shared photos (a few SGD steps, every parameter up to the followed layer trained)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PHOTOS, WEIGHTS, require_shared
from PIL import Image
from tiny_run import cli_process, one_line

from atlas.errors import AtlasError
from atlas.weights import evolve, load_checkpoint, random_network, write_evolution
from atlas.weights.evolution import layout

LAYER, CHANNELS = "conv2d2", "0-3"






@pytest.fixture(scope="module")
def images() -> list[str]:
    require_shared()
    return [str(p) for p in sorted(PHOTOS.glob("*.JPEG"))[7::40][:12]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, images) -> list:
    """random.pth, the BVLC file, step2.pth and step4.pth: SGD on 8 labelled photos (random 128 px crops, batch 4)."""
    from atlas.data import load_image, to_tensor
    from atlas.models import synset_words

    folder = tmp_path_factory.mktemp("checkpoints")
    random = folder / "random.pth"
    torch.save(random_network("inceptionv1", seed=0).module.state_dict(), random)
    net = load_checkpoint(WEIGHTS)
    module = net.module.train()
    for name, p in module.named_parameters():  # the layers up to the followed one learn; the rest is frozen (speed)
        p.requires_grad_(name.split(".")[0] in ("conv2d0", "conv2d1", "conv2d2"))
    synsets = [s for s, _ in synset_words(WEIGHTS)]
    photos = [p for p in sorted(PHOTOS.glob("*.JPEG"))[::97][:8]]
    x = torch.stack([to_tensor(load_image(p)) for p in photos])
    y = torch.tensor([synsets.index(p.name.split("_")[0]) for p in photos])
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    saved = []
    for step in range(1, 5):
        pick = torch.randperm(8, generator=generator)[:4]
        top, left = (int(v) for v in torch.randint(0, 96, (2,), generator=generator))
        loss = torch.nn.functional.cross_entropy(module(x[pick, :, top:top + 128, left:left + 128]), y[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 2 == 0:
            saved.append(folder / f"step{step}.pth")
            torch.save(module.state_dict(), saved[-1])
    return [random, WEIGHTS, *saved]


@pytest.fixture(scope="module")
def result(checkpoints, images):
    return evolve(checkpoints, images, LAYER, channels=CHANNELS, workers=0, batch_size=12)


def test_the_figure_has_a_row_per_unit_and_a_column_per_checkpoint(result, tmp_path):
    summary = write_evolution(result, tmp_path / "evolution.png")
    print(f"\n{LAYER} units {CHANNELS}, strongest activation over {summary['images']} photos:")
    for label, row in zip(summary["labels"], summary["values"], strict=True):
        print(f"  {label:28s}", " ".join(f"{v:8.2f}" for v in row))
    figure = np.asarray(Image.open(summary["figure"]).convert("RGB"))
    k, u, p = 4, 4, result.patches.shape[2]
    assert result.values.shape == (k, u) and result.channels == [0, 1, 2, 3]
    assert summary["labels"] == ["random.pth", "bvlc_googlenet.safetensors", "step2.pth", "step4.pth"]
    g = layout(u, k, p)
    assert figure.shape == (g["size"][1], g["size"][0], 3)
    for row in range(u):  # each cell holds that unit's patch and, to its right, its projection at that checkpoint
        for column in range(k):
            x, y = g["cell"](row, column)
            assert np.array_equal(figure[y:y + p, x:x + p], result.patches[column, row])
            assert np.array_equal(figure[y:y + p, x + p + 3:x + 2 * p + 3], result.projections[column, row])
    assert (tmp_path / "evolution.json").is_file()


def test_the_strongest_activation_is_the_direct_maximum(result, checkpoints, images):
    from atlas.data import load_image, to_tensor

    x = torch.stack([to_tensor(load_image(p)) for p in images])
    for column in (1, 3):
        net = load_checkpoint(checkpoints[column])
        with torch.inference_mode():
            acts = net.activations(x, [LAYER])[LAYER][:, :4]
        flat = acts.flatten(2).amax(2)  # (images, units)
        np.testing.assert_allclose(result.values[column], flat.amax(0).numpy(), rtol=1e-5)
        assert [images[i] for i in flat.argmax(0).tolist()] == [result.images[i] for i in result.image[column]]
        for j in range(4):
            y, xx = result.pos[column, j]
            assert acts[result.image[column, j], j, y, xx] == flat.amax(0)[j]


def test_a_training_checkpoint_that_wraps_its_state_dict_loads_the_same(checkpoints, tmp_path):
    state = torch.load(checkpoints[2], weights_only=True)
    torch.save({"epoch": 1, "state_dict": state}, tmp_path / "wrapped.pt")
    net = load_checkpoint(tmp_path / "wrapped.pt")
    assert all(torch.equal(v, state[k]) for k, v in net.module.state_dict().items())


def test_training_changes_the_units(result):
    random, bvlc, step2, step4 = result.values
    # the trained filters answer the photos far more strongly than default-initialised ones (a factor > 5 at conv2d2)
    assert np.all(bvlc > 5 * random)
    # fine-tuning moved the weights: the units' strongest activations change, a little
    assert not np.allclose(step2, bvlc) and not np.allclose(step4, step2)
    assert np.all(np.abs(step4 - bvlc) < 0.5 * bvlc)
    # projections are real: neither checkpoint's is blank grey
    assert all(np.abs(result.projections[i].astype(int) - 127).max() > 50 for i in range(4))


def test_a_bad_image_is_skipped_and_counted_through_the_cli(tmp_path, images):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in images[:2]:
        (folder / p.rsplit("/", 1)[1]).symlink_to(p)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "evo.png"
    run = cli_process("evolution", "--checkpoints", WEIGHTS, "--images", folder, "--layer", "conv2d0", "--channels", "0-1",
                 "--workers", "0", "--out", out)
    assert run.returncode == 0, run.stderr
    assert "2 units of conv2d0 x 1 checkpoints over 2 images; 1 unreadable skipped (first: " in run.stdout
    assert "broken.jpg" in run.stdout and Image.open(out).size == layout(2, 1, 64)["size"]


def test_bad_input_is_one_line(tmp_path, images, checkpoints):
    other = tmp_path / "resnet18.pt"
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), other)
    out = tmp_path / "evo.png"
    line = one_line(cli_process("evolution", "--checkpoints", WEIGHTS, other, "--images", images[0], "--layer", LAYER,
                                  "--out", out))
    assert line == (f"atlas: error: checkpoint {other} is not InceptionV1 weights: first mismatching key 'conv2d0.0.weight' is "
                    "missing (the checkpoint's first key is 'conv1.weight')")
    assert not out.exists()
    line = one_line(cli_process("evolution", "--checkpoints", WEIGHTS, tmp_path / "gone.pth", "--images", images[0],
                                  "--layer", LAYER, "--out", out))
    assert line == f"atlas: error: checkpoint not found: {tmp_path / 'gone.pth'}"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"\xff\xd8 truncated")
    (broken / "b.png").write_bytes(b"")
    with pytest.raises(AtlasError, match=r"^none of the 2 images could be read \(first: .*a\.jpg: "):
        evolve([checkpoints[1]], broken, LAYER, workers=0)
    # a truncated checkpoint, a layer without positions, another architecture's keys in the module's own names
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(checkpoints[2].read_bytes()[:1000])
    with pytest.raises(AtlasError, match=r"^checkpoint .*cut\.pth is not a readable state dict"):
        evolve([truncated], images, LAYER)
    with pytest.raises(AtlasError, match=r"layer 'logits' of model inceptionv1 has no spatial positions"):
        evolve([checkpoints[1]], images, "logits", workers=0)
    state = torch.load(checkpoints[2], weights_only=True)
    state["conv2d2.0.weight"] = state["conv2d2.0.weight"][:100]
    torch.save(state, tmp_path / "narrow.pth")
    with pytest.raises(AtlasError, match=r"first mismatching key 'conv2d2.0.weight' has shape \(100, 64, 3, 3\), InceptionV1 has "
                                         r"\(192, 64, 3, 3\)$"):
        evolve([tmp_path / "narrow.pth"], images, LAYER)
