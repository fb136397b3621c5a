"""atlas: Activation Atlases for PyTorch vision models.

The names a notebook needs, all loaded on first use (``import atlas`` itself imports neither torch nor zarr)::

    run = atlas.build("photos/", "runs/demo", max_images=200, grids=[10, 20], quality="draft")
    run = atlas.open_run("runs/demo")     # a finished or partial run: atlas.Run
    run.sheet("mixed4c", 20)              # the icons as one PIL image; run.show() is the zoomable viewer

- ``build``, ``open_run``, ``Run``: a whole atlas in one call, and the object that reads a run folder;
- ``sample``, ``project``, ``grid``, ``render``, ``tiles``: the pipeline's stages, one call each;
- ``class_atlas``, ``compare_atlas``: class-filtered and class-difference atlases of a run;
- ``units``, ``inspect``, ``weights``: the unit lens, one photo under the microscope, weights you can look at;
- ``load_model``, ``visualize``: a model by name, and feature visualisation of any direction, channel or objective;
- ``AtlasError``: every error a user can fix, with a one-line message.

``atlas.build``, ``atlas.sample``, ``atlas.grid``, ``atlas.render``, ``atlas.tiles``, ``atlas.units`` and
``atlas.inspect`` are also the modules that implement them (``atlas.render.objectives``, ``atlas.build.load_config``);
calling one runs its entry function (``atlas.render(...)`` is ``atlas.render.render(...)``, ``atlas.tiles(...)`` is
``atlas.tiles.make_tiles(...)``, ``atlas.build(...)`` is :func:`atlas.run.build_run`). Everything else lives in its
module: ``atlas.store``, ``atlas.settings``, ``atlas.models``, ``atlas.render.objectives``, ...
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# The face: name -> (module, attribute). Loaded by __getattr__ on first use, so `import atlas` stays cheap.
_NAMES: dict[str, tuple[str, str]] = {
    "AtlasError": ("atlas.errors", "AtlasError"),
    "Run": ("atlas.run", "Run"),
    "open_run": ("atlas.run", "open_run"),
    "load_model": ("atlas.models", "load_model"),
    "visualize": ("atlas.render", "visualize"),
    "project": ("atlas.layout", "project"),
    "class_atlas": ("atlas.classes", "class_atlas"),
    "compare_atlas": ("atlas.classes", "compare_atlas"),
}
# Instruments that are modules the rest of the package imports as modules (``from atlas import render``), so the
# attribute must stay the module; calling the module runs its entry function: module -> (module, attribute).
_CALLABLE: dict[str, tuple[str, str]] = {
    "build": ("atlas.run", "build_run"),
    "sample": ("atlas.sample", "sample"),
    "grid": ("atlas.grid", "grid"),
    "render": ("atlas.render", "render"),
    "tiles": ("atlas.tiles", "make_tiles"),
    "units": ("atlas.units", "units"),
    "inspect": ("atlas.inspect", "inspect"),
}
# Modules of the face that are not called themselves (their functions are the instrument).
_MODULES = ("weights",)

__all__ = ["AtlasError", "Run", "__version__", "build", "class_atlas", "compare_atlas", "grid", "inspect", "load_model", "open_run",
           "project", "render", "sample", "tiles", "units", "visualize", "weights"]


def _entry(module: str):
    """The function a callable instrument module runs."""
    where, name = _CALLABLE[module.rpartition(".")[2]]
    return getattr(importlib.import_module(where), name)


class _Instrument(types.ModuleType):
    """An instrument's module that can be called: ``atlas.render(...)`` runs ``atlas.render.render(...)``."""

    def __call__(self, *args, **kwargs):
        return _entry(self.__name__)(*args, **kwargs)

    @property
    def __signature__(self):  # what help(), IPython's `atlas.render?` and inspect.signature show: the entry function's
        import inspect

        return inspect.signature(_entry(self.__name__))


class _Package(types.ModuleType):
    """The ``atlas`` package: binding an instrument's submodule on it (which the import system does when the submodule
    is first imported, however it is imported) makes that module callable, so ``atlas.render(...)`` works whatever
    imported ``atlas.render`` first."""

    def __setattr__(self, name: str, value) -> None:
        if name in _CALLABLE and type(value) is types.ModuleType and value.__name__ == f"{__name__}.{name}":
            value.__class__ = _Instrument
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    """The face's names, imported on first use (PEP 562)."""
    if name in _NAMES:
        where, attr = _NAMES[name]
        value = getattr(importlib.import_module(where), attr)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _CALLABLE or name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")  # binds itself on the package (and becomes callable)
    raise AttributeError(f"module 'atlas' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
