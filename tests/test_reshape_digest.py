"""Before/after check of issue 12's reshaping: a tiny end-to-end build must give the same store arrays and tiles.

The issue allowed a recorded digest or a build with the old and new cores in one run; this test keeps a recorded
digest (the old cores no longer exist in the tree). RECORDED below was made with the code before the reshaping:

    git worktree add /tmp/old3ad 3ad0fdb      # node_modules symlinked in for OpenSeadragon
    cd /tmp/old3ad && PYTHONPATH=/tmp/old3ad python -c "from atlas.cli import main; main()" build \
        --config old.toml --images photos.txt --out oldrun
    # 2026-12-01, torch 2.14.1+cu130, a CPU without native bf16 (precision "auto" ran in float32)

with ``old.toml`` = ``_config()`` below without ``knn`` (3ad0fdb had no such setting; its only kNN was today's
"atlas" backend) and ``photos.txt`` the first 12 photos of the shared samples, digested by ``_digest`` below.
(3ad0fdb's build crashed at its render stage when run in one process, "Inference tensors cannot be saved for
backward": the LRN band cached during sampling was an inference tensor; it was fixed in 01b8ee6. Re-running the
same command resumed there, sample, project and grid skipped as up to date, so every stage is 3ad0fdb's own.)

Every setting is given explicitly, since defaults changed since 3ad0fdb (min_count, render quality, knn).
What is compared: every array under store.zarr (sha256 of dtype, shape and bytes of ``array[...]``), except that
``images/path`` is digested as its file names only (it holds absolute paths, which depend on where the shared
data lives); every file under tiles/ (its bytes; JSON files parsed and re-dumped with sorted keys). What is not:
the store's attributes, including the ``ledger`` group the new code adds (attributes only, no arrays: it is the
freshness bookkeeping, whose format legitimately changed). No tile or JSON field needed skipping: all matched.
The digests depend on torch's kernels and the CPU's bf16 support, so they are asserted only in the recorded
environment (as tests/test_objectives.py does) and skipped with the reason elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import PHOTOS, WEIGHTS, require_shared

from atlas.models import autocast_dtype

RECORDED_TORCH = "2.14.1+cu130"
RECORDED_AUTO = None  # autocast_dtype("auto", "cpu") there: float32


def _config(weights: Path) -> str:
    return f"""
[run]
layers = ["mixed4c"]

[sample]
model = "inceptionv1"
weights = "{weights}"
max_images = 12
per_image = 2
seed = 0
batch_size = 12
workers = 0
forward = "nchw"  # the reference kernels the digests were recorded with (the default fused ones round differently)
attribution = true
dtype = "float16"
precision = "auto"
device = "cpu"

[project]
method = "umap"
n_neighbors = 5
min_dist = 0.05
metric = "cosine"
seed = 0
outside = "edge"
knn = "atlas"

[grid]
sizes = [2, 4]
min_count = 1

[render]
quality = "draft"
steps = 8
size = 32
attempts = 1
batch = 8
p = 2.0
icons = "optimize"
device = "cpu"
seed = 0

