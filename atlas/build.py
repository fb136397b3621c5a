"""`atlas build`: sample -> project -> grid -> render -> tiles in one call, skipping what is done.

Settings come from three layers, later ones winning: the defaults below, a TOML config
file (``configs/*.toml``, one table per stage) and explicit arguments. Each stage's
settings are hashed together with the key of the stage before it; the key is recorded in
the store when the stage finishes. Running ``build`` again skips every stage whose key is
unchanged, so changing ``grid.sizes`` redoes grid, render and tiles but neither sampling
nor projection. A killed build resumes: each stage is itself resumable. The loop itself (run in order, skip
what is current, record what finished, one progress line per stage) is :func:`atlas.runner.run_stages`,
which ``atlas class`` and ``atlas compare`` use too; ``build`` only makes the five steps.

Freshness is the store's (``atlas.store``): a stage's record is invalidated the moment that
stage, or any earlier one, starts rewriting data (whether run by ``build`` or by its own
command), and a record only counts when every array it names is still intact.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from atlas import store
from atlas.engine import make_engine
from atlas.errors import AtlasError
from atlas.runner import Step, fmt_seconds, run_stages
from atlas.settings import STAGES as SETTINGS
from atlas.settings import check_device, check_out_folder, defaults, icon_steps, resolve

STAGES = ("sample", "project", "grid", "render", "tiles")
UNIT_STAGES = ("units", "gallery")  # after the atlas when the config's [units] table says build = true
# Every config table with its defaults, from the settings classes (atlas/settings.py): the one place they live.
DEFAULTS: dict[str, dict] = defaults()
# Settings that change what a stage computes; the rest (workers, batch size, device) only change how fast.
SPEED_ONLY = {table: cls.speed_only() for table, cls in SETTINGS.items() if cls.speed_only()}
# Rough single-machine costs for --dry-run, from the bench/ figures on a 2-core CPU.
# 2026-12-01 20:10, float32 (no native bf16), micro-batched fused kernels: the CPU config's 1,000 photos x 2 positions
# with attribution in 89.9 s; bench/sample.py (b) 32.6 images/s without attribution.
CPU_IMAGES_PER_S = {True: 11.0, False: 32.0}
# The same build: 300 draft icons x 128 steps in 360.8 s, float32 (a machine with native bf16 rendered 240-264 at 80 px).
CPU_ICON_STEPS_PER_S = 106.0


@dataclass
class BuildResult:
    run_dir: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


def load_config(path: str | Path | None) -> dict:
    """Defaults overlaid with a TOML config file, every value checked (:func:`check`).

    Unknown tables or keys are errors (typos must not pass silently), and so is a value of
    the wrong type or out of range: one line naming the setting, the value and the file.
    """
    config = copy.deepcopy(DEFAULTS)
    if path is None:
        return config
    path = Path(path)
    if not path.is_file():
        raise AtlasError(f"config file not found: {path}" if not path.exists() else f"config file {path} is not a file")
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise AtlasError(f"config file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                         "save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise AtlasError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise AtlasError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    return check(merge(config, data, source=str(path)), source=str(path))


def merge(config: dict, overrides: dict, source: str = "arguments") -> dict:
    """``config`` with ``overrides`` ({table: {key: value}}) applied; None values are ignored.

    Only names are checked here (unknown tables and keys); values are checked by :func:`check`,
    which ``load_config`` and ``build`` call, so every bad value fails before any work.
    """
    config = copy.deepcopy(config)
    for table, values in overrides.items():
        if table not in config:
            raise AtlasError(f"unknown table [{table}] in {source}; tables: {', '.join(config)}")
        if not isinstance(values, dict):
            raise AtlasError(f"[{table}] in {source} must be a table of settings; got {values!r}")
        for key, value in values.items():
            if key not in config[table]:
                raise AtlasError(f"unknown setting {table}.{key} in {source}; known: {', '.join(config[table])}")
            if value is not None:
                config[table][key] = value
    return config


def check(config: dict, source: str | None = None) -> dict:
    """``config`` with every value checked by its stage's settings class and normalised (e.g. ints of float settings
    become floats); the first bad value is one line naming the setting, the value and what is allowed."""
    try:
        resolved = resolve(config)
    except AtlasError as exc:
        if source is None:
            raise
        raise AtlasError(f"{exc} (in {source})") from None
    return {table: settings.as_table() for table, settings in resolved.items()}


def _key(settings: dict, upstream: str) -> str:
    return hashlib.sha256(json.dumps([upstream, settings], sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_keys(config: dict, image_digest: str, weights_sha: str) -> dict[str, str]:
    """The chain of stage keys: each depends on its own settings and on every stage before it."""
    keys, upstream = {}, f"{image_digest}:{weights_sha}:{','.join(config['run']['layers'])}"
    for stage in STAGES:
        settings = {k: v for k, v in config[stage].items() if k not in SPEED_ONLY.get(stage, set())}
        if stage == "sample" and not settings.get("aligned_positions"):
            settings.pop("aligned_positions", None)  # off (the default): the keys of runs recorded before the setting existed
        upstream = keys[stage] = _key(settings, upstream)
    # The unit lens reads only the sampled run; its gallery links to the atlas, so it follows both.
    unit_settings = {k: v for k, v in config["units"].items() if k not in SPEED_ONLY.get("units", set()) | {"build"}}
    keys["units"] = _key(unit_settings, keys["sample"])
    keys["gallery"] = _key({}, keys["tiles"] + keys["units"])
    return keys


def validate(config: dict):
    """Every check that can fail before work starts; returns (network, image list).

    First every setting (the settings classes, no imports of torch yet), then the devices,
    the folders, the model and its layers (each must be one the sampler can use), the images.
    """
    resolve(config)
    run = config["run"]
    if not run["images"]:
        raise AtlasError("give --images DIR (or images = ... in the config's [run] table)")
    if not run["out"]:
        raise AtlasError("give --out RUN_DIR (or out = ... in the config's [run] table)")
    check_out_folder(Path(run["out"]).expanduser())
    check_device(config["sample"]["device"])
    check_device(config["render"]["device"])
    make_engine(config["run"]["engine"], config["run"]["ray_address"])  # --engine ray without Ray: one line, before any work
    from atlas.data import check_image_source, class_table, list_images
    from atlas.models import load_model
    from atlas.sample import check_layers
    from atlas.viewer import require_viewer_assets

    require_viewer_assets()  # the tiles stage installs the viewer: a missing OpenSeadragon fails here, not after hours
    from atlas.layout.neighbors import check_backend

    check_backend(config["project"]["knn"])
    images_path = Path(run["images"]).expanduser()
    if not images_path.exists():
        raise AtlasError(f"images not found: {images_path}")
    check_image_source(images_path)  # a README or a JPEG given as the list: one line before the model loads
    net = load_model(config["sample"]["model"], config["sample"]["weights"], config["sample"]["device"])
    check_layers(net, run["layers"])
    images = list_images(images_path, class_table(net.weights), labels=run.get("labels")).head(config["sample"]["max_images"])
    out = Path(run["out"])
    if store.store_path(out).exists():
        meta = store.attrs(store.open_store(out))
        if meta.get("model") not in (None, net.name) or meta.get("weights_sha256") not in (None, net.weights_sha256):
            raise AtlasError(f"{out} holds a run of model {meta.get('model')} ({str(meta.get('weights_sha256'))[:12]}), "
                             f"not {net.name} ({net.weights_sha256[:12]}); use another --out")
    return net, images


def estimate(config: dict, n_images: int, channels: int = 512) -> dict[str, float]:
    """Seconds each stage may take on a 2-core CPU (order of magnitude, for --dry-run); ``channels`` per layer for the
    unit lens."""
    n = n_images * config["sample"]["per_image"]
    layers = len(config["run"]["layers"])
    preset = SETTINGS["render"].from_table(config["render"]).preset()
    cells = sum(min(s * s, n) * 0.6 for s in config["grid"]["sizes"])
    spent = icon_steps(preset["steps"], preset["attempts"], preset["screen"])
    icon_seconds = cells * spent * (preset["size"] / 80) ** 2 / CPU_ICON_STEPS_PER_S
    canvas = max(config["grid"]["sizes"]) * preset["size"]
    return {
        "sample": n_images * layers / CPU_IMAGES_PER_S[bool(config["sample"]["attribution"])],
        "project": layers * (3 + n / 3500.0),  # bench/layout.py: 16 s at 100k, 290 s at 1M
        "grid": layers * (2 + n / 50000.0),
        "render": layers * (icon_seconds if config["render"]["icons"] == "optimize" else cells * 0.05),
        "tiles": layers * (1 + canvas * canvas / 2e7),
        "units": layers * _unit_seconds(config["units"], n_images, channels),
        "gallery": layers * (1 + channels / 100.0),
    }


def _unit_seconds(s: dict, n_images: int, channels: int) -> float:
    """The unit lens: one forward per image, a backward per example and projection, the visualisations' steps."""
    images = sum(s["n_diverse"] if kind == "diverse" else 1 for kind in s["kinds"])
    steps = channels * images * s["steps"] * (s["size"] / 80) ** 2 / CPU_ICON_STEPS_PER_S
    return n_images / CPU_IMAGES_PER_S[False] + channels * s["top_k"] * len(s["projections"]) / 10.0 + steps


