"""Image lists in every common shape, odd image files, and sampling that stops when images can't be read.

Synthetic files are made in tmp_path; a few real photos are copied there where the model must see
something real. The CLI cases drive the real command line and check exit code, one stderr line
and no traceback.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import WEIGHTS
from PIL import Image

from atlas.data import MAX_PIXELS, Classes, ImageDataset, ImageList, class_table, list_images, load_image, real_path
from atlas.errors import AtlasError

# A few ImageNet classes as (synset, synonyms) pairs, in a made-up logit order; two share the name "crane".
CLASSES = [("n01440764", ["tench", "Tinca tinca"]), ("n01443537", ["goldfish", "Carassius auratus"]),
           ("n01484850", ["great white shark", "white shark", "man-eater"]), ("n02012849", ["crane"]),
           ("n03126707", ["crane"]), ("n01751748", ["sea snake"]), ("n01797886", ["ruffed grouse", "partridge"]),
           ("n01807496", ["partridge"])]


def _png(path: Path, value: int = 0, size=(64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 40)).save(path, "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    return path


def _unreadable(dataset: ImageDataset) -> list[str]:
    return [dataset[i][2] for i in range(len(dataset)) if dataset[i][2]]


def _atlas(*args, cwd=None):
    return subprocess.run([sys.executable, "-c", "from atlas.cli import main; main()", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def _one_error_line(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("atlas: error:"), result.stderr
    return lines[0]


# ------------------------------------------------------------------------------------ list shapes
@pytest.mark.parametrize("line", ["{p} {label}", "{p},{label}", "{p}, {label}", "{p}\t{label}", "  {p} ,  {label}  "])
def test_every_separator_gives_the_labels(tmp_path, line):
    for i in range(3):
        _png(tmp_path / "imgs" / f"{i}.png", i * 40)
    labels = ["2", "n01443537", "tench"]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(line.format(p=f"imgs/{i}.png", label=labels[i]) + "\n" for i in range(3)))
    images = list_images(listing, CLASSES)
    assert images.paths == [str(tmp_path / "imgs" / f"{i}.png") for i in range(3)]
    assert images.labels.tolist() == [2, 1, 0]
    assert _unreadable(ImageDataset(images)) == []
    assert images.summary == "3 images listed in list.txt (3 labelled)"


def test_caffe_list_reads_every_photo(tmp_path):
    """Today's bug: 'path, label' kept the comma in the path, so every photo was unreadable."""
    for name in ("a.jpg", "b.jpg"):
        _png(tmp_path / name)
    (tmp_path / "val.txt").write_text("a.jpg, 0\nb.jpg, 5\n")
    images = list_images(tmp_path / "val.txt", CLASSES)
    assert images.labels.tolist() == [0, 5]
    assert _unreadable(ImageDataset(images)) == []


def test_paths_are_relative_to_the_list_folder_not_the_working_folder(tmp_path, monkeypatch):
    _png(tmp_path / "data" / "x.png")
    (tmp_path / "data" / "list.txt").write_text("x.png 1\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    images = list_images(Path("../data/list.txt"), CLASSES)
    assert images.paths == [str(tmp_path / "data" / "x.png")] and os.path.isabs(images.paths[0])


def test_paths_with_spaces_and_class_names_with_spaces(tmp_path):
    _png(tmp_path / "my photo.jpg")
    _png(tmp_path / "run 3")  # a file whose name ends in a number, no label
    _png(tmp_path / "two  spaces.png")
    (tmp_path / "list.txt").write_text("my photo.jpg 3\nmy photo.jpg\nmy photo.jpg great white shark\nmy photo.jpg Great_White_Shark\n"
                                       "my photo.jpg white shark\nrun 3\ntwo  spaces.png TENCH\n")
    images = list_images(tmp_path / "list.txt", CLASSES)
    assert [Path(p).name for p in images.paths] == ["my photo.jpg"] * 5 + ["run 3", "two  spaces.png"]
    assert images.labels.tolist() == [3, -1, 2, 2, 2, -1, 0]
    assert _unreadable(ImageDataset(images)) == []


@pytest.mark.parametrize("header, sep", [("path,label", ","), ("filename\tclass", "\t"), ("image_path,synset", ",")])
def test_csv_with_header(tmp_path, header, sep):
    _png(tmp_path / "a, b.png")  # a comma inside a quoted CSV field
    _png(tmp_path / "c.png")
    rows = ['"a, b.png"', "c.png"] if sep == "," else ["a, b.png", "c.png"]
    (tmp_path / "list.csv").write_text(f"{header}\n{rows[0]}{sep}n01484850\n{rows[1]}{sep}goldfish\n")
    images = list_images(tmp_path / "list.csv", CLASSES)
    assert [Path(p).name for p in images.paths] == ["a, b.png", "c.png"] and images.labels.tolist() == [2, 1]


def test_loc_val_solution_csv_as_list(tmp_path):
    for i in (1, 2, 3):
        _png(tmp_path / f"ILSVRC2012_val_0000000{i}.JPEG", i * 20)
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000001,n01751748 43 21 463 368 n01751748 1 2 3 4 \n"
        "ILSVRC2012_val_00000003,n01440764 1 1 20 20 \n"
        "ILSVRC2012_val_00000002,n01443537 5 5 30 30 \n")
    images = list_images(tmp_path / "LOC_val_solution.csv", CLASSES)
    assert [Path(p).name for p in images.paths] == ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000003.JPEG",
                                                     "ILSVRC2012_val_00000002.JPEG"]
    assert images.labels.tolist() == [5, 0, 1]
    assert _unreadable(ImageDataset(images)) == []


