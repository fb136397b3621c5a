"""The one image decoder under hostile files: strips of an extreme aspect ratio, decoder failures of any kind in a
DataLoader worker, and an image list that lost its unreadable files between a run and its resume.

Every reader goes through :func:`atlas.data.decode_image`; these tests drive it through the sampler (a folder and a
list file), the live page's socket and the resume of a run, with the real model and shared photos.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import PHOTOS, WEIGHTS, require_shared, serving
from PIL import Image
from tiny_run import build_tiny
from tiny_run import cli as _cli
from tiny_run import one_line as _one_line

from atlas import data, store
from atlas.data import ImageList, decode_image, decoding, load_image

LAYER = "mixed4c"
STEMS = ("n01440764_tench", "n01860187_black_swan", "n04562935_water_tower", "n04487394_trombone")


def _strip(path: Path, w: int, h: int) -> Path:
    """A grey PNG of ``w`` x ``h`` pixels: a few kB on disk for millions of pixels."""
    Image.new("L", (w, h), 128).save(path, "PNG")
    return path


def _png_bytes(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h), 128).save(buf, "PNG")
    return buf.getvalue()


def _sample(images: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    return _cli("sample", "--images", images, "--layer", LAYER, "--out", out, "--weights", WEIGHTS, "--per-image", "2",
                "--no-attribution", "--batch-size", "4", *map(str, extra))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Four shared photos and two 4,000,000-pixel strips (1 wide and 1 tall) in one folder."""
    require_shared()
    folder = tmp_path_factory.mktemp("strips")
    for stem in STEMS:
        (folder / f"{stem}.JPEG").symlink_to(PHOTOS / f"{stem}.JPEG")
    _strip(folder / "tall.png", 1, 4_000_000)
    _strip(folder / "wide.png", 4_000_000, 1)
    return folder


