"""Filter sheets (issue 16, part 1): the first layer's filters as the image sees them, the measures that tell trained
filters from random ones, deeper layers as grey grids, and the bad input of `atlas weights`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import WEIGHTS
from PIL import Image
from tiny_run import cli_process, one_line

from atlas.errors import AtlasError
from atlas.weights import filter_sheet, filter_stats, input_filters, random_network, write_filters
from atlas.weights.filters import GAP


def test_trained_first_layer_filters_are_smoother_and_more_colour_opponent_than_random(net, tmp_path):
    trained = write_filters(net, tmp_path / "bvlc.png")
    random = write_filters(random_network("inceptionv1", seed=0), tmp_path / "random.png")
    print(f"\nconv2d0 (64 filters 7x7x3): high-frequency share BVLC {trained['high_frequency_share']:.3f}, random "
          f"{random['high_frequency_share']:.3f} (bins above half Nyquist: {trained['high_frequency_bins']:.3f}); colour-opponent "
          f"share BVLC {trained['opponent_share']:.3f}, random {random['opponent_share']:.3f}; mean -min cos BVLC "
          f"{trained['opponency']:.3f}, random {random['opponency']:.3f}")
    for s in (trained, random):
        assert s["layer"] == "conv2d0.0" and s["rgb"] and s["shape"] == [64, 3, 7, 7]
        assert Image.open(s["figure"]).size == tuple(s["size"])
    # white noise spreads its energy evenly over the frequency bins: the measure reads the random filters as such
    assert abs(random["high_frequency_share"] - random["high_frequency_bins"]) < 0.05
    assert trained["high_frequency_share"] < random["high_frequency_share"] - 0.2
    # independent random colour channels are nearly orthogonal; trained ones are often opposed (red on, green off)
    assert random["opponent_share"] < 0.05 < 0.15 < trained["opponent_share"]


def test_the_first_layer_is_drawn_in_the_rgb_input_space(net):
    """InceptionV1 (BVLC) reads BGR * 255 minus a mean: its RGB filters are the weights flipped in channel order (x255);
    a torchvision model reads (RGB - mean) / std: its RGB filters are the weights divided by std."""
    path, rgb_filters, rgb = input_filters(net)
    w = net.module.conv2d0[0].weight.double().numpy()
    assert rgb and path == "conv2d0.0"
    np.testing.assert_allclose(rgb_filters, 255.0 * w[:, ::-1], rtol=1e-5, atol=1e-7)
    from atlas.models import load_model

    resnet = load_model("resnet18", pretrained=False)
    path, rgb_filters, rgb = input_filters(resnet)
    std = np.array([0.229, 0.224, 0.225])[None, :, None, None]
    assert rgb and path == "conv1"  # torchvision names, as the user writes them
    np.testing.assert_allclose(rgb_filters, resnet.module.net.conv1.weight.double().numpy() / std, rtol=1e-5)
    _, deeper, rgb = input_filters(net, "conv2d2")
    assert not rgb and deeper.shape == (192, 64, 3, 3)


def test_each_filter_is_scaled_symmetrically_around_grey(net):
    """normalize="each": every filter reaches full contrast (its largest |w| maps to 255 or 1) with 0 at 128; "all":
    only the strongest filter does. Read from a sheet at scale 1 of filters 0-3 in a 2 x 2 grid."""
    _, w, _ = input_filters(net)
    for normalize in ("each", "all"):
        sheet = filter_sheet(net, channels="0-3", scale=8, normalize=normalize).astype(int)
        peaks = np.abs(w[:4]).reshape(4, -1).max(1)
        scale = peaks if normalize == "each" else np.full(4, peaks.max())
        expected = np.clip(np.floor(128 + 127 * w[:4] / scale[:, None, None, None] + 0.5), 0, 255).astype(int)
        found = 0
        for i in range(4):  # find each filter's tile by its exact pixels (every 8th pixel of the tile)
            tile = np.kron(expected[i].transpose(1, 2, 0), np.ones((8, 8, 1), int))
            hits = [(y, x) for y in range(sheet.shape[0] - 55) for x in range(GAP, sheet.shape[1] - 55, 1)
                    if sheet[y, x, 0] == tile[0, 0, 0] and np.array_equal(sheet[y:y + 56, x:x + 56], tile)]
            found += len(hits) == 1
        assert found == 4, normalize
        full = [int(np.abs(expected[i] - 128).max()) for i in range(4)]
        assert full == [127] * 4 if normalize == "each" else sorted(full)[-1] == 127 > sorted(full)[0]


def test_a_deeper_convolution_is_a_grey_grid_of_filters_by_input_channels(net):
    sheet = filter_sheet(net, "conv2d2", channels="0-9", scale=4)
    assert np.array_equal(sheet[..., 0], sheet[..., 2])  # grey
    assert sheet.shape[0] == GAP + 10 * (3 * 4 + GAP)
    width = sheet.shape[1]
    label_w = width - GAP - 64 * (3 * 4 + GAP)
    assert 0 < label_w < 40  # the index column, then 64 input channels of 3x3 at 4 px
    stats = filter_stats(input_filters(net, "conv2d2")[1][:10])
    assert stats["opponency"] is None and 0 < stats["high_frequency_share"] < 1


def test_layers_without_one_convolution_are_one_line(net):
    with pytest.raises(AtlasError, match=r"layer 'mixed3a' of model inceptionv1 holds 6 convolutions; name one: mixed3a.b1.0"):
        filter_sheet(net, "mixed3a")
    with pytest.raises(AtlasError, match=r"layer 'logits' .*has weights but is not a convolution"):
        filter_sheet(net, "logits")
    with pytest.raises(AtlasError, match=r"channel 64 is out of range"):
        filter_sheet(net, channels="60-64")


def test_atlas_weights_cli(tmp_path):
    out = tmp_path / "sheet.png"
    ok = cli_process("weights", "--weights", WEIGHTS, "--out", out)
    assert ok.returncode == 0, ok.stderr
    assert "conv2d0.0: 64 filters 3x7x7" in ok.stdout and "high-frequency share 0." in ok.stdout and Image.open(out).size == (466, 602)
    before = out.read_bytes()
    line = one_line(cli_process("weights", "--weights", WEIGHTS, "--layer", "pool", "--out", out))
    assert "layer 'pool' of model inceptionv1 (MaxPool2d) has no weights; convolutions: conv2d0.0" in line
    assert out.read_bytes() == before  # nothing written over
    line = one_line(cli_process("weights", "--weights", tmp_path / "missing.pth", "--out", out))
    assert line == f"atlas: error: checkpoint not found: {tmp_path / 'missing.pth'}"
    other = tmp_path / "resnet18.pth"
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), other)
    line = one_line(cli_process("weights", "--weights", other, "--out", out))
    assert line == (f"atlas: error: checkpoint {other} is not InceptionV1 weights: first mismatching key 'conv2d0.0.weight' is missing "
                    "(the checkpoint's first key is 'conv1.weight')")
