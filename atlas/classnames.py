"""Class-name resolution: a class given by name, synset or index, as an index into the model's classes.

Its own small module so that ``tiles`` (which highlights a class) and ``classes`` (which
builds class atlases and then tiles them) can both use it without importing each other.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from atlas.errors import AtlasError
from atlas.models import synset_words


@dataclass(frozen=True)
class ClassRef:
    """A resolved class: its logit ``index`` and its display ``name`` (the run's class list entry)."""

    index: int
    name: str


def _normalise(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", text.strip().lower())


def resolve_class(query: str | int, classes: list[str], weights: str | None = None) -> ClassRef:
    """A class given by name ("scuba diver"), synset ("n10565667") or index ("983").

    Names match any of the synonyms of synset_words.txt, ignoring case, spaces and
    underscores. An unknown or ambiguous name is an error listing the closest classes.
    """
    text = str(query).strip()
    if text.isdigit():
        index = int(text)
        if not 0 <= index < len(classes):
            raise AtlasError(f"class index {index} out of range: the model has {len(classes)} classes")
        return ClassRef(index, classes[index])
    words = synset_words(weights)
    offset = 1 if len(classes) == 1008 else 0  # Lucid's labels start with 'dummy'
    if re.fullmatch(r"n\d{8}", text):
        for i, (synset, _) in enumerate(words):
            if synset == text and i + offset < len(classes):
                return ClassRef(i + offset, classes[i + offset])
        raise AtlasError(f"unknown synset '{text}'")
    wanted = _normalise(text)
    synonyms: dict[int, list[str]] = {i: [_normalise(classes[i])] for i in range(len(classes))}
    if words and len(words) + offset <= len(classes):
        for i, (_, name) in enumerate(words):
            synonyms[i + offset].append(_normalise(name))
    exact = sorted({i for i, names in synonyms.items() if wanted in names})
    primary = [i for i in exact if synonyms[i][0] == wanted]
    if len(primary) == 1:
        return ClassRef(primary[0], classes[primary[0]])
    if len(exact) == 1:
        return ClassRef(exact[0], classes[exact[0]])
    if len(exact) > 1:
        listing = ", ".join(f"{classes[i]} ({i})" for i in exact)
        raise AtlasError(f"class name '{text}' is ambiguous: {listing}; give the index or synset")
    everything = {name: i for i, names in synonyms.items() for name in names}
    close = difflib.get_close_matches(wanted, list(everything), n=5, cutoff=0.5)
    hint = ", ".join(f"{classes[everything[c]]} ({everything[c]})" for c in close) or "none"
    raise AtlasError(f"unknown class '{text}'; closest: {hint}")
