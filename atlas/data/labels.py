"""Classes and labels: a label is a class index, a synset or any synonym of a class name; the class table is the
weights' synset_words.txt.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

from atlas.data.paths import INTEGER, SYNSET_ONLY
from atlas.errors import AtlasError


def _normal(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


class _BadLabel(Exception):
    """A field that is a label but not a valid one; the caller adds where it was."""


class Classes:
    """The model's classes as labels can name them: index, synset or any synonym."""

    def __init__(self, classes: Sequence[str | tuple[str, str | Sequence[str]]] = ()):
        self.synsets: dict[str, int] = {}
        self.shown: list[str] = []  # first name (or synset) of each class, for messages
        # Two tiers: a class's first name wins over another class's synonym ("partridge" is n01807496, not the
        # ruffed grouse that also lists it); a name two classes share in the same tier ("crane") is ambiguous.
        tiers: list[dict[str, list[int]]] = [{}, {}]
        for i, entry in enumerate(classes):
            synset, names = (entry, ()) if isinstance(entry, str) else entry
            if isinstance(names, str):
                names = names.split(",")
            names = [n.strip() for n in names if n.strip()]
            self.synsets.setdefault(synset, i)
            self.shown.append(names[0] if names else synset)
            for tier, name in {(0 if k == 0 else 1, _normal(n)) for k, n in enumerate(names)}:
                if i not in tiers[tier].setdefault(name, []):
                    tiers[tier][name].append(i)
        self.names: dict[str, int] = {}
        self.ambiguous: dict[str, list[int]] = {}
        for tier in reversed(tiers):  # the first-name tier last, so that it overrides
            for name, indices in tier.items():
                self.names.pop(name, None)
                self.ambiguous.pop(name, None)
                if len(indices) == 1:
                    self.names[name] = indices[0]
                else:
                    self.ambiguous[name] = indices
        self.n = len(self.shown)

    def __bool__(self) -> bool:
        return self.n > 0

    def parse(self, text: str) -> int | None:
        """The class index ``text`` names, None when it is not a label at all; raises _BadLabel for an invalid one."""
        text = text.strip()
        if INTEGER.fullmatch(text):
            index = int(text)
            if index < -1 or (self.n and index >= self.n):
                raise _BadLabel(f"class index {index} is out of range (0-{self.n - 1}, or -1 for unknown)" if self.n
                                else f"class index {index} is negative")
            return index
        if SYNSET_ONLY.fullmatch(text):
            if text in self.synsets:
                return self.synsets[text]
            if not self.n:
                raise _BadLabel(f"synset {text} cannot be mapped: no class list (synset_words.txt) was found for the model")
            raise _BadLabel(f"synset {text} is not one of the model's {self.n} classes")
        name = _normal(text)
        if name in self.names:
            return self.names[name]
        if name in self.ambiguous:
            choices = ", ".join(f"{self.shown[i]} = {self._synset(i)}" for i in self.ambiguous[name])
            raise _BadLabel(f"class name '{text}' names several classes ({choices}); give the synset or index")
        return None

    def label(self, text: str, where: str) -> int:
        """The class index ``text`` names, or a one-line AtlasError starting with ``where`` (e.g. "list file F line 3")."""
        try:
            parsed = self.parse(text)
        except _BadLabel as exc:
            raise AtlasError(f"{where}: {exc}") from None
        if parsed is None:
            raise AtlasError(f"{where}: {self.unknown(text)}")
        return parsed

    def unknown(self, text: str) -> str:
        """A one-line explanation of why ``text`` is not a label, with the closest class names."""
        if not self.n:
            return f"unknown label '{text}' (labels are 0-based class indices here: no class list was found for the model)"
        close = difflib.get_close_matches(_normal(text), list(self.names) + list(self.ambiguous), n=3, cutoff=0.6)
        hint = f"closest classes: {', '.join(close)}" if close else f"e.g. 0, {self._synset(0)} or '{self.shown[0]}'"
        return f"unknown label '{text}'; labels are class indices 0-{self.n - 1}, synsets or class names; {hint}"

    def _synset(self, index: int) -> str:
        for synset, i in self.synsets.items():
            if i == index:
                return synset
        return str(index)


def class_table(weights: str | Path | None = None) -> list[tuple[str, list[str]]]:
    """(synset, every synonym) per class of the ImageNet models, from synset_words.txt (empty when none is found).

    ``atlas.models.synset_words`` keeps only each class's first name; labels may use any synonym, so
    the full lines are read again from the same file when it can be found.
    """
    from atlas import models

    pairs = models.synset_words(weights)
    if not pairs:
        return []
    # The places synset_words looks in: beside the weights, then the user cache.
    places = [Path(weights).expanduser().parent] if weights and not str(weights).startswith("torchvision:") else []
    if callable(getattr(models, "cache_dir", None)):
        places.append(models.cache_dir())
    synonyms: dict[str, list[str]] = {}
    for place in places:
        file = place / "synset_words.txt"
        if file.is_file():
            for line in file.read_text(errors="replace").splitlines():
                synset, _, names = line.strip().partition(" ")
                synonyms[synset] = [n.strip() for n in names.split(",") if n.strip()]
            break
    return [(synset, synonyms.get(synset) or [name]) for synset, name in pairs]