def test_unknown_or_ambiguous_label_is_one_line_naming_the_line(tmp_path):
    _png(tmp_path / "a.png")
    cases = {"a.png 0\na.png tenchh\n": r"list.txt line 2: unknown label 'tenchh'.*closest classes: tench",
             "a.png, gold fish\n": r"line 1: unknown label 'gold fish'.*goldfish",
             "a.png\tcrane\n": r"line 1: class name 'crane' names several classes.*n02012849.*n03126707",
             "a.png 17\n": r"line 1: class index 17 is out of range \(0-7",
             "a.png n09999999\n": r"line 1: synset n09999999 is not one of the model's 8 classes"}
    for text, message in cases.items():
        (tmp_path / "list.txt").write_text(text)
        with pytest.raises(AtlasError, match=message) as info:
            list_images(tmp_path / "list.txt", CLASSES)
        assert "\n" not in str(info.value)


def test_a_first_name_wins_over_another_class_synonym():
    classes = Classes(CLASSES)
    assert classes.parse("partridge") == 7 and classes.parse("Ruffed_Grouse") == 6 and classes.parse("man-eater") == 2


def test_class_table_has_every_synonym():
    table = class_table(WEIGHTS) if WEIGHTS.is_file() else []
    if not table:
        pytest.skip("synset_words.txt not found beside the weights")
    classes = Classes(table)
    assert classes.parse("Tinca_tinca") == 0 and classes.parse("man-eater") == 2 and classes.parse("n01440764") == 0


# ------------------------------------------------------------------------------------ labels files
def _val_folder(tmp_path: Path, n: int = 3) -> Path:
    folder = tmp_path / "val"
    for i in range(1, n + 1):
        _png(folder / f"ILSVRC2012_val_{i:08d}.JPEG", i * 30)
    return folder


def test_labels_file_one_per_line_in_sorted_file_order(tmp_path):
    folder = _val_folder(tmp_path)
    (tmp_path / "labels.txt").write_text("sea snake\nn01440764\n1\n")
    images = list_images(folder, CLASSES, labels=tmp_path / "labels.txt")
    assert images.labels.tolist() == [5, 0, 1]
    assert "labels from labels.txt, one per line" in images.summary
    (tmp_path / "short.txt").write_text("1\n2\n")
    with pytest.raises(AtlasError, match="has 2 labels, one per line, but there are 3 images"):
        list_images(folder, CLASSES, labels=tmp_path / "short.txt")
    (tmp_path / "bad.txt").write_text("1\nsea snak\n2\n")
    with pytest.raises(AtlasError, match="bad.txt line 2: unknown label 'sea snak'.*sea snake"):
        list_images(folder, CLASSES, labels=tmp_path / "bad.txt")
    (tmp_path / "bad_first.txt").write_text("sea snak\n1\n2\n")
    with pytest.raises(AtlasError, match="bad_first.txt line 1: unknown label 'sea snak'"):
        list_images(folder, CLASSES, labels=tmp_path / "bad_first.txt")


def test_labels_file_of_pairs_and_loc_csv(tmp_path):
    folder = _val_folder(tmp_path)
    (tmp_path / "pairs.txt").write_text("ILSVRC2012_val_00000003.JPEG goldfish\nILSVRC2012_val_00000001, 4\n")
    images = list_images(folder, CLASSES, labels=tmp_path / "pairs.txt")
    assert images.labels.tolist() == [4, -1, 1] and "for 2 of 3" in images.summary
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000002,n01484850 1 2 3 4\n"
                                                   "ILSVRC2012_val_00000001,n01440764 1 2 3 4\n")
    images = list_images(folder, CLASSES, labels=tmp_path / "LOC_val_solution.csv")
    assert images.labels.tolist() == [0, 2, -1]


