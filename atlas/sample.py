"""Sample activations (and their class attributions) from a dataset into the run's store.

For each image and each requested layer, ``per_image`` random spatial positions off the
border are drawn from a generator seeded by (seed, image index, layer index): the samples
never depend on batch size, worker count or on where a previous run was killed.

Attribution of a sample to class c is ``h . d logit_c / d h`` at the sampled position. It
is computed for all classes at once with one forward-mode Jacobian-vector product: the
activation at the layer becomes a dual tensor whose tangent is the activation itself at
the sampled position and zero elsewhere, so the logits' tangent is exactly that dot
product for every class.

Work is done in shards of ``shard_size`` images (``SampleSettings.shard_size``). A shard's rows are written, then its
``images/shard_done`` flag: a killed run redoes at most the shard in flight.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from tqdm.auto import tqdm

import atlas
from atlas import store
from atlas.data import ImageDataset, ImageList, check_image_source, class_table, compare_lists, device_batch, image_loader, list_images
from atlas.engine import Engine, make_engine
from atlas.errors import AtlasError
from atlas.info import label_agreement
from atlas.models import InceptionV1, Network, load_model, load_run_model
from atlas.models.inference import as_input, fusable, inference_net, micro_batch, run_activations
from atlas.models.precision import resolve_precision
from atlas.settings import SampleSettings, check_device, check_out_folder

# Sampling stops early, keeping what is done, when the images cannot be read: when no image of the first shard
# could be read, or when fewer than MIN_READABLE of the images tried so far were readable once MIN_TRIED were tried.
MIN_READABLE = 0.5
MIN_TRIED = 64
BORDER = 1
TOP_K = 5
# The zoo's preprocessing: the shorter side resized to RESIZE, the centre CROP x CROP fed to the model (a model with its
# own preprocessing, atlas.models.wrap, replaces both).
RESIZE, CROP = 256, 224
# Settings that must match for a run folder to be resumed rather than rejected.
RESUME_KEYS = ("model", "weights_sha256", "layers", "seed", "per_image", "image_list_hash", "dtype", "attribution", "preprocessing",
               "shard_size", "precision", "aligned_positions", "forward")
# Resume keys a store may lack: written only when not at their default, so the stores of a default run stay as they were.
RESUME_ABSENT = {"aligned_positions": False, "forward": "fused"}


@dataclass
class SampleResult:
    run_dir: Path
    n_images: int
    n_skipped: int
    n_samples: dict[str, int]
    seconds: float
    images_per_second: float
    images_summary: str = ""
    # agreement of the labels with the model's top-1/top-5 (atlas.info.label_agreement), None without labels
    labels: dict | None = None


def sample_positions(seed: int, image_index: int, layer_index: int, hw: tuple[int, int], k: int, border: int = BORDER) -> np.ndarray:
    """(k, 2) distinct (y, x) positions off the border, a function of the seed and image only."""
    h, w = hw
    b = border if min(h, w) > 2 * border else 0
    rng = np.random.default_rng([seed, image_index, layer_index])
    cells = (h - 2 * b) * (w - 2 * b)
    flat = rng.choice(cells, size=k, replace=k > cells)
    return np.stack([flat // (w - 2 * b) + b, flat % (w - 2 * b) + b], axis=1).astype(np.int16)


def shard_positions(seed: int, indices: Sequence[int], layer_index: int, hw: tuple[int, int], k: int) -> np.ndarray:
    return np.concatenate([sample_positions(seed, i, layer_index, hw, k) for i in indices])


def corresponding_positions(positions: np.ndarray, hw_from: tuple[int, int], hw_to: tuple[int, int], crop: int) -> np.ndarray:
    """(n, 2) int16 positions of a layer of ``hw_to`` corresponding to (n, 2) ``positions`` of a layer of ``hw_from``: each
    position's input-pixel centre (:func:`atlas.data.position_to_pixels`), then the cell of the other grid holding it (the
    cell whose centre is nearest). Pure."""
    p = np.asarray(positions, np.float64)
    out = []
    for axis in (0, 1):
        centre = (p[:, axis] + 0.5) * crop / hw_from[axis]
        out.append(np.clip(np.floor(centre * hw_to[axis] / crop), 0, hw_to[axis] - 1))
    return np.stack(out, 1).astype(np.int16)


def layer_positions(settings: dict, indices: Sequence[int], grids: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """Every layer's positions of the images ``indices`` (``grids``: layer -> (h, w), in the run's layer order): each
    layer's own seeded draw, or with ``settings["aligned_positions"]`` the first layer's draw carried to the others."""
    k, seed, layers = settings["per_image"], settings["seed"], list(grids)
    if not settings.get("aligned_positions", RESUME_ABSENT["aligned_positions"]):
        return {layer: shard_positions(seed, indices, li, grids[layer], k) for li, layer in enumerate(layers)}
    first = shard_positions(seed, indices, 0, grids[layers[0]], k)
    crop = settings["preprocessing"]["crop"]
    return {layer: first if li == 0 else corresponding_positions(first, grids[layers[0]], grids[layer], crop)
            for li, layer in enumerate(layers)}


def _gather(activation: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows activation[b // k, :, y_b, x_b] for each sample b of the (B*k) batch."""
    k = positions.shape[0] // activation.shape[0]
    batch = torch.arange(positions.shape[0], device=activation.device) // k
    return activation[batch, :, positions[:, 0].long(), positions[:, 1].long()]


