"""Where a dataset comes from: the generated synthetic cohort, a manifest CSV, or a class-per-folder tree,
followed by the manifests of more sites (each pinned by its content digest, `site_digest`)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from smearnet.data.decode import IMAGE_SUFFIXES
from smearnet.data.manifest import read_configured_manifest, read_manifest
from smearnet.errors import SmearnetError

SOURCES = ("synthetic", "manifest", "folder")


def load_dataset_manifest(data_cfg: Mapping) -> pd.DataFrame:
    """The dataset's manifest as read_manifest returns it, whichever `data.source` is configured, followed by
    the rows of every `data.extra_manifests` entry (more sites; see `with_extra_manifests`)."""
    source = str(data_cfg["source"])
    if source in ("synthetic", "manifest"):
        base = read_configured_manifest(data_cfg)
    elif source == "folder":
        base = manifest_from_folder(Path(str(data_cfg["root"])), data_cfg.get("classes"))
    else:
        raise SmearnetError(f"Unknown `data.source` `{source}`.", f"use one of {list(SOURCES)}.")
    return with_extra_manifests(base, data_cfg.get("extra_manifests") or [])


def with_extra_manifests(base: pd.DataFrame, entries: Sequence) -> pd.DataFrame:
    """`base` followed by the rows of each extra manifest (a CSV path, or {manifest, sha256}).

    A `sha256` entry (written by `smearnet ingest-site`) must match the site's content digest
    (`site_digest`), so changed or half-pulled site data is refused rather than ingested.
    Rows keep their order: an extra manifest's `row` numbers continue after the previous manifest's
    (row - offset = its CSV line). Patient ids shared by two manifests are refused (they would merge two
    hospitals' patients into one in the split).
    """
    if not entries:
        return base
    frames, offset = [base], int(base["row"].max())
    for entry in entries:
        path = Path(str(entry["manifest"] if isinstance(entry, Mapping) else entry))
        expected = entry.get("sha256") if isinstance(entry, Mapping) else None
        if expected and site_digest(path) != expected:
            raise SmearnetError(f"The site data of {path} changed since it was ingested (content digest differs).",
                                "pull it again (`dvc pull`) or re-run `smearnet ingest-site` for that site.")
        extra = read_manifest(path)
        shared = set(extra["patient_id"]) & set().union(*(set(f["patient_id"]) for f in frames))
        if shared:
            raise SmearnetError(f"{len(shared)} patient id(s) of {path} also appear in an earlier manifest.",
                                "give each site its own ids (`smearnet ingest-site --id-prefix <site>-`).")
        extra["row"] = extra["row"] + offset - 1
        offset = int(extra["row"].max())
        frames.append(extra)
    combined = pd.concat(frames, ignore_index=True)
    for column in combined.columns:
        if column != "row":
            combined[column] = combined[column].fillna("")
    combined.attrs["manifest_path"] = base.attrs.get("manifest_path")
    return combined


def site_digest(manifest_csv: Path) -> str:
    """Content digest of a site: its manifest's bytes and the bytes of every image it lists.

    A listed file that does not exist counts as "missing" (the ingest stage reports such rows), so a file that
    disappears later, e.g. after a partial `dvc pull`, changes the digest.
    """
    manifest_csv = Path(manifest_csv)
    if not manifest_csv.is_file():
        raise SmearnetError(f"The site manifest {manifest_csv} does not exist.",
                            "run `dvc pull` to fetch the site data, or `smearnet ingest-site` to add it.")
    digest = hashlib.sha256(manifest_csv.read_bytes())
    table = pd.read_csv(manifest_csv, dtype=str, keep_default_na=False)
    for relative in sorted(set(table["path"])):
        path = manifest_csv.parent / relative
        content = hashlib.sha256(path.read_bytes()).digest() if path.is_file() else b"missing"
        digest.update(relative.encode() + b"\0" + content)
    return digest.hexdigest()[:32]


def manifest_from_folder(root: Path, classes: Sequence[str] | None = None) -> pd.DataFrame:
    """A manifest for a class-per-folder tree (e.g. PBC): the folder name is the label.

    Without patient identifiers every image is its own patient (and smear): the split then cannot
    keep one patient's cells together, so cells of one donor may land in train and test alike.
    Hidden files and folders below a class folder (macOS `._name.jpg` resource forks, `.ipynb_checkpoints`)
    are not listed: they are copies' metadata, not cells.
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
            hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
            if not hidden and path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
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