@store.writer
def build(config: dict, dry_run: bool = False, echo=print) -> BuildResult:
    """Run (or, with ``dry_run``, describe) every stage of the pipeline for the resolved ``config``.

    The stages sample -> project -> grid -> render -> tiles run in order, each for every layer of ``run.layers``.
    A stage whose key (its settings and everything upstream of it) matches what the store recorded for a finished
    run of it is skipped as up to date; the store's ledger owns that record, so an interrupted or changed build
    redoes only what no longer matches and says why.

    Parameters
    ----------
    config : dict
        ``{table: {setting: value}}`` with the tables ``run``, ``sample``, ``project``, ``grid``, ``render`` and
        ``tiles`` (as :func:`load_config` returns them; missing settings take their defaults). Each table's settings,
        defaults and ranges are those of :class:`atlas.settings.RunSettings`, ``SampleSettings``,
        ``ProjectSettings``, ``GridSettings``, ``RenderSettings`` and ``TilesSettings`` (docs/settings.md lists
        them). ``run.images`` and ``run.out`` are required.
    dry_run : bool, default False
        Only print the resolved settings, what images were found and each stage's estimated cost on a 2-core CPU;
        nothing is written.
    echo : callable, default print
        Receives each progress line (a stage starting or skipped, and why).

    Returns
    -------
    BuildResult
        ``run_dir``; ``ran`` and ``skipped`` (stage names); ``seconds`` per stage that ran; ``summary`` (total and
        stage seconds, and per layer the samples, kept cells and icons per grid size). With ``dry_run`` only
        ``run_dir`` is set.

    Raises
    ------
    AtlasError
        Before any work, for an unknown table or setting, a value out of range, no ``images`` or ``out``, a device
        this machine lacks, a missing OpenSeadragon, an unknown model or layer, images not found, or a run folder
        holding another run; during a stage, as that stage says.
    """
    config = check(config)  # every value checked and normalised before the stages (and torch) are imported
    net, images = validate(config)
    from atlas import grid, layout, render, sample
    from atlas import tiles as tiles_stage

    run, out = config["run"], Path(config["run"]["out"])
    settings = resolve(config)  # every stage's settings object, passed to its stage as it is
    keys = stage_keys(config, images.digest, net.weights_sha256)
    stages = [*STAGES, *UNIT_STAGES] if config["units"]["build"] else list(STAGES)
    shapes = net.layer_shapes() if config["units"]["build"] else {}
    channels = max((shapes[layer][0] for layer in run["layers"] if layer in shapes), default=512)
    costs = {stage: cost for stage, cost in estimate(config, len(images), channels).items() if stage in stages}
    if dry_run:
        echo(json.dumps(config, indent=2, default=str))
        echo(f"{images.summary} -> {out}")
        for stage in stages:
            echo(f"  {stage:8s} estimated {fmt_seconds(costs[stage])} on a 2-core CPU")
        echo(f"  total    estimated {fmt_seconds(sum(costs.values()))}")
        return BuildResult(out)

    echo(images.summary)  # what was found where, before any work
    # one writer per run folder, for the whole build; a finished run on a read-only folder is read, not locked
    store.take_lock(out, create=True, unless_current=lambda: all(store.stage_is_current(out, s, keys[s]) for s in stages))
    layers, sizes = run["layers"], list(config["grid"]["sizes"])
    run_on = make_engine(run["engine"], run["ray_address"])  # sample and render run their units here or on Ray

    def run_sample() -> None:  # one pass samples every layer
        sample.sample(images, layers, out, settings["sample"], net=net, engine=run_on)

    def run_project() -> None:
        for layer in layers:
            layout.project(out, layer, settings["project"], progress=True)

    def run_grid() -> None:
        for layer in layers:
            grid.grid(out, layer, settings["grid"])

    def run_render() -> None:
        for layer in layers:
            render.render(out, layer, list(sizes), settings["render"], net=net, engine=run_on)

    def run_tiles() -> None:
        for layer in layers:
            tiles_stage.make_tiles(out, layer, settings["tiles"], sizes=list(sizes))

    def run_units() -> None:
        from atlas import units

        units.units(out, layers, settings["units"], net=net, echo=None, gallery=False, engine=run_on)

    def run_gallery() -> None:
        from atlas import units

        for layer in layers:
            units.write_gallery(out, layer)

    work = {"sample": run_sample, "project": run_project, "grid": run_grid, "render": run_render, "tiles": run_tiles,
            "units": run_units, "gallery": run_gallery}
    steps = [Step(stage, keys[stage], work[stage], costs[stage], *_outputs(stage, layers, sizes)) for stage in stages]
    start = time.perf_counter()
    with run_on.session():  # on Ray: started once, at the first unit to compute, for every stage of the build
        report = run_stages(out, steps, echo)
    result = BuildResult(out, report.ran, report.skipped, report.seconds)
    result.summary = _summary(out, layers, time.perf_counter() - start, result)
    return result


