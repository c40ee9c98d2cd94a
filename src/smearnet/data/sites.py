"""New hospital sites: copy a site's images into data/sites/<site>/ and list its manifest in the configuration.

`smearnet ingest-site <folder> --site <name>` takes a folder holding a `manifest.csv` (path, label,
patient_id[, smear_id, cohort]) or a class-per-folder tree, copies the images to `data/sites/<name>/` (same
relative paths; images listed from outside the folder go to `external/`),
writes `data/sites/<name>/manifest.csv` (ids namespaced by `--id-prefix`, `site` set to the name), adds
`{manifest, sha256}` to `data.extra_manifests` in `conf/data/synthetic.yaml` and `params.yaml`, and `dvc add`s
the site folder so `dvc push` stores it. The ingest stage then appends the site's rows (its `data.extra_manifests`
parameter changed), and `dvc repro` re-runs only the stages downstream of ingest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from smearnet.errors import SmearnetError

SITES_DIR = Path("data/sites")
CONF_FILE = Path("conf/data/synthetic.yaml")
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_LINE = re.compile(r"^extra_manifests:.*$", re.MULTILINE)


@dataclass
class SiteResult:
    """What ingest-site did."""

    site: str
    manifest: Path
    images: int
    patients: int
    sha256: str
    dvc_tracked: bool


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


def read_site_folder(folder: Path) -> pd.DataFrame:
    """A site's rows: its `manifest.csv` if present, else the class-per-folder tree (folder name = label)."""
    from smearnet.data.sources import manifest_from_folder
    from smearnet.data.manifest import read_manifest

    folder = Path(folder)
    if not folder.is_dir():
        raise SmearnetError(f"The site folder {folder} does not exist.", "pass the folder the hospital delivered.")
    if (folder / "manifest.csv").is_file():
        return read_manifest(folder / "manifest.csv")
    print(f"ingest-site: {folder} has no manifest.csv; reading it as class-per-folder (each image its own patient)")
    return manifest_from_folder(folder)


def ingest_site(folder: Path, site: str, *, project: Path = Path("."), id_prefix: str | None = None,
                dvc_add: bool = True) -> SiteResult:
    """Copy a site's images into `project/data/sites/<site>`, write its manifest and register it in the config."""
    from smearnet.io import atomic_directory

    if not _SITE_NAME.match(site):
        raise SmearnetError(f"Site name {site!r} is not allowed.",
                            "use letters, digits, '_' and '-' (e.g. hospital_b).")
    project = Path(project)
    rows = read_site_folder(Path(folder))
    prefix = f"{site}-" if id_prefix is None else id_prefix
    target = project / SITES_DIR / site
    source_root = Path(folder).resolve()
    with atomic_directory(target) as staging:
        relative_paths = []
        for number, path in enumerate(rows["path"]):
            source = Path(path).resolve()
            inside = source.is_relative_to(source_root) and source.name != "manifest.csv"
            relative = source.relative_to(source_root) if inside else Path("external") / f"{number:06d}_{source.name}"
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            if source.is_file():
                shutil.copy2(source, staging / relative)
            relative_paths.append(relative.as_posix())  # a missing file stays listed: ingest reports it
        manifest = pd.DataFrame({"path": relative_paths, "label": rows["label"],
                                 "patient_id": [f"{prefix}{p}" for p in rows["patient_id"]],
                                 "smear_id": [f"{prefix}{s}" for s in rows["smear_id"]],
                                 "site": site, "cohort": rows["cohort"]})
        manifest.to_csv(staging / "manifest.csv", index=False, lineterminator="\n")
    manifest_path = target / "manifest.csv"
    digest = site_digest(manifest_path)
    entry = {"manifest": (SITES_DIR / site / "manifest.csv").as_posix(), "sha256": digest}
    update_config(project, entry)
    tracked = dvc_add and (project / ".dvc").is_dir() and _dvc_add(project, SITES_DIR / site)
    return SiteResult(site=site, manifest=manifest_path, images=len(manifest),
                      patients=int(manifest["patient_id"].nunique()), sha256=digest, dvc_tracked=bool(tracked))


def update_config(project: Path, entry: dict[str, str]) -> list[dict[str, str]]:
    """Add (or replace, by manifest path) `entry` in `data.extra_manifests` of conf/ and of params.yaml."""
    from omegaconf import OmegaConf

    conf_file = Path(project) / CONF_FILE
    if not conf_file.is_file():
        raise SmearnetError(f"{conf_file} not found.", "run ingest-site from the project root (or pass --project).")
    loaded = OmegaConf.to_container(OmegaConf.load(conf_file))
    current = (loaded.get("extra_manifests") if isinstance(loaded, dict) else None) or []
    entries = [e for e in current if _manifest_of(e) != entry["manifest"]] + [entry]
    line = f"extra_manifests: {json.dumps(entries)}"
    text = conf_file.read_text()
    text = _LINE.sub(lambda _: line, text, count=1) if _LINE.search(text) else text.rstrip("\n") + f"\n{line}\n"
    conf_file.write_text(text)
    params = Path(project) / "params.yaml"
    if params.is_file():  # keep overrides composed into params.yaml; only this key changes
        cfg = OmegaConf.load(params)
        OmegaConf.update(cfg, "data.extra_manifests", entries, force_add=True)
        params.write_text(OmegaConf.to_yaml(cfg))
    return entries


def _manifest_of(entry) -> str:
    return str(entry["manifest"] if isinstance(entry, dict) else entry)


def _dvc_add(project: Path, relative: Path) -> bool:
    """`dvc add` the site folder so `dvc push`/`pull` carry it; False (with a note) if DVC refuses."""
    result = subprocess.run([sys.executable, "-m", "dvc", "add", "--quiet", relative.as_posix()], cwd=project,
                            capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if result.returncode != 0:
        print(f"ingest-site: note: `dvc add {relative}` failed, track the site data yourself:\n{result.stderr.strip()}")
        return False
    return True
