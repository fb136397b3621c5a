"""Settings of every stage: one frozen dataclass per stage, the single source of defaults, types and ranges.

Each class (``RunSettings``, ``SampleSettings``, ``ProjectSettings``, ``GridSettings``,
``RenderSettings``, ``TilesSettings``) checks every field in ``__post_init__`` and raises one
:class:`~atlas.errors.AtlasError` line naming the setting, the bad value and what is allowed,
e.g. ``render.quality must be one of draft, standard, paper; got 'ultra'``. ``atlas build``'s
``DEFAULTS`` and its config tables (``configs/*.toml``) and the command-line options' defaults
are these fields' defaults, and each stage function takes its settings object (``None``: the defaults;
single fields as keyword overrides, checked here by :meth:`StageSettings.merged`), so a default lives once.

Fields marked ``config=False`` (e.g. ``sample.shard_size``) belong to a stage command or function only:
they are not keys of a config table and not part of the stage keys ``atlas build`` records.
Fields marked ``speed=True`` change how fast a stage runs, not what it computes.

This module imports nothing heavy (no torch, no numpy) so that the command line can check
its options before loading anything; the choices below are the stages' own (tests check that
they agree with ``atlas.layout``, ``atlas.render`` and ``atlas.tiles``).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any, ClassVar

from atlas.errors import AtlasError

# Icon presets of the render stage: size (px), optimisation steps, attempts (best kept), icons optimised together, and
# the successive-halving trial (steps every attempt runs before only the most promising goes on; 0: all run to the end).
PRESETS: dict[str, dict[str, int]] = {
    "draft": {"size": 80, "steps": 128, "attempts": 1, "batch": 32, "screen": 0},
    # standard: 4 seeds screened for 64 steps, the best to 512: 704 icon-steps, the whitened cosine of the former 512 x 2
    # (1,024) on 286 real cells (docs/performance.md, icons per compute)
    "standard": {"size": 80, "steps": 512, "attempts": 4, "batch": 50, "screen": 64},
    "paper": {"size": 80, "steps": 1024, "attempts": 4, "batch": 100, "screen": 0},
}


def icon_steps(steps: int, attempts: int, screen: int = 0) -> int:
    """Optimisation steps spent per icon, every attempt counted: ``attempts * steps``, or with a screening trial of
    ``screen`` steps (several attempts) ``attempts * screen + steps - screen``."""
    return attempts * screen + steps - screen if screen and attempts > 1 else attempts * steps


PROJECT_METHODS = ("umap", "tsne", "pca")
# cosine/euclidean/l2 use atlas's own kNN search; the others go through umap-learn, openTSNE and scikit-learn,
# which all know them by these names.
PROJECT_METRICS = ("cosine", "euclidean", "l2", "manhattan", "correlation")
# What --model takes (atlas.models.load_model).
MODEL_HELP = ("inceptionv1, a torchvision classifier, timm:NAME (needs timm: the timm extra) "
              "or PACKAGE.MODULE:FACTORY (docs/models.md)")

# The model kernels of the passes that only read activations (atlas.models.inference).
FORWARDS = ("fused", "channels-last", "nchw")
KNN_BACKENDS = ("atlas", "faiss")
OUTSIDE = ("edge", "drop")
ICON_MODES = ("optimize", "examples")
TILE_FORMATS = ("jpg", "png", "webp")
GRID_MIN, GRID_MAX = 2, 2048
SEED_MAX = 2**32 - 1  # numpy's RandomState (umap-learn, openTSNE) takes seeds below 2**32
PORT_MAX = 65535
# The unit lens (atlas.units): projections back to pixels, and the kinds of per-unit visualisation.
PROJECTIONS = ("deconvnet", "guided", "gradient")
VIS_KINDS = ("fft", "pixel", "yosinski-1", "yosinski-2", "yosinski-3", "yosinski-4", "alpha", "diverse")
CHANNELS_PATTERN = re.compile(r"\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*")
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?|mps")
# The engines of the stages whose cost grows with images or cells (atlas.engine, docs/ray.md).
ENGINES = ("local", "ray")
RAY_ADDRESS_PATTERN = re.compile(r"auto|(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5}")


# ----------------------------------------------------------------------------- checks


def _shown(value: Any) -> str:
    return repr(str(value)) if isinstance(value, os.PathLike) else repr(value)


def _fail(name: str, what: str, value: Any, extra: str = "") -> None:
    raise AtlasError(f"{name} must be {what}; got {_shown(value)}{extra}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class Check:
    """One field's rule: ``what`` describes the allowed values, calling it returns the (normalised) value or fails."""

    what = "any value"
    type_name = "object"

    def __call__(self, name: str, value: Any) -> Any:
        return value


