"""Where a dataset comes from: the generated synthetic cohort, a manifest CSV, or a class-per-folder tree."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from smearnet.errors import SmearnetError
from smearnet.manifest import read_configured_manifest

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
SOURCES = ("synthetic", "manifest", "folder")


def load_dataset_manifest(data_cfg: Mapping) -> pd.DataFrame:
    """The dataset's manifest as read_manifest returns it, whichever `data.source` is configured."""
    source = str(data_cfg["source"])
    if source in ("synthetic", "manifest"):
        return read_configured_manifest(data_cfg)
    if source == "folder":
        return manifest_from_folder(Path(str(data_cfg["root"])), data_cfg.get("classes"))
    raise SmearnetError(f"Unknown `data.source` `{source}`.", f"use one of {list(SOURCES)}.")


def manifest_from_folder(root: Path, classes: Sequence[str] | None = None) -> pd.DataFrame:
    """A manifest for a class-per-folder tree (e.g. PBC): the folder name is the label.

    Without patient identifiers every image is its own patient (and smear): the split then cannot
    keep one patient's cells together, so cells of one donor may land in train and test alike.
    """
    root = Path(root)
    if not root.is_dir():
        raise SmearnetError(f"The image folder {root} does not exist.",
                            "set `data.root` to a folder with one sub-folder per class.")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is not None:
        wanted = {str(c) for c in classes}
        folders = [p for p in folders if p.name in wanted]
        missing = wanted - {p.name for p in folders}
        if missing:
            raise SmearnetError(f"No sub-folder for class(es) {sorted(missing)} under {root}.",
                                "fix `data.classes` or the folder names (the folder name is the label).")
    rows = []
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                image_id = f"{folder.name}/{path.relative_to(folder).as_posix()}"
                rows.append({"path": str(path), "label": folder.name, "patient_id": image_id,
                             "smear_id": image_id, "site": "default", "cohort": "development"})
    if not rows:
        raise SmearnetError(f"No images ({', '.join(IMAGE_SUFFIXES)}) found under {root}.",
                            "point `data.root` at a class-per-folder tree.")
    frame = pd.DataFrame(rows)
    frame.insert(0, "row", range(2, len(frame) + 2))
    frame["source_path"] = frame["path"]
    return frame