def test_ilsvrc_ground_truth_needs_the_devkit_meta(tmp_path):
    folder = _val_folder(tmp_path)
    devkit = tmp_path / "devkit" / "data"
    devkit.mkdir(parents=True)
    truth = devkit / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("490\n2\n1\n")
    with pytest.raises(AtlasError, match="1-based ILSVRC2012 ids.*meta.mat"):
        list_images(folder, CLASSES, labels=truth)
    from scipy.io import savemat

    # The devkit's ids are not in synset order: id 1 is not the first synset.
    records = np.array([(1, "n01751748", 0), (2, "n01443537", 0), (490, "n01440764", 0)],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    savemat(devkit / "meta.mat", {"synsets": records})
    images = list_images(folder, CLASSES, labels=truth)
    assert images.labels.tolist() == [0, 1, 5] and "via meta.mat" in images.summary


# ------------------------------------------------------------------------------------ folders
def test_flat_folder_with_a_sub_folder_keeps_its_top_level_images(tmp_path):
    """Today: 12 photos plus one in thumbs/ gave '1 images'."""
    for i in range(12):
        _png(tmp_path / "photos" / f"n01443537_{i:02d}.jpg", i * 10)
    _png(tmp_path / "photos" / "thumbs" / "n01440764_small.png")
    images = list_images(tmp_path / "photos", CLASSES)
    assert len(images) == 13 and images.summary == "13 images in photos: 12 in the top folder, 1 in 1 sub-folder"
    assert images.paths[-1].endswith("thumbs/n01440764_small.png")
    assert images.labels.tolist() == [1] * 12 + [0]  # thumbs/ is no synset: the file name gives the label


def test_tree_with_synset_folders_and_top_level_images(tmp_path):
    _png(tmp_path / "t" / "n01484850" / "deep" / "x.png")
    _png(tmp_path / "t" / "n01440764" / "y.png")
    _png(tmp_path / "t" / "n01443537_z.png")
    images = list_images(tmp_path / "t", CLASSES)
    assert [Path(p).name for p in images.paths] == ["n01443537_z.png", "y.png", "x.png"]
    assert images.labels.tolist() == [1, 0, 2]
    assert images.summary == "3 images in t: 1 in the top folder, 2 in 2 sub-folders"
    # Without a class list the sorted synset folders number the classes, as before.
    assert list_images(tmp_path / "t").labels.tolist() == [-1, 0, 1]


def test_symlinked_trees_and_loops_are_listed_once(tmp_path):
    real = tmp_path / "tree" / "n01440764"
    for i in range(3):
        _png(real / f"{i}.png", i * 50)
    os.symlink(real, tmp_path / "tree" / "n01443537")  # the same folder again under another name
    os.symlink(tmp_path / "tree", real / "loop")  # a loop back to the top
    os.symlink(real / "0.png", tmp_path / "tree" / "n01440764_again.png")  # a file linked at the top
    images = list_images(tmp_path / "tree", CLASSES)
    real_files = [os.path.realpath(real_path(p)) for p in images.paths]
    assert len(real_files) == len(set(real_files)) == 3
    # Top-level entries come first, so the linked file is the one kept of 0.png.
    assert images.paths[0].endswith("n01440764_again.png")
    assert "seen twice through symlinks" in images.summary and "reached twice" in images.summary


def test_fifo_and_device_are_skipped_never_opened(tmp_path):
    _png(tmp_path / "d" / "ok.png")
    os.mkfifo(tmp_path / "d" / "pipe.jpg")
    images = list_images(tmp_path / "d", CLASSES)
    assert [Path(p).name for p in images.paths] == ["ok.png"] and "1 special file" in images.summary

    (tmp_path / "list.txt").write_text(f"d/ok.png\nd/pipe.jpg\n{os.devnull}\n")
    dataset = ImageDataset(list_images(tmp_path / "list.txt", CLASSES))
    errors = []
    reader = threading.Thread(target=lambda: errors.extend(dataset[i][2] for i in range(3)), daemon=True)
    reader.start()
    reader.join(30)
    assert not reader.is_alive(), "reading a FIFO from a list hangs"
    assert errors[0] == "" and "not a regular file (FIFO)" in errors[1] and "not a regular file (device)" in errors[2]


def test_non_utf8_file_names_are_listed_stored_and_opened(tmp_path):
    folder = tmp_path / "odd"
    _png(folder / "plain.png")
    raw = os.fsencode(folder) + b"/caf\xff\xfe.png"
    shutil.copyfile(folder / "plain.png", raw)
    images = list_images(folder, CLASSES)
    assert len(images) == 2 and images.digest
    stored = next(p for p in images.paths if "plain" not in p)
    stored.encode("utf-8")  # storable as zarr's UTF-8 strings
    assert os.fsencode(real_path(stored)) == raw
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    array = root.create_array("path", shape=(2,), dtype=str, chunks=(2,))
    array[:] = np.asarray(images.paths, dtype=str)
    assert load_image(str(array[:][images.paths.index(stored)])).size == (224, 224)
    # The same name in a list file (bytes that are not UTF-8 inside the list).
    (tmp_path / "list.txt").write_bytes(b"odd/caf\xff\xfe.png 1\n")
    listed = list_images(tmp_path / "list.txt", CLASSES)
    assert listed.labels.tolist() == [1] and _unreadable(ImageDataset(listed)) == []


# ------------------------------------------------------------------------------------ odd pixels
def _centre_row(path: Path) -> np.ndarray:
    return np.asarray(load_image(path, 224, 224))[112, :, 0].astype(int)


def test_16_bit_png_and_float_tiff_are_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0.0, 1.0, 224), (224, 1))
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    Image.fromarray((ramp * 8 - 3).astype(np.float32)).save(tmp_path / "gf.tif")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "unit.tif")
    Image.fromarray((ramp * 4095).astype(np.uint16)).save(tmp_path / "g12.png")  # 12-bit data in 16 bits
    for name in ("g16.png", "gf.tif", "unit.tif", "g12.png"):
        row = _centre_row(tmp_path / name)
        assert row[0] <= 3 and row[-1] >= 252, name  # the full range, not all white or all black
        assert (np.diff(row) >= 0).all() and len(np.unique(row)) > 100, name  # a gradient
    Image.fromarray(np.full((50, 50), 7.0, np.float32)).save(tmp_path / "flat.tif")
    assert len(np.unique(np.asarray(load_image(tmp_path / "flat.tif")))) == 1


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny valid PNG whose header claims ``width`` x ``height`` pixels."""
    Image.new("L", (4, 4)).save(path)
    data = bytearray(path.read_bytes())
    chunk = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = chunk
    data[29:33] = struct.pack(">I", zlib.crc32(chunk))
    path.write_bytes(bytes(data))
    return path


def test_decompression_bomb_is_refused_and_counted(tmp_path):
    _png(tmp_path / "ok.png")
    _png_claiming(tmp_path / "bomb.png", 50_000, 50_000)
    _png_claiming(tmp_path / "big.png", 8_000, MAX_PIXELS // 8_000 + 1)  # below PIL's own limit, above atlas's
    (tmp_path / "list.txt").write_text("ok.png\nbomb.png\nbig.png\n")
    errors = [ImageDataset(list_images(tmp_path / "list.txt"))[i][2] for i in range(3)]
    assert errors[0] == "" and errors[1].startswith("ImageTooLarge") and errors[2].startswith("ImageTooLarge")


# ------------------------------------------------------------------------------------ sampling with the model
def test_sample_stores_non_utf8_paths_that_open_again(net, photos, tmp_path):
    from atlas.sample import sample

    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copyfile(photos / "n01440764_tench.JPEG", folder / "n01440764_tench.JPEG")
    shutil.copyfile(photos / "n04251144_snorkel.JPEG", os.fsencode(folder) + b"/n04251144_\xe9t\xe9.JPEG")
    result = sample(folder, ["mixed4c"], tmp_path / "run", net=net, workers=0, progress=False, attribution=False)
    assert result.n_skipped == 0 and result.n_samples == {"mixed4c": 2}
    root = zarr.open_group(str(tmp_path / "run" / "store.zarr"), mode="r")
    paths = [str(p) for p in root["images/path"][:]]
    assert all(load_image(p).size == (224, 224) for p in paths)
    assert root["images/label"][:].tolist() == [0, 801]


def test_sampling_stops_when_most_images_fail_and_keeps_finished_shards(net, tmp_path):
    from atlas.sample import MIN_TRIED, sample

    good = [_png(tmp_path / f"good{i}.png", i * 20) for i in range(12)]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    shard = MIN_TRIED // 2
    lines = [str(good[i % 12]) if i % 8 == 0 else str(bad) for i in range(3 * shard)]  # 1 in 8 readable
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(AtlasError, match=f"stopped sampling: {2 * shard - shard // 4} of the {2 * shard} images tried could not be read"
                                         r".*first error: .*bad\.jpg.*log\.txt"):
        sample(tmp_path / "list.txt", ["mixed4c"], tmp_path / "run", net=net, workers=0, progress=False, attribution=False,
               shard_size=shard, batch_size=16)
    root = zarr.open_group(str(tmp_path / "run" / "store.zarr"), mode="r")
    assert root["images/shard_done"][:].tolist() == [True, False, False]  # the first shard is kept, the stopping one redone
    assert int(root["samples/mixed4c/valid"][:shard].sum()) == shard // 8
    assert "stopped sampling" in (tmp_path / "run" / "log.txt").read_text()


def test_a_list_of_mostly_readable_images_is_not_stopped(net, tmp_path):
    from atlas.sample import sample

    good = _png(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    (tmp_path / "list.txt").write_text(f"{bad}\n{good}\n{bad}\n{good}\n{good}\n")
    result = sample(tmp_path / "list.txt", ["mixed4c"], tmp_path / "run", net=net, workers=0, progress=False, attribution=False,
                    shard_size=2)
    assert result.n_skipped == 2 and result.n_samples == {"mixed4c": 3}


# ------------------------------------------------------------------------------------ the command line
def test_cli_caffe_list_end_to_end(photos, tmp_path):
    names = ["n01440764_tench.JPEG", "n01443537_goldfish.JPEG", "n04251144_snorkel.JPEG", "n10565667_scuba_diver.JPEG"]
    for name in names:
        shutil.copyfile(photos / name, tmp_path / name.replace("_", " ", 1))  # paths with spaces, too
    labels = [0, 1, 802, 983]
    (tmp_path / "val.txt").write_text("".join(f"{n.replace('_', ' ', 1)}, {label}\n" for n, label in zip(names, labels, strict=True)))
    result = _atlas("sample", "--images", "val.txt", "--layer", "mixed4c", "--out", str(tmp_path / "run"), "--weights", str(WEIGHTS),
                    "--no-attribution", "--workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip() == ""
    assert "4 images listed in val.txt (4 labelled)" in result.stdout and "0 skipped" in result.stdout
    root = zarr.open_group(str(tmp_path / "run" / "store.zarr"), mode="r")
    assert root["images/ok"][:].all() and root["images/label"][:].tolist() == labels


def test_cli_unreadable_first_shard_stops_with_one_line(tmp_path):
    for i in range(4):
        (tmp_path / f"broken{i}.jpg").write_bytes(b"\xff\xd8 broken")
    (tmp_path / "list.txt").write_text("".join(f"broken{i}.jpg\n" for i in range(4)))
    line = _one_error_line(_atlas("sample", "--images", str(tmp_path / "list.txt"), "--layer", "mixed4c", "--out",
                                  str(tmp_path / "run"), "--weights", str(WEIGHTS), "--workers", "0"))
    assert "none of the 4 images tried could be read" in line and "broken0.jpg" in line and str(tmp_path / "run" / "log.txt") in line
    # build stops there too: it never goes on to project with zero samples.
    line = _one_error_line(_atlas("build", "--images", str(tmp_path / "list.txt"), "--layer", "mixed4c", "--grid", "4", "--out",
                                  str(tmp_path / "built"), "--weights", str(WEIGHTS), "--quality", "draft"))
    assert "stopped sampling: none of the 4" in line
    assert "layouts" not in zarr.open_group(str(tmp_path / "built" / "store.zarr"), mode="r")


def test_cli_build_dry_run_with_non_utf8_names(photos, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copyfile(photos / "n01440764_tench.JPEG", folder / "n01440764_tench.JPEG")
    shutil.copyfile(photos / "n04251144_snorkel.JPEG", os.fsencode(folder) + b"/n04251144_\xff.JPEG")
    (folder / "thumbs").mkdir()
    shutil.copyfile(photos / "n01443537_goldfish.JPEG", folder / "thumbs" / "n01443537_goldfish.JPEG")
    result = _atlas("build", "--images", str(folder), "--layer", "mixed4c", "--grid", "4", "--out", str(tmp_path / "run"),
                    "--weights", str(WEIGHTS), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "3 images in imgs: 2 in the top folder, 1 in 1 sub-folder" in result.stdout
    assert not (tmp_path / "run" / "store.zarr").exists()


def test_image_list_without_summary_still_works():
    images = ImageList(["/a.png"], np.zeros(1, np.int32))
    assert images.summary == "" and images.head(None) is images and len(images.head(0)) == 0
