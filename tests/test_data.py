import numpy as np
import pytest
from PIL import Image

from atlas.data import ImageDataset, list_images, load_image
from atlas.errors import AtlasError


def _save(path, mode, size=(300, 200)):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    image = rgb.convert(mode)
    fmt = "JPEG" if path.suffix == ".jpg" else "PNG"
    image.save(path, fmt)
    return path


def test_modes_are_converted_and_small_images_enlarged(tmp_path):
    files = [
        _save(tmp_path / "gray.jpg", "L"),
        _save(tmp_path / "cmyk.jpg", "CMYK"),
        _save(tmp_path / "palette.png", "P"),
        _save(tmp_path / "alpha.png", "RGBA"),
        _save(tmp_path / "tiny.png", "RGB", size=(20, 12)),
    ]
    for path in files:
        image = load_image(path, 256, 224)
        assert image.mode == "RGB" and image.size == (224, 224)


def test_corrupt_and_truncated_files_are_reported_not_raised(tmp_path):
    good = _save(tmp_path / "n01440764_a.jpg", "RGB")
    (tmp_path / "n01440764_b.jpg").write_bytes(b"not an image")
    data = good.read_bytes()
    (tmp_path / "n01440764_c.jpg").write_bytes(data[: len(data) // 2])
    images = list_images(tmp_path, ["n01440764"])
    assert [p.rsplit("/", 1)[1] for p in images.paths] == ["n01440764_a.jpg", "n01440764_b.jpg", "n01440764_c.jpg"]
    assert images.labels.tolist() == [0, 0, 0]
    dataset = ImageDataset(images)
    errors = [dataset[i][2] for i in range(3)]
    assert errors[0] == "" and errors[1] and errors[2]


def test_tree_layout_and_list_file(tmp_path):
    for synset in ("n02", "n01"):
        (tmp_path / "tree" / synset).mkdir(parents=True)
    _save(tmp_path / "tree" / "n01" / "x.jpg", "RGB")
    _save(tmp_path / "tree" / "n02" / "y.jpg", "RGB")
    images = list_images(tmp_path / "tree", ["n01", "n02"])
    assert images.labels.tolist() == [0, 1] and images.paths[0].endswith("n01/x.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"tree/n02/y.jpg 7\n# comment\n{tmp_path}/tree/n01/x.jpg\n")
    listed = list_images(listing)
    assert listed.labels.tolist() == [7, -1] and listed.paths[0] == str(tmp_path / "tree/n02/y.jpg")
    assert listed.digest != images.digest


def test_empty_or_missing_folder_is_clear_error(tmp_path):
    with pytest.raises(AtlasError, match="no images"):
        list_images(tmp_path)
    with pytest.raises(AtlasError, match="neither a folder"):
        list_images(tmp_path / "missing")