[tiles]
format = "jpg"
density_scale = false
examples = true
"""


def _arrays(group: zarr.Group, prefix: str = ""):
    for name, array in group.arrays():
        yield prefix + name, array
    for name, sub in group.groups():
        yield from _arrays(sub, prefix + name + "/")


def _digest(run: Path) -> dict[str, str]:
    """sha256 per store array (dtype, shape, bytes) and per tile file (bytes; JSON parsed, keys sorted)."""
    out = {}
    for path, array in _arrays(zarr.open_group(str(run / "store.zarr"), mode="r")):
        if path == "images/path":  # absolute paths: compare the file names
            h = hashlib.sha256("\n".join(os.path.basename(str(p)) for p in array[...]).encode())
        else:
            v = np.ascontiguousarray(array[...])
            h = hashlib.sha256(f"{v.dtype.str}{v.shape}".encode())
            h.update(v.tobytes())
        out["store:" + path] = h.hexdigest()
    for f in sorted((run / "tiles").rglob("*")):
        if f.is_file():
            rel = "tiles:" + f.relative_to(run / "tiles").as_posix()
            data = json.dumps(json.loads(f.read_text()), sort_keys=True).encode() if f.suffix == ".json" else f.read_bytes()
            out[rel] = hashlib.sha256(data).hexdigest()
    return out


RECORDED = {
    "store:grids/mixed4c/full/2/cell": "5c4b37062fe9b5427af774383cc771e1182aea2e564a894cd7fac55b4fed952a",
    "store:grids/mixed4c/full/2/count": "b5b701154dcc12dc197806d28777a278c9611cc683978ca2fa65c630225eb112",
    "store:grids/mixed4c/full/2/mean_activation": "5f44e78e655b774d898d8790c2b16e5d0338fa6619401fd64638c1363a127bf1",
    "store:grids/mixed4c/full/2/mean_attribution": "dd9618c04d27cefdc8a48d765c938c6802b7104d91d881b276b2d28e22838b40",
    "store:grids/mixed4c/full/2/nearest": "7210d776a5777f413493266d35c7848bd78004a113b7cbee6e4538e2b788a897",
    "store:grids/mixed4c/full/2/render": "e3dd27102864a2b9f3b69d265b00fde7e59145014d2a45a5ad5a64203fbb3bc7",
    "store:grids/mixed4c/full/2/top_attribution": "d9adab7d5a10f6e92159efe118b011d73a9cfd99e275741da67e7e820114b292",
    "store:grids/mixed4c/full/2/top_classes": "4a1d86af2072775ff6e3841301b9028929844dfa76c05ff342c804a3fd72429e",
    "store:grids/mixed4c/full/4/cell": "9ac15bdbcc4686e6fa46d96e3fadb4ee2228d91e19988a05c9815a5580e89a0b",
    "store:grids/mixed4c/full/4/count": "86c8d56d6ca9890e38deaed53b9b30bb508766d28cbbdd54e8dad6a26454b160",
    "store:grids/mixed4c/full/4/mean_activation": "cc3a56f0201112338b9d6d7c11921de315f8030c99708e2abafd754adb7d5b00",
    "store:grids/mixed4c/full/4/mean_attribution": "fa376e3107a2e393fe25700e0f47420b6c8feaaaa0aba8d6c7d4da9a72e6312d",
    "store:grids/mixed4c/full/4/nearest": "2de1246ff48f33c04a098499682f40f354e043afa9c61bec6a9471c3d18ebfbd",
    "store:grids/mixed4c/full/4/render": "6e37046755dc7fe16293e60c58f83e31c2e0fbc799a9d1c20c74e7aa569851f6",
    "store:grids/mixed4c/full/4/top_attribution": "f7a3b47e40953abb659ad5d5817c903739a41b59dbe34c7c660f42692a6c1347",
    "store:grids/mixed4c/full/4/top_classes": "d99d25e8a6d10df7a6a845e9fd42f8246e0ce9369204cfaab5704aa11aec4cfd",
    "store:icons/mixed4c/full/2/cosine": "2dce0b8569cb8dbb6234fd7648f21e4702aca9b672bb959200669c1d96813af1",
    "store:icons/mixed4c/full/2/digest": "9953fe98a87c99db599958667bbc9e52d979b55881cbf6266cd00630dcbe4646",
    "store:icons/mixed4c/full/2/done": "e3dd27102864a2b9f3b69d265b00fde7e59145014d2a45a5ad5a64203fbb3bc7",
    "store:icons/mixed4c/full/2/images": "bb96e5bdf2f1294c0703d7f9331f9f4fdbf53be5c941b22d5ab4e340e4089d46",
    "store:icons/mixed4c/full/2/objective": "5d7e7fe9ad68cd2f8401c8924701b1c02bb149dc1fdbdfc12064d2001cc53c29",
    "store:icons/mixed4c/full/4/cosine": "bc91c8a183b64fd8d241048ccb0ac177461ac5144fe82803a0038fd7c23a37c4",
    "store:icons/mixed4c/full/4/digest": "3ec3c8fa8257896f92c7eb13e9a1f53a13bf769e30c263b15b67492a986d908e",
    "store:icons/mixed4c/full/4/done": "6e37046755dc7fe16293e60c58f83e31c2e0fbc799a9d1c20c74e7aa569851f6",
    "store:icons/mixed4c/full/4/images": "4acdd92a44464bac66ca6007ecc10c16f47d1f510618c0e9465b9dc27424465f",
    "store:icons/mixed4c/full/4/objective": "3f070cfa4ed92e64a85c7a81a87564c5fd28919e5100f86bac013c701aca08ba",
    "store:images/label": "bdddfceb3bb128aec89cefc2e84b5fd6b330c14df27e5d13ee7116d9acaddb59",
    "store:images/ok": "9a659a13e1a7d1ac4a80244b01a1fbf4708534f9798662fd00fd89fd994ccf36",
    "store:images/path": "a02593d228e50ca2dc099d77e3e56d45145230fb914d3abee7bde150c41e24f4",
    "store:images/shard_done": "265e6b573637524100e6222332a3c4a92ba0cba78532eae2701915ac823cc05c",
    "store:images/top5": "7db8ee8425905f17c1c8cbc6b74b652ec061487580328eaae3abb7c27abe2da7",
    "store:layouts/mixed4c/full/inside": "82ccef8b640b3be694536948904328965ad42a76e19e212398a6464b9965c96e",
    "store:layouts/mixed4c/full/raw": "d5d3bf11a6e067029bc0e2625649c31614604bd7ca5450fbf3ec91b996066857",
    "store:layouts/mixed4c/full/rows": "3fda8f8db5105b39e09594423659d448569648409446a4bd1f99019a1335e6be",
    "store:layouts/mixed4c/full/xy": "77b7f6f879dd27fc7b849b4e95ea7d78b75fdfcaf16c163b9ef14ab02e2130d1",
    "store:samples/mixed4c/activations": "23e504dc36efaf39388d4eade27259cea839c4e3a3e0e17e57c3baa350373783",
    "store:samples/mixed4c/attributions": "22aaa1df0eb47f35499391917515cb0d8768a3af1bb612efd5854292ddfed418",
    "store:samples/mixed4c/image_index": "240f7ba79b9c44d35fd74e7faccf1188b7fbd48d654c5b3807ac7861fdf625f9",
    "store:samples/mixed4c/position": "160ec9f7909cb3c8a1b74fac032947dde90ef69f41e767cac8797a75b2f5fc44",
    "store:samples/mixed4c/valid": "82ccef8b640b3be694536948904328965ad42a76e19e212398a6464b9965c96e",
    "store:whitening/mixed4c/matrix": "ad77fdcc9ec86f460c63b1c36332af394d58eb0fba1d1f26e6d92b9c003a09ef",
    "tiles:atlases.json": "75e47103cd3caf86e40471e90aebea61c0a7bb92b3b333dd8b2ab1308c970dfe",
    "tiles:index.html": "d02e9942dcaa058d82afb2eb9be2ea93d05739df5a5438b3bb500782fb2deef8",
    "tiles:mixed4c/full/atlas.dzi": "4939c4dc140e5c09961f27d2999730a2e219540e7461827f3ad7974b1a80b807",
    "tiles:mixed4c/full/atlas.json": "b536339fe4ebed68b3188a448288e7826c9346bb64707d94f03760117260b8b6",
    "tiles:mixed4c/full/atlas_files/0/0_0.jpg": "0e42139c07e64d6bb20317564cf2a5aad5326475bd7ea99ffaf7f26cad7213e6",
    "tiles:mixed4c/full/atlas_files/1/0_0.jpg": "7c70a957865f79b0630d280dd3916bfee3f24ba61f2adb702b954c2d7081fdff",
    "tiles:mixed4c/full/atlas_files/2/0_0.jpg": "814620084980a5fe73d0e4453e1c6e1e0a6dff33e56ebae3a1018ad8af20eee2",
    "tiles:mixed4c/full/atlas_files/3/0_0.jpg": "42184ba26b6d44856d06df2ad621574fd75f4f1cad19de463157c6a32cc267c9",
    "tiles:mixed4c/full/atlas_files/4/0_0.jpg": "0b108aef2ad1ebf0a30fad585b4e0dcab0ec75ffd7c162851e470683e5bc2ca5",
    "tiles:mixed4c/full/atlas_files/5/0_0.jpg": "ecd57939c928b5b4cbac031f4f99e81441f6fd8f8605168e66b1b48ee7ff700a",
    "tiles:mixed4c/full/atlas_files/6/0_0.jpg": "c5fd390eabb78181b2f70c8f897601be116a3893dbf5ec6647b93e167a9441ab",
    "tiles:mixed4c/full/atlas_files/7/0_0.jpg": "2c74b0f07387e688facd0efc0daac8da28ca3ac219f5c4269c85c07e72a33247",
    "tiles:mixed4c/full/examples/2/0/0.jpg": "3daa10408cdc0f0cfa66c11ac7c9a893f2be97c3835c1c344c709c3bb8eaa560",
    "tiles:mixed4c/full/examples/2/0/1.jpg": "5b20877614b153e13ddbb7c57785db52d8ec08571bb9e687c90e0bb82bb57d89",
    "tiles:mixed4c/full/examples/2/1/0.jpg": "63a399ea0ddbe7ab1dc7cbe055ff7c35194b63c974ed3404087521159115f785",
    "tiles:mixed4c/full/examples/2/1/1.jpg": "1dcd7246ed2ccee8786308db1ba221a35b6e8ad6dd87eb389fecf12eb732f4bf",
    "tiles:mixed4c/full/examples/4/0/0.jpg": "e64f7796831ccf96e7d206f8f29d7ff7b56ac5691b5dfde8f57da5ca6a9d25b6",
    "tiles:mixed4c/full/examples/4/0/1.jpg": "b709387f416970e16387175eb847c52185c2cf3cbca3a6b31e9f1a2470da73f3",
    "tiles:mixed4c/full/examples/4/0/2.jpg": "5b20877614b153e13ddbb7c57785db52d8ec08571bb9e687c90e0bb82bb57d89",
    "tiles:mixed4c/full/examples/4/1/0.jpg": "0cc2466b7993554595a386d6ccccc5832ddf6e42926f2d5c69705f148e487a53",
    "tiles:mixed4c/full/examples/4/1/1.jpg": "28a0e00de9ed4fbdda5f852582b1b246c176ef0383e05a854cc60b2a0120e4f6",
    "tiles:mixed4c/full/examples/4/2/1.jpg": "63a399ea0ddbe7ab1dc7cbe055ff7c35194b63c974ed3404087521159115f785",
    "tiles:mixed4c/full/examples/4/2/2.jpg": "88e58a833e3eaaff17c1f8e566ea6943f8eee8f288b2ae0dcd6421ccc2e2a885",
    "tiles:mixed4c/full/examples/4/3/2.jpg": "23894681d3e4a794b24ac1fd33113f60b8ae16fea87fa97057155ad533b9009f",
    "tiles:mixed4c/full/examples/4/3/3.jpg": "8ac1873c1900385ba5d3523c96fe5b09cd80c86f616595958f63dd5c9bbf0af8",
    "tiles:mixed4c/full/icons/2/0_0.jpg": "a6f054172b7a0e819d4a157e00e5aff7fb85bc24158fe020b69c0457b493077d",
    "tiles:mixed4c/full/icons/4/0_0.jpg": "32721fab99183e86c7b5f9b403e26dd41422b95b97a221244c48cf0cdcc3399f",
    "tiles:mixed4c/full/meta/2/0_0.json": "d1c72898a6006d6857bd533bb085b37d51b96e3844039d6deb6f1df6042b7ea1",
    "tiles:mixed4c/full/meta/4/0_0.json": "7ee62148101ef78608da18fe25d85c3bb4caaffecd14fd73e8a62975f334de9c",
    "tiles:openseadragon/images/button_grouphover.png": "2e64df18c27b1a51955c47cbe7535fa2a25548cefb7d1a2de625b59f31853cb6",
    "tiles:openseadragon/images/button_hover.png": "b1086485b0d055d468a729f5a6a79f78fc06fdfa814710dedb7021a7d6206fde",
    "tiles:openseadragon/images/button_pressed.png": "01f1c05bdee216ec417e3475552cd053ce3199bfd2c9e1660f2c7cdc60d0be11",
    "tiles:openseadragon/images/button_rest.png": "5c693c3b03e6efc5c491ab2e8e1ba81800de423a16da8c7f348c19ae8924d142",
    "tiles:openseadragon/images/flip_grouphover.png": "4fd7b938cc4c9130e479d4d10d86c2f30365729693643621b8c1453d2af24333",
    "tiles:openseadragon/images/flip_hover.png": "8ba844f9109df84e914603952518f56d1c6ef5431b6d77e65ae0b0882688b1d0",
    "tiles:openseadragon/images/flip_pressed.png": "736c5718b4ec4dad0873ae3f0517cb24f8199156627ee85f0490ec5088aebdc4",
    "tiles:openseadragon/images/flip_rest.png": "e32e934c0b244c0422ec4677a87a4ff7e0617687cd9c4a59f1f91e3edfde5315",
    "tiles:openseadragon/images/fullpage_grouphover.png": "f96415fcf86eff56b664f2328ffd61972b98738874d995e077091344f59fc26b",
    "tiles:openseadragon/images/fullpage_hover.png": "3cc954037484edb4a74d97a374605301b4da04c034981af70ec0ec3e1bb509a8",
    "tiles:openseadragon/images/fullpage_pressed.png": "7b3d188695ec59993a09cf27dde280b1da93fd43360f721642b42229b9e5e817",
    "tiles:openseadragon/images/fullpage_rest.png": "1b7ae93b3fe5d0df99e196bfe22b93c7f05d2d5e0fdf97b8b8e957e5476ff586",
    "tiles:openseadragon/images/home_grouphover.png": "2f2dfd6ed6fd11c1aec5491c36f071cf51a96712ddac54b803a8fee917ce27d8",
    "tiles:openseadragon/images/home_hover.png": "170fc906037fe8707d3757775ea4ccb3ebbf883329c44473cd247d0f22c320d9",
    "tiles:openseadragon/images/home_pressed.png": "e8a08eb8d9862e63c8df96fbe508956ae031b09d85533adf83e094c5b187833c",
    "tiles:openseadragon/images/home_rest.png": "6fd27483f507bf8b4a15d6c60d43e9bb3bd14b84959973d61a622bbb4777dfc9",
    "tiles:openseadragon/images/next_grouphover.png": "e7c76fb2c8a792a63efe2ad76da276fd079f50ec0df2b03b04bfc36cfc217103",
    "tiles:openseadragon/images/next_hover.png": "67210c1194693f480cfe9935281fd447a86c46b65e67ce182632cb518dfd2bb9",
    "tiles:openseadragon/images/next_pressed.png": "95afb05783b4c599eec66a21a2b98ea09d6b0be41cce42ed512239cede37a1ab",
    "tiles:openseadragon/images/next_rest.png": "d9b1965f3bcddd3db23e63037a27152c1b7528811582c68b7b4bf25b8673fe07",
    "tiles:openseadragon/images/previous_grouphover.png": "c7e82a94049ff615a7dc6f78ae3758d7d33eab41a69093d9c1101c164c07fe8b",
    "tiles:openseadragon/images/previous_hover.png": "94126f0047e7901b3d2e408abb58b20744a7251786746d7508624db5b4c81bce",
    "tiles:openseadragon/images/previous_pressed.png": "b80145c436ff5cd94c3f672eed9f1723fcd13077870337874171e99dee9f9929",
    "tiles:openseadragon/images/previous_rest.png": "56999fcbe41a0ebb5d701fb463caea0e3850478d1f869e2e7a73b7dc363ca2e2",
    "tiles:openseadragon/images/rotateleft_grouphover.png": "35d3cf9efe958bd88ae0c532648403824df252fa6835aa586301b19c80c264e3",
    "tiles:openseadragon/images/rotateleft_hover.png": "59fee051c2aff4c8491255be664f87671c089db4863f933989b10263818cf435",
    "tiles:openseadragon/images/rotateleft_pressed.png": "97d28095eb471109d0aee65f9f4dc5ee6dba6d7fed433e3a910dcda69ca4a977",
    "tiles:openseadragon/images/rotateleft_rest.png": "ab4731e3c7d7a4b40ea07c16269e8117ce58506177dc438cc00cdf837f513f09",
    "tiles:openseadragon/images/rotateright_grouphover.png": "ebdaf54f82601db210a5ac2e0a54790c0decd8dea5bd115f7d6d0d2bf04c5e00",
    "tiles:openseadragon/images/rotateright_hover.png": "a9124016ebe30ec16f3691a16cc57997174652f480f3002d45beaf918b1230c1",
    "tiles:openseadragon/images/rotateright_pressed.png": "a75e74dab723a0587d365e4b076572d1440df9f31c424ef4a6be62f3a45d472b",
    "tiles:openseadragon/images/rotateright_rest.png": "c201ce35f6651e824eee3eb5ca3e42fc40035d2070eec9ce1261c8b7bc126526",
    "tiles:openseadragon/images/zoomin_grouphover.png": "ecd40589890cdfd81911752c4af02c691a201c21d74bbad5f3d9336463b52604",
    "tiles:openseadragon/images/zoomin_hover.png": "6a2c08cf07b12162f73e80417d6e49e7da4b219981c9929abf89fbd1a18b58a2",
    "tiles:openseadragon/images/zoomin_pressed.png": "b9eb902ca333aaabd8cf77c1184a6aa24311bcba0d836dc6ebded4c5d7146475",
    "tiles:openseadragon/images/zoomin_rest.png": "674258f78d924bfe2454a637ecf912fe7069105ab68980f69674ff5c25521ed9",
    "tiles:openseadragon/images/zoomout_grouphover.png": "b582631f7ede7c640c46a29d74728814d3b7332b14748054ae460aa9be929e77",
    "tiles:openseadragon/images/zoomout_hover.png": "b752facaf76d197e235dd789929e86577339ffa280b6a51621388f2cad9900e1",
    "tiles:openseadragon/images/zoomout_pressed.png": "99ce17d25e10d07ebe3a21642eb350bfd80c603cbb6a4b0af705fbcdf8ca57dc",
    "tiles:openseadragon/images/zoomout_rest.png": "a4ff50ab46d8de87c720cb9cbccc9b4bef1cdda1394b9c8a2b4e6fb2f63e13aa",
    "tiles:openseadragon/openseadragon.min.js": "cd6e48562264cc518224380d745a620bcf7828235c232d94964e3c9d9e7bdb63",
    "tiles:viewer.css": "ba07e0a137fe4a928dcb65a674cf855547fb8fbe40d8ffa2ce81969125149702",
    "tiles:viewer.js": "1974825f97ff0194d836137bb16dcf38fd2926b2132014411bb0732ed5c8b6a5",
}


def test_tiny_build_matches_the_recorded_pre_reshape_build(tmp_path):
    require_shared()
    auto = autocast_dtype("auto", torch.device("cpu"))
    if torch.__version__ != RECORDED_TORCH or auto != RECORDED_AUTO:
        pytest.skip(f"digests were recorded with torch {RECORDED_TORCH}, precision auto = float32; this is torch "
                    f"{torch.__version__}, auto = {auto or 'float32'}")
    names = sorted(p.name for p in PHOTOS.glob("*.JPEG"))[:12]
    listing = tmp_path / "photos.txt"
    listing.write_text("".join(f"{PHOTOS / n}\n" for n in names))
    config = tmp_path / "tiny.toml"
    config.write_text(_config(WEIGHTS))
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", "from atlas.cli import main; main()", "build", "--config", str(config),
                             "--images", str(listing), "--out", str(run)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    got = _digest(run)
    assert sorted(got) == sorted(RECORDED), "the build wrote other arrays or tile files than the recorded one"
    differ = sorted(k for k in RECORDED if got[k] != RECORDED[k])
    assert not differ, f"differs from the pre-reshape build (3ad0fdb): {differ}"