Tensors = dict[str, torch.Tensor]


def forward_samples(net: Network, images: torch.Tensor, layers: Sequence[str], positions: Tensors,
                    attribution: bool, precision: str = "float32",
                    forward: str = SampleSettings.forward) -> tuple[Tensors, Tensors, torch.Tensor | None]:
    """Activations at the sampled positions, their attributions (if asked) and the logits.

    ``positions[layer]`` is (B*k, 2). Without attribution the forward stops at the deepest
    layer, in ``precision`` (bfloat16 keeps activations to a cosine of 0.9999 and is faster
    on a bf16 CPU; see bench/sample.py), and logits are None. With it, one float32 forward-AD pass per
    layer (the JVP loses ~2% cosine in bfloat16); the first also yields every layer's
    activations and the logits. ``forward`` names the kernels (:data:`atlas.settings.FORWARDS`): "nchw" runs ``net``
    as it is, the others a cached copy (:func:`atlas.models.inference.inference_net`; forward-mode AD runs on the
    channels-last one, which has its rules). With "fused", InceptionV1's attribution is :func:`_split_attribution`.
    """
    chunk = micro_batch(images, forward)
    if chunk < images.shape[0]:
        return _in_chunks(images, positions, chunk, lambda part, where: forward_samples(
            net, part, layers, where, attribution, precision, forward))
    acts: dict[str, torch.Tensor] = {}
    attrs: dict[str, torch.Tensor] = {}
    if attribution and forward == "fused" and isinstance(net.module, InceptionV1) and fusable(net, layers):
        return _split_attribution(net, images, layers, positions)
    if not attribution:  # the one function every pass that reads the run's activations calls (docs/precision.md)
        out = run_activations(net, images, layers, precision, forward)
        return {name: _gather(out[name], positions[name]).float() for name in layers}, attrs, None
    net = inference_net(net, forward, layers, dual=True)
    images = as_input(images, forward)

    logits = None
    for target in layers:
        k = positions[target].shape[0] // images.shape[0]

        def edit(name: str, out: torch.Tensor, target=target, k=k):
            return _dual_rows(out, positions[target], k) if name == target else None

        with torch.no_grad(), fwAD.dual_level():
            with net.hooks(layers if logits is None else [target], edit=edit, stop=False) as captured:
                out = net.module(images)
            primal, tangent = fwAD.unpack_dual(out)
            attrs[target] = tangent.float()
            if logits is None:
                logits = primal[::k].float()
                for name, value in captured.items():
                    value = fwAD.unpack_dual(value).primal
                    if value.shape[0] != images.shape[0]:  # deeper than the dual layer: batch was repeated
                        value = value[:: value.shape[0] // images.shape[0]]
                    acts[name] = _gather(value, positions[name]).float()
    return acts, attrs, logits


def _in_chunks(images: torch.Tensor, positions: Tensors, chunk: int, run) -> tuple[Tensors, Tensors, torch.Tensor | None]:
    """``run(images, positions)`` on ``chunk`` images at a time (their positions with them), results concatenated in
    order: the rows one call would give, to float rounding (nothing in an image's numbers depends on the others)."""
    n = images.shape[0]
    parts = []
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        where = {name: p[lo * (p.shape[0] // n): hi * (p.shape[0] // n)] for name, p in positions.items()}
        parts.append(run(images[lo:hi], where))
    acts, attrs = ({name: torch.cat([part[i][name] for part in parts]) for name in parts[0][i]} for i in (0, 1))
    logits = None if parts[0][2] is None else torch.cat([part[2] for part in parts])
    return acts, attrs, logits


def _dual_rows(out: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """The layer's output ``out`` (B, C, H, W), each image repeated for its ``k`` sampled positions, as a dual tensor whose
    tangent is the activation at that row's position and zero elsewhere: the logits' tangent is then h . d logit / d h."""
    rows = out.repeat_interleave(k, 0) if k > 1 else out
    tangent = torch.zeros_like(rows)
    idx = torch.arange(rows.shape[0], device=rows.device)
    y, x = positions[:, 0].long(), positions[:, 1].long()
    tangent[idx, :, y, x] = rows[idx, :, y, x]
    return fwAD.make_dual(rows, tangent)


def _split_attribution(net: Network, images: torch.Tensor, layers: Sequence[str],
                       positions: Tensors) -> tuple[Tensors, Tensors, torch.Tensor]:
    """InceptionV1's attribution with the fused kernels wherever no dual numbers flow: one fused pass to the deepest
    layer gives every layer's activations, then for each layer forward-mode AD runs through the steps after it only
    (:meth:`InceptionV1.forward_after`), on the channels-last copy. The same values as the one-pass JVP to float
    rounding; the layers below the deepest one are computed once, by the faster kernels."""
    fused, dual = inference_net(net, "fused", layers), inference_net(net, "channels-last", layers, dual=True)
    images = as_input(images, "fused")
    with torch.no_grad():  # not inference mode: the activations become the primal of dual tensors below
        out = fused.activations(images, layers)
    acts = {name: _gather(out[name], positions[name]).float() for name in layers}
    attrs: Tensors = {}
    logits = None
    for target in layers:
        k = positions[target].shape[0] // images.shape[0]
        with torch.no_grad(), fwAD.dual_level():
            primal, tangent = fwAD.unpack_dual(dual.module.forward_after(_dual_rows(out[target], positions[target], k),
                                                                         net.resolve(target)))
        attrs[target] = tangent.float()
        logits = primal[::k].float() if logits is None else logits
    return acts, attrs, logits


def check_layers(net: Network, layers: Sequence[str], crop: int = 224) -> dict[str, tuple[int, ...]]:
    """Every layer's output shape at ``crop`` pixels; a layer the model lacks, or one without spatial positions
    (e.g. ``logits``), is one line, before anything is written."""
    for layer in layers:
        net.resolve(layer)
    shapes = net.layer_shapes(crop)
    for layer in layers:
        if len(shapes.get(layer, ())) != 3:
            raise AtlasError(f"layer '{layer}' has no spatial positions (shape {shapes.get(layer)}); choose a convolutional layer")
    return shapes


@dataclass
class SamplePlan:
    """What a sample call will do, decided before anything is written: the model, the images, the layers and their
    shapes, and the settings recorded in the store (:func:`plan_sample`)."""

    net: Network
    images: ImageList
    layers: list[str]
    shapes: dict[str, tuple[int, ...]]
    record: dict


def run_record(net: Network, layers: list[str], settings: SampleSettings, images: ImageList, resize: int = RESIZE,
               crop: int = CROP) -> dict:
    """The settings a run's store records (and a resume must match, :data:`RESUME_KEYS`). Pure.

    Parameters
    ----------
    net : Network
        The loaded model (its name, weights and preprocessing are recorded).
    layers : list of str
        The sampled layers, in order.
    settings : SampleSettings
        The sample settings (``precision`` "auto" is resolved for ``settings.device`` here).
    images : ImageList
        The listed images (their digest is recorded).
    resize : int, default RESIZE (256)
        Shorter side before the crop; a model with its own preprocessing (``net.preprocess``) replaces it.
    crop : int, default CROP (224)
        Side of the centre crop; a model with its own preprocessing replaces it.

    Returns
    -------
    dict
        The store's run attributes: model, weights, layers, seed, per_image, image_list_hash, dtype, attribution,
        preprocessing, shard_size, precision, and forward / aligned_positions where they are not at their defaults.
    """
    s = settings
    if net.preprocess:  # a model with its own preprocessing (atlas.models.wrap): its resize and input size
        resize, crop = int(net.preprocess["resize"]), int(net.preprocess["size"])
    record = {
        "model": net.name, "weights": net.weights, "weights_sha256": net.weights_sha256, "layers": layers, "seed": s.seed,
        "per_image": s.per_image, "image_list_hash": images.digest, "dtype": s.dtype, "attribution": s.attribution,
        "preprocessing": {"resize": resize, "crop": crop, "input": "RGB [0, 1]; the model normalises"} | _model_preprocessing(net),
        "shard_size": s.shard_size,
        "precision": resolve_precision(s.precision, s.device) if not s.attribution else "float32",
    }
    if record["precision"] == "bfloat16":
        # in bfloat16 the kernels' own roundings show: recorded, so later passes over the run's photos use the same ones
        record["forward"] = s.forward
    if s.aligned_positions:  # only when on: a default run's store attributes stay what they were
        record["aligned_positions"] = True
    return record


def plan_sample(images: str | Path | ImageList, layers: Sequence[str], out: str | Path, settings: SampleSettings,
                net: Network | None = None, labels: str | Path | None = None) -> SamplePlan:
    """Every check of a sample call, the model loaded and the images listed; no store is written (the run folder is
    read for the image list of a run being resumed, :func:`_resumable_list`, whose log may say which files it lost)."""
    if not layers:
        raise AtlasError("give at least one --layer")
    check_out_folder(out)
    check_device(settings.device)
    if not isinstance(images, ImageList):
        check_image_source(images)  # a README or a JPEG given as the list: one line before the model loads
    layers = list(dict.fromkeys(layers))
    net = net or load_model(settings.model, settings.weights, settings.device)
    crop = int(net.preprocess["size"]) if net.preprocess else CROP
    shapes = check_layers(net, layers, crop)
    if not isinstance(images, ImageList):
        images = list_images(images, class_table(net.weights), labels=labels)
    images = _resumable_list(Path(out), images.head(settings.max_images))
    return SamplePlan(net, images, layers, shapes, run_record(net, layers, settings, images))


@store.writer
def sample(images: str | Path | ImageList, layers: Sequence[str], out: str | Path, settings: SampleSettings | None = None, *,
           net: Network | None = None, labels: str | Path | None = None, engine: str | Engine = "local", progress: bool = True,
           **overrides) -> SampleResult:
    """Sample ``per_image`` activations per image at each layer into ``out``/store.zarr: the sample stage.

    Each image is resized and centre-cropped, run through the model once, and at ``per_image`` random spatial
    positions per layer (a function of ``seed`` and the image only) the activation vector is stored, with its
    attribution to every class when ``attribution`` is on. Work goes in shards of ``shard_size`` images, so an
    interrupted run resumes with the same settings; a folder holding a run with other settings is an error
    (nothing is overwritten). Every setting is checked before anything is loaded or created.

    Parameters
    ----------
    images : str, Path or ImageList
        An image folder (ImageNet tree or flat), a list file (one path per line, optionally a label), or an
        :class:`atlas.data.ImageList` already listed.
    layers : sequence of str
        At least one layer of the model with spatial positions, e.g. ["mixed4c"]; repeats are dropped.
    out : str or Path
        The run folder (created if missing).
    settings : SampleSettings or None, default None
        The settings (:class:`atlas.settings.SampleSettings`: model, weights, max_images, per_image, seed, attribution,
        dtype, precision, forward, aligned_positions, batch_size, workers, device, shard_size); None: the defaults.
        ``model`` and ``weights`` are ignored when ``net`` is given.
    net : Network or None, default None
        An already loaded model (``atlas.models.load_model``), to skip loading it again.
    labels : str, Path or None, default None
        A labels file for the images (docs/images.md, ``atlas.data``).
    engine : str or Engine, default "local"
        "local" (this process), "ray" (a Ray started here) or an :class:`atlas.engine.Engine`
        (``make_engine("ray", address)`` for a running cluster): with Ray the shards run on a pool of actors, one model
        each, and come back here to be written; the store is bit-identical to a local run's (docs/ray.md).
    progress : bool, default True
        Show a progress bar (only on a terminal).
    **overrides
        Single fields of :class:`~atlas.settings.SampleSettings` replacing those of ``settings``, e.g. ``per_image=4``
        (checked by the class; an unknown name is one line).

    Returns
    -------
    SampleResult
        ``run_dir``, ``n_images`` (listed), ``n_skipped`` (unreadable), ``n_samples`` (valid samples per layer),
        ``seconds``, ``images_per_second`` (of this call), ``images_summary`` (how the images were found) and
        ``labels`` (agreement of the labels with the model, None without labels).

    Raises
    ------
    AtlasError
        For a setting out of range, an unknown layer, a folder holding another run, or when the images cannot be
        read (none of the first shard, or fewer than ``MIN_READABLE``, half, of those tried once ``MIN_TRIED`` were
        tried): the shards finished before are kept, the one that tipped it is redone on resume.
    """
    s = SampleSettings.merged(settings, overrides)
    run_on = engine if isinstance(engine, Engine) else make_engine(engine)
    plan = plan_sample(images, layers, out, s, net, labels)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = _open_or_create(out, plan.images, plan.net, plan.shapes, plan.record, auto_precision=s.precision == "auto")
    n, size = len(plan.images), s.shard_size
    done = store.read_flags(root["images/shard_done"])
    todo = [shard for shard in range(math.ceil(n / size)) if not done[shard]]
    start = time.perf_counter()
    # The bar only on a terminal: piped or logged output gets the summary lines, not carriage-return noise.
    bar = tqdm(total=sum(min(size, n - shard * size) for shard in todo), unit="img", disable=None if progress else True,
               desc=f"sample {','.join(plan.layers)}", dynamic_ncols=True)
    finished = np.repeat(done, size)[:n]
    tried, readable = int(finished.sum()), int(root["images/ok"][:][finished].sum()) if finished.any() else 0
    with run_on.session():
        # The kernels travel with the settings the shards are computed with, not into the store: speed only.
        processed, first_error = _sample_shards(root, out, plan.net, plan.images, plan.layers, plan.shapes,
                                                {"forward": s.forward} | plan.record, todo, s.batch_size, s.workers, s.device, bar,
                                                run_on, tried, readable)
    seconds = time.perf_counter() - start
    if run_on.is_ray and todo:
        store.log(out, f"sample on Ray: {run_on.last.describe()}")
    return _finish(root, out, plan, first_error, seconds, processed)


def _finish(root, out: Path, plan: SamplePlan, first_error: str | None, seconds: float, processed: int) -> SampleResult:
    """The run's summary, written, and the result of the call; no valid sample at all is one line."""
    n = len(plan.images)
    n_skipped = int((~root["images/ok"][:]).sum())
    counts = {layer: int(root[f"samples/{layer}/valid"][:].sum()) for layer in plan.layers}
    if not any(counts.values()):
        _stop(out, n, 0, first_error)
    agreement = label_agreement(root)
    root.attrs["summary"] = {"n_images": n, "n_skipped": n_skipped, "samples": counts, "complete": True}
    store.finish_stage(out, "sample", _sample_paths(plan.record))
    return SampleResult(out, n, n_skipped, counts, seconds, processed / seconds if seconds > 0 and processed else 0.0,
                        plan.images.summary, agreement)


def _model_preprocessing(net: Network) -> dict:
    """What a wrapped model adds to the recorded preprocessing (interpolation, mean, std; the token positions used);
    nothing for the zoo's models, whose stores stay as they were."""
    if not net.preprocess:
        return {}
    extra = {k: net.preprocess[k] for k in ("interpolation", "mean", "std")}
    if net.prefix_tokens or net.patch_grid:
        extra["tokens"] = f"patch tokens as positions; the first {net.prefix_tokens} (class/register) tokens dropped"
    return extra


def _sample_shards(root, out: Path, net: Network, images: ImageList, layers: list[str], shapes: dict, settings: dict,
                   todo: list[int], batch_size: int, workers: int, device: str, bar, run_on: Engine, tried: int,
                   readable: int) -> tuple[int, str | None]:
    """Compute the shards ``todo`` (here or on Ray), write and flag each in order; returns (images processed, first error)."""
    first_error = None
    processed = 0
    if run_on.is_ray:
        # One model per Ray actor; each returns its shards' arrays, written and flagged here in shard order.
        results = _advancing(run_on.map(shard_worker, (settings, images, layers, shapes, batch_size, workers, device), todo,
                                        "sample", gpus=1.0 if device.startswith("cuda") else 0.0), bar)
    else:
        results = (compute_shard(net, images, layers, shapes, shard, settings, batch_size, workers, device, bar.update)
                   for shard in todo)
    try:
        for result in results:
            error = _write_shard(root, out, images, layers, settings, result)
            count, good, shard = len(result.ok), int(result.ok.sum()), result.shard
            processed, tried, readable = processed + count, tried + count, readable + good
            first_error = first_error or error
            if readable == 0 or (tried >= MIN_TRIED and readable < MIN_READABLE * tried):
                _stop(out, tried, readable, first_error)
            root["images/shard_done"][shard] = True  # only now: a shard that stopped the run is redone on resume
    finally:
        bar.close()
        results.close()
    return processed, first_error


def _advancing(results, bar):
    """``results`` passed through, the progress bar advanced by each shard's images."""
    for result in results:
        bar.update(len(result.ok))
        yield result


def _stop(out: Path, tried: int, readable: int, first_error: str | None) -> None:
    """End sampling over unreadable images: one line, also in the log."""
    failed = tried - readable
    if readable == 0:
        message = f"stopped sampling: none of the {tried:,} images tried could be read"
    else:
        message = f"stopped sampling: {failed:,} of the {tried:,} images tried could not be read (more than {1 - MIN_READABLE:.0%})"
    message += f"; first error: {first_error or 'none recorded'}; every skipped file is listed in {out / 'log.txt'}"
    store.log(out, message)
    raise AtlasError(message)


def _sample_paths(settings: dict) -> list[str]:
    """The store nodes the sample stage writes (for the ledger: marks, seals, checks)."""
    return ["images", *(f"samples/{layer}" for layer in settings["layers"])]


def _resumable_list(out: Path, images: ImageList) -> ImageList:
    """The image list to sample into ``out``: ``images``, or, when ``out`` holds a run started on another list, that
    run's own list, if the only difference is files gone from it that gave no samples.

    A run keeps the list it was started with (the images' indices fix shards and positions). Files the new list no
    longer names are fine when none of them was sampled (unreadable, or in a shard not yet done): the run resumes on
    its own list, those files skipped and counted as unreadable. Any other difference (files added, relabelled or
    reordered, or a sampled file gone) is one line naming the files, before anything is written.
    """
    # With --max-images (or a build's max_images): the whole list, whose first N the run's images stand for.
    listed, window = images.source or images, images.source is not None
    images = dataclasses.replace(images, source=None)  # not carried on (to Ray workers)
    if not store.store_path(out).is_dir():
        return images
    try:
        root = store.open_store(out)
        have = store.attrs(root)
        if have.get("image_list_hash") in (None, images.digest):
            return images
        stored = ImageList([str(p) for p in root["images/path"][:].tolist()], root["images/label"][:].astype(np.int32))
        ok, done = root["images/ok"][:], np.repeat(store.read_flags(root["images/shard_done"]), have["shard_size"])[:len(stored)]
    except (AtlasError, KeyError, OSError, ValueError):
        return images  # a damaged store: the checks of _open_or_create say what is wrong
    if stored.digest != have["image_list_hash"]:
        return images
    removed, differs = compare_lists(stored, listed, window)
    sampled = [i for i in removed or () if ok[i] and done[i]]
    if removed is None or sampled:
        why = (f"{len(sampled):,} removed file(s) were sampled already ({', '.join(Path(stored.paths[i]).name for i in sampled[:3])})"
               if removed is not None else "a resumed run keeps its list; it may only lose files that gave no samples")
        raise AtlasError(f"{out} holds a run of another image list ({differs}): {why}; to resume it give the list it was started "
                         f"with ({len(stored):,} images, stored in {store.STORE_NAME}/images/path), or sample into another --out")
    gone = ", ".join(Path(stored.paths[i]).name for i in removed[:3]) + (", ..." if len(removed) > 3 else "")
    store.log(out, f"image list: {len(removed):,} file(s) of the run no longer listed ({gone}); none gave samples: resuming the "
              "run's own list, those files skipped as unreadable")
    return ImageList(stored.paths, stored.labels, f"{len(stored):,} images of the run in {out.name} ({len(removed):,} no longer "
                     f"listed, none sampled: skipped)", skip=frozenset(removed))


def _open_or_create(out: Path, images: ImageList, net: Network, shapes: dict, settings: dict, auto_precision: bool = False):
    """The run's store, resumed (after checking settings and repairing damaged shards) or created atomically.

    With ``auto_precision`` (the user asked for "auto"), a resumed run keeps the precision it records (and updates
    ``settings`` to it), whatever this machine's "auto" would be.

    Takes the run's lock first. A new store is built in ``RUN/.store.zarr.partial-PID`` and
    renamed into place, so a kill leaves either no store or a complete, resumable one.
    """
    store.take_lock(out, create=True)
    path = store.store_path(out)
    if path.exists():
        root = store.open_store(out, "r+")
        have = store.attrs(root)
        if auto_precision and not settings["attribution"] and have.get("precision") in ("float32", "bfloat16"):
            # "auto" resumes in the run's recorded precision on any machine: one run, one arithmetic (docs/precision.md)
            settings["precision"] = have["precision"]
            settings.pop("forward", None)
            if have["precision"] == "bfloat16":
                settings["forward"] = have.get("forward", RESUME_ABSENT["forward"])
        diff = [k for k in RESUME_KEYS if have.get(k, RESUME_ABSENT.get(k)) != settings.get(k, RESUME_ABSENT.get(k))]
        if diff:
            key = diff[0]
            there, now = have.get(key, RESUME_ABSENT.get(key)), settings.get(key, RESUME_ABSENT.get(key))
            raise AtlasError(f"{out} holds a run with different settings ({key}: {there!r} there, {now!r} now); "
                             "use another --out or delete the folder")
        _repair(out, root, images, settings)
        return root
    with store.new_store(out) as partial:
        _create(partial, images, net, shapes, settings)
        store.begin_stage(partial, "sample", _sample_paths(settings))
    return store.open_store(out, "r+")


def _repair(out: Path, root, images: ImageList, settings: dict) -> None:
    """Before resuming: redo the shards whose chunks are damaged, rewrite a damaged image list, mark the stage as writing."""
    bad: dict[str, list] = {}
    for node in _sample_paths(settings):
        bad |= store.damaged(out, node)
    shards: set[int] = set()
    for rel, coords in bad.items():
        if coords is None:  # metadata gone: the settings of the array cannot be trusted any more
            raise AtlasError(f"{store.store_path(out) / rel} is damaged (zarr.json unreadable); the sampled data cannot be read any "
                             "more: sample again into a new folder")
        if rel == "images/path":
            store.write_array(root["images"], "path", np.asarray(images.paths, dtype=str))
        elif rel == "images/label":
            store.write_array(root["images"], "label", images.labels.astype(np.int32))
        else:  # every other sample array is chunked by shard: chunk i holds shard i's rows
            shards |= {int(c[0]) for c in coords if c}
    flags = root["images/shard_done"]
    for shard in sorted(shards):
        if shard < flags.shape[0]:
            flags[shard] = False
    if bad:
        store.log(out, f"sample: damaged arrays {', '.join(sorted(bad))}; redoing shards {sorted(shards)}")
    if bad or not store.read_flags(flags).all():
        store.begin_stage(out, "sample", _sample_paths(settings))


def _create(root, images: ImageList, net: Network, shapes: dict, settings: dict) -> None:
    n, k = len(images), settings["per_image"]
    group = root.require_group("images")
    store.write_array(group, "path", np.asarray(images.paths, dtype=str))
    store.write_array(group, "label", images.labels.astype(np.int32))
    shard = settings["shard_size"]
    store.create_array(group, "ok", (n,), bool, chunks=(shard,), fill_value=False)
    store.create_array(group, "top5", (n, TOP_K), np.int32, chunks=(shard, TOP_K), fill_value=-1)
    store.create_array(group, "shard_done", (math.ceil(n / shard),), bool, chunks=(1,), fill_value=False)
    rows = n * k
    n_classes = len(net.classes)
    for layer in settings["layers"]:
        c, h, w = shapes[layer]
        g = root.require_group(f"samples/{layer}")
        chunk = shard * k
        store.create_array(g, "activations", (rows, c), settings["dtype"], chunks=(chunk, c))
        if settings["attribution"]:
            store.create_array(g, "attributions", (rows, n_classes), settings["dtype"], chunks=(chunk, n_classes))
        store.create_array(g, "image_index", (rows,), np.int32, chunks=(chunk,), fill_value=-1)
        store.create_array(g, "position", (rows, 2), np.int16, chunks=(chunk, 2), fill_value=-1)
        store.create_array(g, "valid", (rows,), bool, chunks=(chunk,), fill_value=False)
        g.attrs.update({"channels": c, "grid_hw": [h, w], "layer": layer, "module": net.resolve(layer)})
    root.attrs.update(settings | {"atlas_version": atlas.__version__, "n_images": n, "classes": net.classes,
                                  "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


@dataclass
class ShardResult:
    """One shard's samples, computed by :func:`compute_shard` (here or on a Ray worker), written by the driver."""

    shard: int
    acts: dict[str, np.ndarray]
    attrs: dict[str, np.ndarray]
    ok: np.ndarray
    top5: np.ndarray
    errors: list[tuple[int, str]]  # (image index, error) of every unreadable image, in order


def compute_shard(net: Network, images: ImageList, layers: list[str], shapes: dict, shard: int, settings: dict, batch_size: int,
                  workers: int, device: str, advance=None) -> ShardResult:
    """Sample one shard: arrays in memory, nothing written (the same on the driver and on a Ray worker)."""
    n, k, size = len(images), settings["per_image"], settings["shard_size"]
    lo, hi = shard * size, min((shard + 1) * size, n)
    indices = list(range(lo, hi))
    positions = layer_positions(settings, indices, {layer: tuple(shapes[layer][1:]) for layer in layers})
    acts = {layer: np.zeros(((hi - lo) * k, shapes[layer][0]), np.float32) for layer in layers}
    attrs = {layer: np.zeros(((hi - lo) * k, len(net.classes)), np.float32) for layer in layers} if settings["attribution"] else {}
    ok = np.zeros(hi - lo, bool)
    top5 = np.full((hi - lo, TOP_K), -1, np.int32)

    forward = settings.get("forward", SampleSettings.forward)
    prep = settings["preprocessing"]
    dataset = ImageDataset(images, prep["resize"], prep["crop"], indices, uint8=True,
                           interpolation=prep.get("interpolation", "bilinear"))
    loader = image_loader(dataset, batch_size, workers, device)
    errors: list[tuple[int, str]] = []
    for batch_index, batch, batch_errors in loader:
        local = (batch_index - lo).numpy()
        good = np.array([not e for e in batch_errors])
        errors += [(index, error) for index, error in zip(batch_index.tolist(), batch_errors, strict=True) if error]
        if good.any():
            sel = local[good]
            x = device_batch(batch, good, device, channels_last=forward != "nchw")
            rows = (sel[:, None] * k + np.arange(k)).ravel()
            pos = {layer: torch.from_numpy(positions[layer][rows]).to(device) for layer in layers}
            a, t, logits = forward_samples(net, x, layers, pos, settings["attribution"], settings["precision"], forward)
            for layer in layers:
                acts[layer][rows] = a[layer].cpu().numpy()
                if settings["attribution"]:
                    attrs[layer][rows] = t[layer].cpu().numpy()
            if logits is not None:
                top5[sel] = logits.topk(TOP_K, dim=1).indices.cpu().numpy()
            ok[sel] = True
        if advance is not None:
            advance(len(batch_index))
    # Stored types are applied here, so a Ray worker sends half the bytes for float16 runs (the cast is the same).
    acts = {layer: value.astype(settings["dtype"]) for layer, value in acts.items()}
    attrs = {layer: value.astype(settings["dtype"]) for layer, value in attrs.items()}
    return ShardResult(shard, acts, attrs, ok, top5, errors)


def shard_worker(settings: dict, images: ImageList, layers: list[str], shapes: dict, batch_size: int, workers: int,
                 device: str):
    """A Ray worker's shard function (``atlas.engine``): the run's model loaded once, then one call per shard."""
    net = load_run_model(settings, device)

    def run(shard: int) -> ShardResult:
        return compute_shard(net, images, layers, shapes, shard, settings, batch_size, workers, device)

    return run


def _write_shard(root, out: Path, images: ImageList, layers: list[str], settings: dict, result: ShardResult) -> str | None:
    """Write one shard's rows (not yet its done flag) and log its unreadable images; returns the first error."""
    n, k, size = len(images), settings["per_image"], settings["shard_size"]
    lo, hi = result.shard * size, min((result.shard + 1) * size, n)
    first_error = None
    for index, error in result.errors:
        store.log(out, f"skipped image {index} {images.paths[index]}: {error}")
        first_error = first_error or (error if images.paths[index] in error else f"{images.paths[index]}: {error}")
    positions = layer_positions(settings, range(lo, hi), {layer: tuple(root[f"samples/{layer}"].attrs["grid_hw"]) for layer in layers})
    valid = np.repeat(result.ok, k)
    row_lo, row_hi = lo * k, hi * k
    image_index = np.repeat(np.arange(lo, hi, dtype=np.int32), k)
    for layer in layers:
        g = root[f"samples/{layer}"]
        g["activations"][row_lo:row_hi] = result.acts[layer]
        if settings["attribution"]:
            g["attributions"][row_lo:row_hi] = result.attrs[layer]
        g["image_index"][row_lo:row_hi] = image_index
        g["position"][row_lo:row_hi] = positions[layer]
        g["valid"][row_lo:row_hi] = valid
    root["images/ok"][lo:hi] = result.ok
    root["images/top5"][lo:hi] = result.top5
    return first_error
