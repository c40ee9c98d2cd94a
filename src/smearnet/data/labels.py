"""Class labels as written in a manifest, matched to the configured classes (case, spaces, Unicode form, aliases)."""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence

from smearnet.errors import SmearnetError


def label_key(label: str) -> str:
    """The form labels are compared in: Unicode NFC, surrounding whitespace stripped, case folded."""
    return unicodedata.normalize("NFC", str(label)).strip().casefold()


def class_lookup(classes: Sequence[str]) -> dict[str, str]:
    """Map normalised class name -> class name as configured; reject empty/colliding names."""
    if isinstance(classes, str) or not classes:
        raise SmearnetError(
            f"Config key classes must be a non-empty list of class names, got {classes!r}.",
            "list the class names, e.g. classes: [covid_rl, normal].",
        )
    class_by_key: dict[str, str] = {}
    for name in classes:
        key = label_key(name)
        if not key:
            raise SmearnetError("Config key classes contains an empty class name.", "remove the empty entry.")
        if key in class_by_key:
            raise SmearnetError(
                f"Config key classes lists {class_by_key[key]!r} and {name!r}, which are the same class once "
                "case and surrounding spaces are ignored.",
                "keep one spelling of each class.",
            )
        class_by_key[key] = str(name).strip()
    return class_by_key


def alias_lookup(label_aliases: Mapping[str, str] | None, class_by_key: dict[str, str]) -> dict[str, str]:
    """Map normalised alias -> canonical class; every alias must point at a configured class."""
    alias_by_key: dict[str, str] = {}
    for alias, target in (label_aliases or {}).items():
        alias_key, target_key = label_key(alias), label_key(target)
        if target_key not in class_by_key:
            raise SmearnetError(
                f"Config key ingest.label_aliases maps {alias!r} to {target!r}, which is not one of the classes "
                f"({', '.join(class_by_key.values())}).",
                "point every alias at one of the configured classes.",
            )
        if alias_key in class_by_key and alias_key != target_key:
            raise SmearnetError(
                f"Config key ingest.label_aliases maps {alias!r} to {target!r}, but {alias!r} is itself a class.",
                "remove that alias or rename the class.",
            )
        alias_by_key[alias_key] = class_by_key[target_key]
    return alias_by_key


def canonical_label(raw_label: str, class_by_key: dict[str, str], alias_by_key: dict[str, str]) -> str | None:
    """The configured class ``raw_label`` names (directly or through an alias), or None."""
    key = label_key(raw_label)
    return alias_by_key.get(key) or class_by_key.get(key)