def _outputs(stage: str, layers: list[str], sizes: list[int]) -> tuple[list[str], list[str]]:
    """(store nodes, files in the run folder) that a stage of the build writes for the whole-layer atlas."""
    full = store.FULL_ATLAS
    nodes = {
        "sample": ["images", *(f"samples/{layer}" for layer in layers)],
        "project": [f"layouts/{layer}/{full}" for layer in layers],
        "grid": [f"grids/{layer}/{full}/{s}" for layer in layers for s in sizes] + [f"whitening/{layer}" for layer in layers],
        "render": [f"icons/{layer}/{full}/{s}" for layer in layers for s in sizes],
        "units": [f"units/{layer}" for layer in layers],
    }.get(stage, [])
    files = [f"tiles/{layer}/{full}/atlas.json" for layer in layers] if stage == "tiles" else []
    return nodes, files


def _summary(out: Path, layers: list[str], seconds: float, result: BuildResult) -> dict:
    from atlas.info import info

    data = info(out)
    summary = {"seconds": round(seconds, 1), "stage_seconds": {k: round(v, 1) for k, v in result.seconds.items()},
               "ran": result.ran, "skipped": result.skipped, "layers": {}}
    for layer in layers:
        entry = data["layers"].get(layer, {})
        full = entry.get("atlases", {}).get(store.FULL_ATLAS, {})
        summary["layers"][layer] = {
            "samples": entry.get("samples", 0),
            "kept_cells": {size: g.get("n_render") for size, g in full.get("grids", {}).items()},
            "icons": {size: i.get("n_done") for size, i in full.get("icons", {}).items()},
        }
    return summary
