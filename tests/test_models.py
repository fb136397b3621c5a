import numpy as np
import pytest
import torch

from atlas.data import list_images, load_image, to_tensor
from atlas.errors import AtlasError
from atlas.models import BVLC_BLOCKS, INCEPTION_LAYERS, LUCID_BLOCKS, InceptionV1, inceptionv1, load_model, synset_words
from atlas.models.inception import _lucid_key_map


def test_bvlc_top1_on_200_shared_photos(net, photos):
    images = list_images(photos, [s for s, _ in synset_words(net.weights)]).head(200)
    assert (images.labels >= 0).all()
    correct = 0
    for start in range(0, 200, 50):
        x = torch.stack([to_tensor(load_image(p)) for p in images.paths[start : start + 50]])
        with torch.inference_mode():
            pred = net.module(x).argmax(1).numpy()
        correct += int((pred == images.labels[start : start + 50]).sum())
    assert correct / 200 >= 0.70


def test_layers_and_shapes(net):
    assert net.layer_names() == INCEPTION_LAYERS
    shapes = net.layer_shapes()
    assert shapes["mixed4c"] == (512, 14, 14)
    assert shapes["mixed5b"] == (1024, 7, 7)
    assert shapes["mixed3a"] == (256, 28, 28)
    assert net.classes[0] == "tench" and len(net.classes) == 1000


def test_forward_stops_at_deepest_requested_layer(net):
    calls = []
    handle = net.module.logits.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = net.activations(torch.rand(1, 3, 224, 224), ["mixed3a", "mixed4c"])
    finally:
        handle.remove()
    assert set(out) == {"mixed3a", "mixed4c"} and not calls


def test_unknown_layer_lists_layers(net):
    with pytest.raises(AtlasError, match="unknown layer 'mixed9z'.*mixed4c"):
        net.resolve("mixed9z")


def test_missing_weights_is_one_line_error(tmp_path):
    with pytest.raises(AtlasError, match="weights file not found"):
        load_model("inceptionv1", tmp_path / "nope.safetensors")


def test_lucid_inception5h_state_dict_loads(tmp_path):
    """A state dict in lucent's inception5h naming (1008 classes, TF SAME padding) loads and runs."""
    reference = InceptionV1(LUCID_BLOCKS, 1008, style="tf")
    inverse = {ours: lucid for lucid, ours in _lucid_key_map().items()}
    state = {}
    for key, value in reference.state_dict().items():
        base, _, param = key.rpartition(".")
        if base in inverse:
            state[f"{inverse[base]}.{param}"] = value
    path = tmp_path / "inception5h.pth"
    torch.save(state, path)
    model = inceptionv1(path).eval()
    x = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(model(x), reference.eval()(x))
        assert model(x).shape == (1, 1008)
    net = load_model("inceptionv1", path)
    assert net.classes[0] == "dummy" and net.classes[1] == "tench"
    assert net.layer_shapes()["mixed4a"] == (508, 14, 14)
    assert BVLC_BLOCKS["mixed4a"][3] == 208


def test_torchvision_googlenet_local_weights_and_aliases(tmp_path):
    import torchvision

    module = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    path = tmp_path / "googlenet.pth"
    torch.save(module.state_dict(), path)
    net = load_model("googlenet", path)
    assert net.resolve("mixed4c") == "net.inception4c"
    assert net.resolve("inception4c") == "net.inception4c"
    out = net.activations(torch.rand(2, 3, 224, 224), ["mixed4c"])
    assert out["mixed4c"].shape == (2, 512, 14, 14)


def test_unknown_model_is_clear_error():
    with pytest.raises(AtlasError, match="unknown model 'nosuchnet'"):
        load_model("nosuchnet")


def test_resnet_module_paths(tmp_path):
    import torchvision

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    net = load_model("resnet18", path)
    out = net.activations(torch.rand(1, 3, 224, 224), ["layer3"])
    assert out["layer3"].shape == (1, 256, 14, 14)
    assert np.isfinite(out["layer3"].numpy()).all()