# ----------------------------------------------------------------------------- the bound itself
def test_a_strip_is_resampled_where_it_is_kept_and_gives_the_plain_resize_pixels():
    """An image more than MAX_ASPECT times longer than wide is resampled from the source straight into the kept part:
    the same pixels as the whole resize followed by the crop (to one 8-bit level of rounding), cropped or not."""
    rng = np.random.default_rng(0)
    for w, h in [(40, 2000), (2000, 37), (3, 500)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        bounded, whole = np.asarray(decoding._resample(im, 256, 224), int), None
        scale = 256 / min(w, h)
        size = (max(224, round(w * scale)), max(224, round(h * scale)))
        assert max(size) > data.MAX_ASPECT * 256  # the bounded path is the one taken
        whole = np.asarray(im.resize(size, Image.BILINEAR, reducing_gap=None), int)
        left, top = (size[0] - 224) // 2, (size[1] - 224) // 2
        assert bounded.shape == (224, 224, 3) and np.abs(bounded - whole[top:top + 224, left:left + 224]).max() <= 1
        uncropped = np.asarray(decoding._resample(im, 256, None), int)  # the long side cut to MAX_ASPECT x 256, centred
        assert max(uncropped.shape[:2]) == data.MAX_ASPECT * 256 and min(uncropped.shape[:2]) == 256
        left, top = (size[0] - uncropped.shape[1]) // 2, (size[1] - uncropped.shape[0]) // 2
        assert np.abs(uncropped - whole[top:top + uncropped.shape[0], left:left + uncropped.shape[1]]).max() <= 1


def test_a_one_pixel_strip_takes_little_memory_and_time(tmp_path):
    """1 x 100,000 and 1 x 4,000,000 PNGs (a resize of the whole would be 6.5 and 260 gigapixels): measured in a fresh
    process, whose peak memory is torch's import plus the decoded strip."""
    tall, wide = _strip(tmp_path / "tall.png", 1, 100_000), _strip(tmp_path / "wide.png", 4_000_000, 1)
    script = f"""
import resource, time
from atlas.data import load_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
sizes = [load_image(p).size for p in ({str(tall)!r}, {str(wide)!r})]
print(sizes, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, time.perf_counter() - start)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    sizes, grown_mb, seconds = result.stdout.rsplit("]", 1)[0] + "]", *map(float, result.stdout.rsplit("]", 1)[1].split())
    assert sizes == "[(224, 224), (224, 224)]"
    assert grown_mb < 200 and seconds < 10, (grown_mb, seconds)


def test_any_decoder_failure_is_an_oserror(tmp_path, monkeypatch):
    """A MemoryError (or anything else) raised inside the decoder reaches readers as an OSError naming it."""
    path = tmp_path / "deep.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 8).save(path)  # 16-bit: through _to_8bit

    def no_memory(im):
        raise MemoryError("cannot allocate")

    monkeypatch.setattr(decoding, "_to_8bit", no_memory)
    with pytest.raises(OSError, match="MemoryError: cannot allocate"):
        load_image(path)
    with pytest.raises(data.ImageTooLarge, match="8000 x 8000 pixels"):
        decode_image(_png_bytes(8000, 8000), max_pixels=1_000_000)


# ----------------------------------------------------------------------------- the readers
def test_strips_in_a_folder_are_sampled_in_a_worker(folder, tmp_path):
    """A folder holding 1 x 4,000,000 and 4,000,000 x 1 strips: the sampler's DataLoader worker decodes them in the
    bound, every image is sampled, the run completes (it died with a MemoryError in the worker)."""
    out = tmp_path / "run"
    result = _sample(folder, out, "--workers", "1")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    root = zarr.open_group(out / store.STORE_NAME, mode="r")
    assert root["images/ok"][:].all() and root["images/ok"].shape == (6,)
    assert store.read_flags(root["images/shard_done"]).all()


def test_strips_and_a_failing_decoder_in_a_list_are_skipped_and_counted(folder, tmp_path, monkeypatch):
    """A list naming photos, a strip and a 16-bit PNG whose decoding raises MemoryError inside the DataLoader worker
    (the fault injected into the decoder, which the forked worker inherits): the failing file is skipped, counted and
    logged; the run completes."""
    deep = tmp_path / "deep.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 8).save(deep)
    listing = tmp_path / "images.txt"
    paths = (folder / f"{STEMS[0]}.JPEG", folder / "tall.png", deep, folder / f"{STEMS[1]}.JPEG")
    listing.write_text("".join(f"{path}\n" for path in paths))

    def no_memory(im):
        raise MemoryError("cannot allocate 13 GiB")

    monkeypatch.setattr(decoding, "_to_8bit", no_memory)
    out = tmp_path / "run"
    result = _sample(listing, out, "--workers", "1")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "1 skipped" in result.stdout, result.stdout
    root = zarr.open_group(out / store.STORE_NAME, mode="r")
    assert root["images/ok"][:].tolist() == [True, True, False, True]
    log = (out / "log.txt").read_text()
    assert "skipped image 2" in log and "MemoryError: cannot allocate 13 GiB" in log, log


def test_a_strip_frame_on_the_live_socket_is_answered_at_once(tmp_path_factory):
    """A 1 x 100,000 PNG (277 bytes) as one WebSocket frame: answered within seconds (it took the server to 12.6 GiB),
    a frame too large to decode is one error line, and the connection and server stay up."""
    require_shared()
    from test_live import RUN_PHOTOS, connect, hello, photo_jpeg, receive

    images = tmp_path_factory.mktemp("live-images")
    for stem in RUN_PHOTOS:
        (images / f"{stem}.JPEG").symlink_to(PHOTOS / f"{stem}.JPEG")
    with serving(build_tiny(tmp_path_factory, images)) as server, connect(server) as ws:
        hello(ws)
        start = time.monotonic()
        ws.send(_png_bytes(1, 100_000))
        head, _ = receive(ws, "result")
        assert time.monotonic() - start < 30 and len(head["top"]) == 5
        ws.send(_png_bytes(1, 5_000_000))  # over the live page's pixel limit: one line, the connection stays
        head, _ = receive(ws, "error")
        assert "frame too large: 1 x 5000000 pixels" in head["message"] and "\n" not in head["message"], head
        ws.send(photo_jpeg("n01860187_black_swan"))
        assert receive(ws, "result")[0]["top"][0]["name"] == "black swan"


# ----------------------------------------------------------------------------- a changed list and a resumable run
def _stored_list(out: Path) -> list[str]:
    return [Path(p).name for p in zarr.open_group(out / store.STORE_NAME, mode="r")["images/path"][:].tolist()]


def test_a_list_that_lost_files_without_samples_resumes_the_run(tmp_path):
    """A run of 5 files (the first 5 of a list of 6) in shards of 2, killed after its first shard; one file (in the
    done shard) was unreadable, one is in a shard not yet done. Both taken out of the list: the run resumes on its own
    list, both skipped and counted, and every sample equals those of the run left to finish on the list it was started
    with."""
    require_shared()
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    # The run takes the first 5 of 6 files: a 6th, past the run's last image, moves into the first 5 once files go.
    names = [str(PHOTOS / f"{STEMS[0]}.JPEG"), str(bad), *(str(PHOTOS / f"{s}.JPEG") for s in STEMS[1:]),
             str(PHOTOS / "n04251144_snorkel.JPEG")]
    full, fewer = tmp_path / "full.txt", tmp_path / "fewer.txt"
    full.write_text("".join(f"{n}\n" for n in names))
    fewer.write_text("".join(f"{n}\n" for n in names if n not in (str(bad), names[4])))

    whole = tmp_path / "whole"
    assert _sample(full, whole, "--workers", "0", "--shard-size", "2", "--max-images", "5").returncode == 0
    resumed = tmp_path / "resumed"
    assert _sample(full, resumed, "--workers", "0", "--shard-size", "2", "--max-images", "2").returncode == 0  # another list
    _one_line(_sample(fewer, resumed, "--workers", "0", "--shard-size", "2"), "another image list", "added")
    # The same first shard, as a killed run leaves it: the done flags of the later shards cleared.
    import shutil

    shutil.rmtree(resumed)
    shutil.copytree(whole, resumed)
    flags = zarr.open_group(resumed / store.STORE_NAME, mode="r+")["images/shard_done"]
    flags[1:] = False
    result = _sample(fewer, resumed, "--workers", "0", "--shard-size", "2", "--max-images", "5")
    assert result.returncode == 0, result.stderr
    a, b = (zarr.open_group(run / store.STORE_NAME, mode="r") for run in (resumed, whole))
    assert _stored_list(resumed) == _stored_list(whole)  # the run kept its own list
    assert a["images/ok"][:].tolist() == [True, False, True, True, False]
    valid = a[f"samples/{LAYER}/valid"][:]
    assert np.array_equal(valid, b[f"samples/{LAYER}/valid"][:] & np.repeat(a["images/ok"][:], 2))
    assert np.array_equal(a[f"samples/{LAYER}/activations"][:][valid], b[f"samples/{LAYER}/activations"][:][valid])
    assert "no longer listed" in (resumed / "log.txt").read_text()


def test_a_list_that_lost_a_sampled_file_or_gained_one_is_one_line(tmp_path):
    """Files added, or a sampled file gone: refused in one line naming the files and saying how to continue."""
    require_shared()
    names = [str(PHOTOS / f"{s}.JPEG") for s in STEMS[:3]]
    first, other = tmp_path / "first.txt", tmp_path / "other.txt"
    first.write_text("".join(f"{n}\n" for n in names))
    other.write_text("".join(f"{n}\n" for n in [names[0], names[2], str(PHOTOS / f"{STEMS[3]}.JPEG")]))
    out = tmp_path / "run"
    assert _sample(first, out, "--workers", "0").returncode == 0
    line = _one_line(_sample(other, out, "--workers", "0"), "another image list", f"1 added ({STEMS[3]}.JPEG)",
                     f"1 removed ({STEMS[1]}.JPEG)", "give the list it was started with (3 images", "another --out")
    assert str(out) in line
    other.write_text("".join(f"{n}\n" for n in [names[0], names[2]]))  # a sampled file gone
    _one_line(_sample(other, out, "--workers", "0"), "1 removed", f"1 removed file(s) were sampled already ({STEMS[1]}.JPEG)")


def test_compare_lists_says_what_differs():
    stored = ImageList(["/a/1.jpg", "/a/2.jpg", "/a/3.jpg"], np.array([0, 1, 2], np.int32))
    same = ImageList(["/a/1.jpg", "/a/3.jpg"], np.array([0, 2], np.int32))
    assert data.compare_lists(stored, same) == ([1], "1 removed (2.jpg)")
    longer = ImageList(["/a/1.jpg", "/a/3.jpg", "/a/4.jpg"], np.array([0, 2, 3], np.int32))
    assert data.compare_lists(stored, longer, window=True)[0] == [1]  # past the run's window: not the run's business
    assert data.compare_lists(stored, longer)[0] is None
    relabelled = ImageList(["/a/1.jpg", "/a/2.jpg", "/a/3.jpg"], np.array([0, 5, 2], np.int32))
    assert data.compare_lists(stored, relabelled) == (None, "1 relabelled (2.jpg)")
    swapped = ImageList(["/a/2.jpg", "/a/1.jpg", "/a/3.jpg"], np.array([1, 0, 2], np.int32))
    assert data.compare_lists(stored, swapped) == (None, "the same files in another order")