class Integer(Check):
    """An integer in ``lo..hi`` (either bound may be open); ``optional`` also allows None (unset)."""

    def __init__(self, lo: int | None = None, hi: int | None = None, optional: bool = False):
        self.lo, self.hi, self.optional = lo, hi, optional
        if lo is not None and hi is not None:
            self.what = f"an integer in {lo}..{hi}"
        elif lo is not None:
            self.what = f"an integer >= {lo}"
        elif hi is not None:
            self.what = f"an integer <= {hi}"
        else:
            self.what = "an integer"
        self.type_name = "int or None" if optional else "int"

    def __call__(self, name: str, value: Any) -> int | None:
        if value is None and self.optional:
            return None
        if not _is_int(value) or (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            _fail(name, self.what, value)
        return int(value)


class Number(Check):
    """A finite number in ``lo..hi`` (integers are accepted and stored as floats)."""

    def __init__(self, lo: float | None = None, hi: float | None = None):
        self.lo, self.hi = lo, hi
        self.what = (f"a number in {lo}..{hi}" if lo is not None and hi is not None else
                     f"a number >= {lo}" if lo is not None else "a finite number")
        self.type_name = "float"

    def __call__(self, name: str, value: Any) -> float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            _fail(name, self.what, value)
        return float(value)


class Choice(Check):
    """One of a fixed set of names."""

    def __init__(self, options: tuple[str, ...] | list[str]):
        self.options = tuple(options)
        self.what = f"one of {', '.join(self.options)}"
        self.type_name = "{" + ", ".join(f'"{o}"' for o in self.options) + "}"

    def __call__(self, name: str, value: Any) -> str:
        if not isinstance(value, str) or value not in self.options:
            _fail(name, self.what, value)
        return value


class Flag(Check):
    what = "true or false"
    type_name = "bool"

    def __call__(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            _fail(name, self.what, value)
        return value


class Text(Check):
    """Non-empty text (paths are accepted and stored as text); ``pattern`` restricts it further."""

    def __init__(self, optional: bool = False, pattern: re.Pattern | None = None, what: str = "a non-empty text"):
        self.optional, self.pattern, self.what = optional, pattern, what
        self.type_name = "str or None" if optional else "str"

    def __call__(self, name: str, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value.strip() or (self.pattern is not None and not self.pattern.fullmatch(value)):
            _fail(name, self.what, value)
        return value


class Device(Text):
    def __init__(self):
        super().__init__(pattern=DEVICE_PATTERN, what="cpu, cuda, cuda:N or mps")


class IntList(Check):
    """A non-empty list of integers in ``lo..hi``, stored as a tuple."""

    def __init__(self, lo: int, hi: int, noun: str):
        self.lo, self.hi, self.noun = lo, hi, noun
        self.what = f"a list of integers in {lo}..{hi}"
        self.type_name = "list of int"

    def __call__(self, name: str, value: Any) -> tuple[int, ...]:
        if not isinstance(value, (list, tuple)) or not value or not all(_is_int(v) for v in value):
            _fail(name, self.what, value)
        if any(v < self.lo for v in value):
            _fail(name, self.what, list(value), f" ({self.noun} must be at least {self.lo})")
        if any(v > self.hi for v in value):
            _fail(name, self.what, list(value), f" ({self.noun} must be at most {self.hi})")
        return tuple(int(v) for v in value)


class ChoiceList(Check):
    """A list of names from a fixed set (repeats dropped, order kept), stored as a tuple; ``empty`` allows none."""

    def __init__(self, options: tuple[str, ...], empty: bool = False):
        self.options, self.empty = tuple(options), empty
        self.what = f"a list of {', '.join(self.options)}" + (" (may be empty)" if empty else "")
        self.type_name = "list of str"

    def __call__(self, name: str, value: Any) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or (not value and not self.empty):
            _fail(name, self.what, value)
        bad = [v for v in value if not isinstance(v, str) or v not in self.options]
        if bad:
            _fail(name, self.what, list(value), f" ({bad[0]!r} is not one of them)")
        return tuple(dict.fromkeys(value))


class TextList(Check):
    """A list of names, stored as a tuple; ``empty`` also allows an empty list (meaning "the default set")."""

    def __init__(self, empty: bool = False):
        self.empty = empty
        self.what = "a list of names (may be empty)" if empty else "a non-empty list of names"
        self.type_name = "list of str"

    def __call__(self, name: str, value: Any) -> tuple[str, ...]:
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or (not value and not self.empty) \
                or not all(isinstance(v, str) and v.strip() for v in value):
            _fail(name, self.what, value)
        return tuple(value)


class NumberList(Check):
    """A non-empty list of finite numbers in ``lo..hi``, stored as a tuple of floats."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi
        self.what = f"a list of numbers in {lo}..{hi}"
        self.type_name = "list of float"

    def __call__(self, name: str, value: Any) -> tuple[float, ...]:
        ok = isinstance(value, (list, tuple)) and value and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and self.lo <= v <= self.hi for v in value)
        if not ok:
            _fail(name, self.what, list(value) if isinstance(value, tuple) else value)
        return tuple(float(v) for v in value)


def setting(default: Any, check: Check, doc: str, *, config: bool = True, speed: bool = False) -> Any:
    """A settings field: its default, its rule, one sentence saying what it does, and whether it is a config key."""
    return field(default=default, metadata={"check": check, "doc": doc, "config": config, "speed": speed})


def check_device(device: str) -> str:
    """``device`` if this machine has it; otherwise one line (``--device cuda`` without a GPU, ``cuda:3`` of two GPUs)."""
    Device()("device", device)
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise AtlasError(f"--device {device}: no CUDA GPU is available on this machine (torch sees none); use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise AtlasError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise AtlasError("--device mps: Apple's MPS backend is not available on this machine; use --device cpu")
    return device


def check_out_folder(path: str | os.PathLike, option: str = "--out") -> None:
    """A run (or output) folder must be a folder or not exist yet: a file there is one line, before anything is created.

    An object-storage URL (``s3://bucket/run``, also as ``pathlib`` leaves it: ``s3:/bucket/run``) is one line too:
    it would otherwise become a local folder named ``s3:`` (docs/ray.md, "Where the store can live").
    """
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", os.fspath(path)):
        raise AtlasError(f"{option} {os.fspath(path)} is a URL: atlas writes a run to a folder (local or a shared file system), "
                         "not to object storage; build into a folder and copy it to the bucket afterwards (docs/ray.md)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise AtlasError(f"{option} {os.fspath(path)} is a file, not a folder; give a folder")


def check_port(port: Any) -> int:
    """A TCP port for ``atlas serve`` (0 picks a free one)."""
    return Integer(0, PORT_MAX)("serve.port", port)


# ----------------------------------------------------------------------------- the settings classes


def _default_text(f: Field) -> str:
    value = f.default
    if value is MISSING or value is None:
        return "None"
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def _documented(cls):
    """Append a numpydoc "Parameters" section built from the fields (type, default, allowed values, meaning)."""
    lines = [cls.__doc__.rstrip(), "", "Parameters", "----------"]
    for f in fields(cls):
        check: Check = f.metadata["check"]
        note = "" if f.metadata["config"] else " Not a config key (the stage's command or function only)."
        lines += [f"{f.name} : {check.type_name}, default {_default_text(f)}",
                  f"    {f.metadata['doc']} Allowed: {check.what}.{note}"]
    cls.__doc__ = "\n".join(lines) + "\n"
    return cls


@dataclass(frozen=True)
class StageSettings:
    """Base of the per-stage settings: validates every field on construction."""

    TABLE: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = f.metadata["check"](f"{self.TABLE}.{f.name}", getattr(self, f.name))
            object.__setattr__(self, f.name, value)  # frozen: normalised once, here
        self._check_together()

    def _check_together(self) -> None:
        """Rules between fields (none by default)."""

    @classmethod
    def config_keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.metadata["config"]]

    @classmethod
    def speed_only(cls) -> set[str]:
        return {f.name for f in fields(cls) if f.metadata["speed"]}

    @classmethod
    def option_help(cls, name: str) -> str:
        """Command-line help of a field: what it does and what is allowed (the option shows its default itself)."""
        f = next(f for f in fields(cls) if f.name == name)
        check = f.metadata["check"]
        free = isinstance(check, Text) and not isinstance(check, Device)  # free text: nothing to list
        text = f.metadata["doc"] if free else f"{f.metadata['doc']} Allowed: {check.what}."
        # Typer renders help as rich markup, where "[ray]" would be a style tag and vanish: every bracket escaped
        return text.replace("[", "\\[")

    @classmethod
    def from_table(cls, table: dict) -> StageSettings:
        """Settings from a config table (unknown keys are errors; the caller names their source)."""
        unknown = [k for k in table if k not in cls.config_keys()]
        if unknown:
            raise AtlasError(f"unknown setting {cls.TABLE}.{unknown[0]}; known: {', '.join(cls.config_keys())}")
        return cls(**table)

    @classmethod
    def merged(cls, settings: StageSettings | None, options: dict) -> StageSettings:
        """``settings`` (default: the defaults) with single fields overridden by ``options`` (a library call's
        ``**options``), checked again; an unknown name is one line listing the known ones."""
        if settings is not None and not isinstance(settings, cls):
            # e.g. grid(run, layer, [20, 40]): the sizes where the settings object goes
            raise AtlasError(f"{cls.TABLE} settings must be a {cls.__name__} (or None for the defaults); got {_shown(settings)}")
        base = settings if settings is not None else cls()
        known = {f.name for f in fields(cls)}
        unknown = [k for k in options if k not in known]
        if unknown:
            raise AtlasError(f"unknown setting {cls.TABLE}.{unknown[0]}; known: {', '.join(sorted(known))}")
        return replace(base, **options) if options else base

    def as_table(self) -> dict:
        """The config keys as a plain dict (lists, not tuples: what TOML and json give back)."""
        return {name: list(v) if isinstance(v := getattr(self, name), tuple) else v for name in self.config_keys()}


@_documented
@dataclass(frozen=True)
class RunSettings(StageSettings):
    """Where a build reads its images and writes its run, and which layers it samples (``[run]`` table)."""

    TABLE: ClassVar[str] = "run"
    images: str | None = setting(None, Text(optional=True, what="a path"), "Image folder (ImageNet tree or flat) or list file.")
    labels: str | None = setting(None, Text(optional=True, what="a path"),
                                 "Labels file for the images ('name label' lines, one label per line, or LOC_val_solution.csv).")
    out: str | None = setting(None, Text(optional=True, what="a path"), "Run folder (atlas build's default: outputs/MODEL-LAYERS).")
    layers: tuple[str, ...] = setting(("mixed4c",), TextList(), "Layers to sample and lay out, each a convolutional layer of the model.")
    engine: str = setting("local", Choice(ENGINES), "Where sample, render and the unit lens's top-k pass run: local (this process) "
                          "or ray (a pool of Ray actors, one model each; pip install 'activation-atlas[ray]'; docs/ray.md).", speed=True)
    ray_address: str | None = setting(None, Text(optional=True, pattern=RAY_ADDRESS_PATTERN, what="auto, HOST:PORT or ray://HOST:PORT"),
                                      "Ray cluster of --engine ray: auto (the running one), HOST:PORT or ray://HOST:PORT "
                                      "(None: start Ray on this machine).", speed=True)


@_documented
@dataclass(frozen=True)
class SampleSettings(StageSettings):
    """Sampling activations (and class attributions) from images (``[sample]`` table, ``atlas sample``)."""

    TABLE: ClassVar[str] = "sample"
    model: str = setting("inceptionv1", Text(what="a model name"), MODEL_HELP + ".")
    weights: str | None = setting(None, Text(optional=True, what="a path"), "Weights file (None: the model's default weights).")
    max_images: int | None = setting(None, Integer(1, optional=True), "Use the first N images of the deterministic order (None: all).")
    per_image: int = setting(1, Integer(1), "Random spatial positions sampled per image and layer.")
    aligned_positions: bool = setting(False, Flag(), "Layers after the first take the positions corresponding to the first layer's "
                                      "(each mapped to its input-pixel centre, then the cell of the other layer holding it) "
                                      "instead of their own random ones (docs/experiments.md).")
    seed: int = setting(0, Integer(0, SEED_MAX), "Seed of the sampled positions.")
    batch_size: int = setting(32, Integer(1), "Images per forward pass.", speed=True)
    workers: int = setting(2, Integer(0), "DataLoader worker processes decoding images (0: in the main process).", speed=True)
    attribution: bool = setting(True, Flag(), "Also store each sample's attribution to every class (about half the speed).")
    dtype: str = setting("float16", Choice(("float16", "float32")), "Storage type of activations and attributions.")
    precision: str = setting("auto", Choice(("auto", "float32", "bfloat16")),
                             "Arithmetic of the forward pass without attribution (auto: bfloat16 where the CPU/GPU computes it "
                             "natively); recorded in the run, and every later pass over its photos uses it (docs/precision.md).")
    device: str = setting("cpu", Device(), "Where the model runs.", speed=True)
    forward: str = setting("fused", Choice(FORWARDS),
                           "The model's kernels: fused (channels-last memory, each convolution and its ReLU one oneDNN call), "
                           "channels-last, or nchw (the reference arithmetic); the same values to float rounding "
                           "(docs/sample.md).", speed=True)
    shard_size: int = setting(256, Integer(1), "Images per resumable unit of work.", config=False)


@_documented
@dataclass(frozen=True)
class ProjectSettings(StageSettings):
    """Laying out a layer's samples in 2-D (``[project]`` table, ``atlas project``)."""

    TABLE: ClassVar[str] = "project"
    method: str = setting("umap", Choice(PROJECT_METHODS), "Projection method.")
    n_neighbors: int = setting(50, Integer(2), "UMAP's neighbourhood size (the paper: 50).")
    min_dist: float = setting(0.05, Number(0.0, 1.0), "UMAP's minimum distance between laid-out points (at most its spread, 1).")
    metric: str = setting("cosine", Choice(PROJECT_METRICS), "Distance between activation vectors.")
    pca: int | None = setting(None, Integer(1, optional=True), "Reduce to this many dimensions with PCA first (None: no reduction).")
    seed: int = setting(0, Integer(0, SEED_MAX), "Seed of the layout (same seed, same layout).")
    outside: str = setting("edge", Choice(OUTSIDE),
                           "Points beyond the 1-99th percentile clip: kept at the edge, or dropped from the grids.")
    knn: str = setting("atlas", Choice(KNN_BACKENDS), "Nearest-neighbour search behind UMAP's and t-SNE's graph.")
    n_epochs: int | None = setting(None, Integer(1, optional=True), "UMAP's optimisation epochs (None: 500 up to 10,000 points, "
                                   "100 above).", config=False)
    perplexity: float = setting(30.0, Number(0.0), "t-SNE's perplexity (lowered to a third of the points for small sets).",
                                config=False)
    margin: float = setting(0.1, Number(0.0), "Widening of the 1-99th percentile clip box on each side, as a fraction of its "
                            "width.", config=False)

    def _check_together(self) -> None:
        if self.perplexity <= 0:
            raise AtlasError(f"project.perplexity must be a number > 0; got {self.perplexity!r}")


@_documented
@dataclass(frozen=True)
class GridSettings(StageSettings):
    """Averaging samples over square grids laid on the layout (``[grid]`` table, ``atlas grid``)."""

    TABLE: ClassVar[str] = "grid"
    sizes: tuple[int, ...] = setting((20, 40, 80, 160), IntList(GRID_MIN, GRID_MAX, "grid sizes"), "Grid sizes (cells per side).")
    min_count: int = setting(5, Integer(1), "Cells with fewer samples are stored but get no icon (Lucid's recipe: 5).")
    n_nearest: int = setting(8, Integer(0), "Sample rows kept per cell, nearest its mean.", config=False)


@_documented
@dataclass(frozen=True)
class RenderSettings(StageSettings):
    """Rendering one icon per kept grid cell (``[render]`` table, ``atlas render``).

    ``steps``, ``size``, ``attempts`` and ``batch`` override the ``quality`` preset when set.
    """

    TABLE: ClassVar[str] = "render"
    quality: str = setting("standard", Choice(tuple(PRESETS)), "Icon preset (docs/render.md).")
    steps: int | None = setting(None, Integer(1, optional=True), "Optimisation steps per icon (None: the preset's).")
    size: int | None = setting(None, Integer(8, 1024, optional=True), "Icon size in pixels (None: the preset's).")
    attempts: int | None = setting(None, Integer(1, optional=True), "Seeds per icon, the best kept (None: the preset's).")
    screen: int | None = setting(None, Integer(0, optional=True),
                                 "Successive halving: every seed runs this many steps, then only each icon's most promising "
                                 "one goes on (0: all run to the end; None: the preset's, dropped when not shorter than steps).")
    batch: int | None = setting(None, Integer(1, optional=True), "Icons optimised together (None: the preset's).", speed=True)
    p: float = setting(2.0, Number(0.0), "Cosine power of the objective dot * cos^p.")
    icons: str = setting("optimize", Choice(ICON_MODES), "optimize (feature inversion) or examples (dataset patches).")
    device: str = setting("cpu", Device(), "Where the optimisation runs.", speed=True)
    seed: int = setting(0, Integer(0, SEED_MAX), "Seed of the icons' starting images.")
    whiten: bool = setting(True, Flag(), "Align icons with S v, S the run's whitening matrix (False: with v itself).",
                           config=False)

    def preset(self) -> dict[str, int]:
        """size, steps, attempts, batch and screen after the overrides (the preset's screen only where it is shorter than
        the steps)."""
        base = PRESETS[self.quality]
        out = {k: getattr(self, k) if getattr(self, k) is not None else base[k] for k in ("size", "steps", "attempts", "batch")}
        out["screen"] = self.screen if self.screen is not None else (base["screen"] if base["screen"] < out["steps"] else 0)
        return out

    def _check_together(self) -> None:
        steps = self.steps if self.steps is not None else PRESETS[self.quality]["steps"]
        if self.screen and self.screen >= steps:
            raise AtlasError(f"render.screen must be less than render.steps ({steps}); got {self.screen}")


@_documented
@dataclass(frozen=True)
class TilesSettings(StageSettings):
    """Writing the deep-zoom tiles and the viewer (``[tiles]`` table, ``atlas tiles``)."""

    TABLE: ClassVar[str] = "tiles"
    format: str = setting("jpg", Choice(TILE_FORMATS), "Tile image format.")
    density_scale: bool = setting(False, Flag(), "Shrink icons of sparse cells, min(1, sqrt(n / mean n)).")
    examples: bool = setting(True, Flag(), "Write dataset-example patches per cell (needs the images).")
    icon_size: int | None = setting(None, Integer(1, 1024, optional=True), "Redraw icons at this many pixels (None: as rendered).",
                                    config=False)
    tile_size: int = setting(254, Integer(16, 4096), "Deep-zoom tile size in pixels.", config=False)
    overlap: int = setting(1, Integer(0, 64), "Deep-zoom tile overlap in pixels.", config=False)

    def _check_together(self) -> None:
        if 2 * self.overlap >= self.tile_size:
            raise AtlasError(f"tiles.overlap must be less than half of tiles.tile_size ({self.tile_size}); got {self.overlap}")


@_documented
@dataclass(frozen=True)
class ClassSettings(StageSettings):
    """Class-filtered and class-difference atlases: the samples that matter for one class, or for two against each other,
    laid out, gridded, rendered and tiled (``[classes]`` table, ``atlas class``, ``atlas compare``; docs/classes.md)."""

    TABLE: ClassVar[str] = "classes"
    top_k: int = setting(2000, Integer(0), "Samples of highest positive attribution added to the class's winners; scaled to the run "
                         "(at most 4 per own sample of the class, at least 50).")
    method: str = setting("tsne", Choice(PROJECT_METHODS), "Layout of a class atlas (a difference atlas is always its own "
                          "x = attribution difference, y = 1-D t-SNE).")
    sizes: tuple[int, ...] = setting((8,), IntList(1, GRID_MAX, "grid sizes"),
                                     "Grid sizes; every cell with a sample gets an icon (a class selection is small).")
    quality: str = setting("draft", Choice(tuple(PRESETS)), "Icon preset when no render settings are given (docs/render.md).")
    seed: int = setting(0, Integer(0, SEED_MAX), "Seed of the layout (the icons keep the render stage's own seed).")
    tiles: bool = setting(True, Flag(), "Also write the tiles and the viewer.")


def parse_channels(spec: str | None, n_channels: int, layer: str = "") -> list[int]:
    """Channel indices of a spec such as ``"0-63"`` or ``"0-9,100,200-210"`` (inclusive ranges; None: all), each checked
    against the layer's ``n_channels``: one line for a range out of bounds or reversed."""
    if spec is None:
        return list(range(n_channels))
    Text(pattern=CHANNELS_PATTERN, what="channel ranges such as 0-63 or 0-9,100")("units.channels", spec)
    chosen: list[int] = []
    where = f" of layer '{layer}'" if layer else ""
    for part in spec.split(","):
        lo, _, hi = (x.strip() for x in part.partition("-"))
        a, b = int(lo), int(hi or lo)
        if a > b:
            raise AtlasError(f"channel range {a}-{b} is reversed; write {b}-{a}")
        if b >= n_channels:
            raise AtlasError(f"channel {b} is out of range{where}: it has {n_channels} channels (0-{n_channels - 1})")
        chosen.extend(range(a, b + 1))
    return sorted(set(chosen))


@_documented
@dataclass(frozen=True)
class UnitsSettings(StageSettings):
    """The unit lens: per-channel top-k dataset examples, their projections to pixels and regularised visualisations
    (``[units]`` table, ``atlas units``; docs/units.md)."""

    TABLE: ClassVar[str] = "units"
    build: bool = setting(False, Flag(), "atlas build also runs the unit lens on the run's layers (after tiles).")
    top_k: int = setting(9, Integer(1, 100), "Dataset examples kept per channel (Zeiler & Fergus: 9).")
    channels: str | None = setting(None, Text(optional=True, pattern=CHANNELS_PATTERN, what="channel ranges such as 0-63 or 0-9,100"),
                                   "Channels to compute, e.g. 0-63 or 0-9,100 (None: all).")
    patch: int = setting(64, Integer(16, 512), "Side in pixels of the stored example patches and projections.")
    projections: tuple[str, ...] = setting(("auto",), ChoiceList(("auto", *PROJECTIONS), empty=True),
                                           "Projections of each example back to pixels (auto: the deconvnet on a ReLU "
                                           "network, the gradient on any other, e.g. a ViT).")
    kinds: tuple[str, ...] = setting(("fft", "yosinski-1", "yosinski-2", "yosinski-3", "yosinski-4", "alpha", "diverse"),
                                     ChoiceList(VIS_KINDS, empty=True), "Feature visualisations per channel (docs/units.md).")
    objective: str = setting("channel", Choice(("channel", "neuron")),
                             "What a visualisation maximises: the channel's mean activation, or its activation at the centre.")
    n_diverse: int = setting(4, Integer(2, 16), "Images of the diverse set per channel.")
    size: int = setting(80, Integer(16, 512), "Visualisation side in pixels.")
    steps: int = setting(256, Integer(1), "Optimisation steps per visualisation.")
    seed: int = setting(0, Integer(0, SEED_MAX), "Seed of the visualisations' starting images.")
    batch: int = setting(16, Integer(1), "Channels optimised together.", speed=True)
    batch_size: int = setting(32, Integer(1), "Images per forward pass of the top-k pass.", speed=True)
    workers: int = setting(2, Integer(0), "DataLoader worker processes decoding images (0: in the main process).", speed=True)
    device: str = setting("cpu", Device(), "Where the model runs.", speed=True)


@_documented
@dataclass(frozen=True)
class InspectSettings(StageSettings):
    """One image under the microscope: prediction, every layer's channel maps, occlusion, invariance, correspondence
    and the image's place on the run's atlas (``[inspect]`` table, ``atlas inspect``; docs/inspect.md)."""

    TABLE: ClassVar[str] = "inspect"
    layers: tuple[str, ...] = setting((), TextList(empty=True),
                                      "Layers whose channel maps are shown (empty: every layer with spatial positions).")
    layer: str | None = setting(None, Text(optional=True, what="a layer name"),
                                "The atlas layer: its strongest feature map is occluded and its activations placed on the atlas "
                                "(None: the run's first layer, else mixed4c).")
    top: int = setting(5, Integer(1, 20), "Classes listed per image.")
    label: str | None = setting(None, Text(optional=True, what="a class name, synset or index"),
                                "The true class of the images (None: the run's label of an image it sampled, else the top-1 class).")
    occlusion: bool = setting(True, Flag(), "Compute the occlusion maps (Zeiler & Fergus, Fig. 7).")
    occluder: int = setting(32, Integer(2, 512), "Side in pixels of the grey occluding square.")
    stride: int = setting(8, Integer(1, 512), "Step in pixels between occluder positions.")
    invariance: bool = setting(True, Flag(), "Compute the invariance curves (Zeiler & Fergus, Fig. 5).")
    shifts: tuple[int, ...] = setting(tuple(range(-60, 61, 10)), IntList(-1000, 1000, "shifts"), "Vertical translations in pixels.")
    scales: tuple[float, ...] = setting((0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4), NumberList(0.05, 20.0), "Scale factors.")
    angles: tuple[int, ...] = setting(tuple(range(0, 360, 15)), IntList(-360, 360, "angles"), "Rotations in degrees.")
    low_layer: str | None = setting(None, Text(optional=True, what="a layer name"),
                                    "Low layer of the invariance distances (None: the model's first convolution; the paper's layer 1).")
    high_layer: str | None = setting(None, Text(optional=True, what="a layer name"),
                                     "High layer of the invariance distances (None: the model's last spatial layer; the paper's layer 7).")
    boxes: str | None = setting(None, Text(optional=True, what="a path"),
                                "JSON file of boxes to occlude per image for the correspondence analysis (docs/inspect.md).")
    n_random: int = setting(10, Integer(1, 1000), "Random-box trials the correspondence measure is compared with.")
    neighbors: int = setting(8, Integer(1, 256), "Sampled activations whose layout positions place each of the image's positions.")
    atlas: str = setting("full", Text(what="an atlas name"), "Which of the run's atlases the image is placed on.")
    seed: int = setting(0, Integer(0, SEED_MAX), "Seed of the random boxes.")
    batch_size: int = setting(32, Integer(1), "Images per forward pass (occluder positions, transformed images).", speed=True)
    device: str = setting("cpu", Device(), "Where the model runs.", speed=True)


@_documented
@dataclass(frozen=True)
class WeightsSettings(StageSettings):
    """Filter sheets: a convolution's weights as images (``[weights]`` table, ``atlas weights``; docs/weights.md)."""

    TABLE: ClassVar[str] = "weights"
    layer: str | None = setting(None, Text(optional=True, what="a layer name"), "Convolution to draw (None: the model's first).")
    channels: str | None = setting(None, Text(optional=True, pattern=CHANNELS_PATTERN, what="channel ranges such as 0-63 or 0-9,100"),
                                   "Output channels (filters) to draw, e.g. 0-63 (None: all).")
    scale: int = setting(8, Integer(1, 64), "Pixels per weight on the sheet.")
    normalize: str = setting("each", Choice(("each", "all")), "Scale each filter to its own range, or all filters to one range.")


@_documented
@dataclass(frozen=True)
class ReconstructSettings(StageSettings):
    """The reconstructed equivalent model of one input: fixed ReLU masks, pooling switches and LRN gains make the
    network affine in its input (``[reconstruct]`` table, ``atlas reconstruct``; docs/weights.md)."""

    TABLE: ClassVar[str] = "reconstruct"
    UNIT_PATTERN: ClassVar[re.Pattern] = re.compile(r"\s*[^:\s]+\s*:\s*\d+\s*")
    top: int = setting(5, Integer(1, 20), "Classes whose input-space templates are drawn.")
    unit: str | None = setting(None, Text(optional=True, pattern=UNIT_PATTERN, what="LAYER:CHANNEL, e.g. mixed4c:447"),
                               "A hidden unit whose effective input filter is drawn.")
    dtype: str = setting("float32", Choice(("float32", "float64")), "Arithmetic of the reconstruction.")
    check_columns: int = setting(16, Integer(0, 4096), "Columns of W_x computed by forward mode (JVPs) to check the reverse-mode rows "
                                 "drawn, per image (0: no check).")
    batch: int = setting(64, Integer(1), "Basis vectors per batched forward-mode product.", speed=True)
    device: str = setting("cpu", Device(), "Where the model runs.", speed=True)


@_documented
@dataclass(frozen=True)
class EvolutionSettings(StageSettings):
    """Features over training (Zeiler & Fergus, Fig. 4): each unit's strongest image patch and projection at every
    checkpoint (``[evolution]`` table, ``atlas evolution``; docs/weights.md)."""

    TABLE: ClassVar[str] = "evolution"
    layer: str | None = setting(None, Text(optional=True, what="a layer name"), "Layer whose units are followed, e.g. conv2d2 (required).")
    channels: str | None = setting("0-7", Text(optional=True, pattern=CHANNELS_PATTERN, what="channel ranges such as 0-7 or 0-3,100"),
                                   "Units (channels) to follow (None: all).")
    patch: int = setting(64, Integer(16, 512), "Side in pixels of each patch and projection.")
    projection: str = setting("deconvnet", Choice(PROJECTIONS), "How each unit's strongest activation is projected to pixels.")
    max_images: int | None = setting(None, Integer(1, optional=True), "Images of the set searched (None: all).")
    batch_size: int = setting(32, Integer(1), "Images per forward pass.", speed=True)
    workers: int = setting(2, Integer(0), "DataLoader worker processes decoding images (0: in the main process).", speed=True)
    device: str = setting("cpu", Device(), "Where the model runs.", speed=True)


# Where atlas patch pastes a patch (atlas.patches.core takes them from here): five named places, "corners" (all four)
# and "random" (n_random seeded places per image and size).
PATCH_POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "centre", "corners", "random")
PATCH_KINDS = ("icon", "example")


@_documented
@dataclass(frozen=True)
class PatchSettings(StageSettings):
    """Adversarial patches: a picture or an atlas cell pasted into photos at several sizes and places (``[patch]`` table,
    ``atlas patch``, ``atlas patch-search``; docs/experiments.md)."""

    TABLE: ClassVar[str] = "patch"
    sizes: tuple[int, ...] = setting((48, 80, 112), IntList(4, 224, "patch sizes"), "Patch sides in pixels of the 224 px input.")
    positions: tuple[str, ...] = setting(("corners", "centre", "random"), ChoiceList(PATCH_POSITIONS), "Where the patch goes.")
    n_random: int = setting(2, Integer(0, 100), "Random places per image and size (with position random).")
    seed: int = setting(0, Integer(0, SEED_MAX), "Seed of the random places and of the crops and flips.")
    augment: int = setting(0, Integer(0, 64), "Seeded crops and flips added per photo (widens a set of one photo per class).")
    top: int = setting(8, Integer(1, 1000), "Cells of a class-difference atlas tried by patch-search.")
    kinds: tuple[str, ...] = setting(PATCH_KINDS, ChoiceList(PATCH_KINDS), "What of a cell is pasted: its icon, its best dataset patch.")
    figure: int = setting(6, Integer(0, 32), "Strongest examples drawn in the figure.")
    batch_size: int = setting(32, Integer(1), "Images per forward pass.", speed=True)
    device: str = setting("cpu", Device(), "Where the model runs.", speed=True)


@_documented
@dataclass(frozen=True)
class LayersSettings(StageSettings):
    """Layers side by side and aligned layouts: one run's layers shown together with one class highlighted, a class atlas
    per layer, and AlignedUMAP layouts of consecutive layers (``[layers]`` table, ``atlas side-by-side``, ``atlas class-layers``,
    ``atlas align``; docs/experiments.md)."""

    TABLE: ClassVar[str] = "layers"
    atlas: str = setting("full", Text(what="an atlas name"), "The atlas of every layer shown side by side (full, aligned, class-...).")
    highlight: str | None = setting(None, Text(optional=True, what="a class name, synset or index"),
                                    "Class whose attribution shades every layer side by side (None: no highlight).")
    aligned_atlas: str = setting("aligned", Text(what="an atlas name"), "Name of the aligned layouts (atlas align).")
    n_neighbors: int = setting(15, Integer(2), "AlignedUMAP's neighbourhood size, the same for every layer.")
    min_dist: float = setting(0.1, Number(0.0, 1.0), "AlignedUMAP's minimum distance between laid-out points.")
    alignment: float = setting(1.0, Number(0.0), "AlignedUMAP's alignment_regularisation: how strongly corresponding samples are "
                               "pulled together (umap-learn's default 0.01 barely ties sparse samples).")
    tolerance: float = setting(1.0, Number(0.0), "Cells of the coarser layer two samples' input-pixel centres may be apart to "
                               "correspond (more than 0).")
    n_epochs: int | None = setting(None, Integer(1, optional=True), "AlignedUMAP's optimisation epochs (None: umap-learn's choice).")
    seed: int = setting(0, Integer(0, SEED_MAX), "Seed of the aligned layouts and of the class atlases' layouts.")
    top_k: int = setting(2000, Integer(1), "Class atlases per layer: samples with the highest positive attribution added to the winners.")
    method: str = setting("tsne", Choice(PROJECT_METHODS), "Class atlases per layer: projection method.")
    sizes: tuple[int, ...] = setting((8,), IntList(GRID_MIN, GRID_MAX, "grid sizes"), "Class atlases per layer: grid sizes.")
    quality: str = setting("draft", Choice(tuple(PRESETS)), "Class atlases per layer: icon preset (docs/render.md).")

    def _check_together(self) -> None:
        if self.tolerance <= 0:
            raise AtlasError(f"layers.tolerance must be a number > 0; got {self.tolerance!r}")


CONCEPT_METHODS = ("topk-sae", "nmf")  # atlas.concepts.dictionary.METHODS (a test checks they agree)


@_documented
@dataclass(frozen=True)
class ConceptsSettings(StageSettings):
    """Concepts on the map: a sparse dictionary of a layer's sampled activations, each concept drawn, its top dataset
    patches, classes and place on the atlas (``[concepts]`` table, ``atlas concepts``; docs/concepts.md)."""

    TABLE: ClassVar[str] = "concepts"
    concepts: int = setting(256, Integer(2, 65536), "Concepts in the dictionary (at most the number of sampled rows).")
    method: str = setting("topk-sae", Choice(CONCEPT_METHODS),
                          "How the dictionary is learnt: a TopK sparse autoencoder, or NMF (non-negative activations only).")
    sparsity: int = setting(8, Integer(1), "topk-sae: concepts active per sample (k); nmf ignores it.")
    epochs: int = setting(20, Integer(1), "topk-sae: passes over the sampled rows.")
    max_iter: int = setting(200, Integer(1), "nmf: coordinate-descent iterations at most.")
    seed: int = setting(0, Integer(0, SEED_MAX), "Seed of the fit and of the icons' starting images.")
    top_k: int = setting(9, Integer(1, 100), "Dataset patches kept per concept (distinct images, by code).")
    patch: int = setting(64, Integer(16, 512), "Side in pixels of the stored patches.")
    icons: bool = setting(True, Flag(), "Render an icon (feature visualisation) of every concept's direction.")
    quality: str = setting("draft", Choice(tuple(PRESETS)), "Icon preset (docs/render.md): size, steps and attempts.")
    steps: int | None = setting(None, Integer(1, optional=True), "Icon optimisation steps (None: the preset's).")
    device: str = setting("cpu", Device(), "Where the fit and the icons run.", speed=True)

    def _check_together(self) -> None:
        if self.method == "topk-sae" and self.sparsity > self.concepts:
            raise AtlasError(f"concepts.sparsity must be at most concepts.concepts ({self.concepts}); got {self.sparsity}")


STAGES: dict[str, type[StageSettings]] = {"run": RunSettings, "sample": SampleSettings, "project": ProjectSettings,
                                          "grid": GridSettings, "render": RenderSettings, "tiles": TilesSettings,
                                          "units": UnitsSettings, "inspect": InspectSettings, "weights": WeightsSettings,
                                          "reconstruct": ReconstructSettings, "evolution": EvolutionSettings,
                                          "patch": PatchSettings, "classes": ClassSettings,
                                          "layers": LayersSettings, "concepts": ConceptsSettings}


def defaults() -> dict[str, dict]:
    """Every config table with its defaults: ``{table: {key: value}}``."""
    return {table: cls().as_table() for table, cls in STAGES.items()}


def resolve(config: dict) -> dict[str, StageSettings]:
    """The settings object of every table of ``config`` (a ``{table: {key: value}}`` dict); the first bad value fails."""
    unknown = [t for t in config if t not in STAGES]
    if unknown:
        raise AtlasError(f"unknown table [{unknown[0]}]; tables: {', '.join(STAGES)}")
    out = {}
    for table, cls in STAGES.items():
        values = config.get(table, {})
        if not isinstance(values, dict):
            raise AtlasError(f"[{table}] must be a table of settings; got {_shown(values)}")
        out[table] = cls.from_table(values)
    return out


def reference() -> str:
    """Every setting as Markdown tables, one per stage (docs/settings.md is this text; a test keeps them equal)."""
    lines = []
    for table, cls in STAGES.items():
        lines += [f"### `[{table}]` ({cls.__name__})", "", cls.__doc__.split("\n")[0].replace("``", "`"), "",
                  "| setting | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for f in fields(cls):
            check: Check = f.metadata["check"]
            name = f"`{f.name}`" + ("" if f.metadata["config"] else " (not a config key)")
            allowed = "any" if isinstance(check, Text) and not isinstance(check, Device) else check.what
            lines.append(f"| {name} | {check.type_name.replace('|', '/')} | {_default_text(f)} | {allowed} | {f.metadata['doc']} |")
        lines.append("")
    return "\n".join(lines)
