"""New hospital sites: copy a site's images into data/sites/<site>/ and list its manifest in the configuration.

`smearnet ingest-site <folder> --site <name>` takes a folder holding a `manifest.csv` (path, label,
patient_id[, smear_id, cohort]) or a class-per-folder tree, copies the images to `data/sites/<name>/` (same
relative paths), writes `data/sites/<name>/manifest.csv` (ids namespaced by `--id-prefix`, `site` set to the
name), lists `{manifest, sha256}` in `conf/data/sites/registered.yaml` and in `params.yaml`, and `dvc add`s the
site folder so `dvc push` stores it. The ingest stage then appends the site's rows (its `data.extra_manifests`
parameter changed), and `dvc repro` re-runs only the stages downstream of ingest.

Every listed file must lie inside the site folder (`smearnet.data.paths.confinement_problem`): a delivery
that names absolute paths, climbs out with `..` or links out through a symlink is refused before anything
is copied, each such row named with its reason.

`registered.yaml` is the only file this command writes under conf/: a YAML document of its own, written
whole, that `conf/data/synthetic.yaml` composes through its defaults list
(`optional sites@_here_: registered`; optional, so a project without extra sites needs no such file).
Hand-written configuration is never rewritten.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml
from omegaconf import OmegaConf

from smearnet.data.ingest_report import redact, row_file
from smearnet.data.manifest import is_missing_id, read_manifest
from smearnet.data.paths import OUTSIDE_FOLDER, confinement_problem, existing_unicode_form, with_forward_slashes
from smearnet.data.sources import manifest_from_folder, site_digest
from smearnet.errors import SmearnetError
from smearnet.io import atomic_directory, write_text

SITES_DIR = Path("data/sites")
#: The dataset config whose defaults list composes SITES_CONF, and the entry that does it.
DATA_CONF = Path("conf/data/synthetic.yaml")
SITES_DEFAULT = ("optional sites@_here_", "registered")
SITES_CONF = Path("conf/data/sites/registered.yaml")
_SITES_CONF_HEADER = ("# Written by `smearnet ingest-site`: the sites appended to every dataset (data.extra_manifests).\n"
                      "# Composed by conf/data/synthetic.yaml; re-run ingest-site to change an entry.\n")
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_MAX_ROWS_IN_MESSAGE = 5


@dataclass
class SiteResult:
    """What ingest-site did."""

    site: str
    manifest: Path
    images: int
    patients: int
    sha256: str
    dvc_tracked: bool


def read_site_folder(folder: Path) -> tuple[pd.DataFrame, list[str]]:
    """A site's rows and each row's path as written relative to `folder`: its `manifest.csv` if present, else
    the class-per-folder tree (folder name = label)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SmearnetError(f"The site folder {folder} does not exist.", "pass the folder the hospital delivered.")
    if (folder / "manifest.csv").is_file():
        rows = read_manifest(folder / "manifest.csv")
        return rows, rows["source_path"].tolist()
    print(f"ingest-site: {folder} has no manifest.csv; reading it as class-per-folder (each image its own patient)")
    rows = manifest_from_folder(folder)
    return rows, [os.path.relpath(path, folder) for path in rows["path"]]


def ingest_site(folder: Path, site: str, *, project: Path = Path("."), id_prefix: str | None = None,
                dvc_add: bool = True) -> SiteResult:
    """Copy a site's images into `project/data/sites/<site>`, write its manifest and register it in the config."""
    if not _SITE_NAME.match(site):
        raise SmearnetError(f"Site name {site!r} is not allowed.",
                            "use letters, digits, '_' and '-' (e.g. hospital_b).")
    project = Path(project)
    check_sites_are_composed(project)
    rows, written = read_site_folder(Path(folder))
    source_root = os.path.abspath(folder)
    sources = [existing_unicode_form(path) or path for path in rows["path"]]
    _refuse_paths_outside(rows, written, sources, source_root)
    prefix = f"{site}-" if id_prefix is None else id_prefix
    target = project / SITES_DIR / site
    with atomic_directory(target) as staging:
        relative_paths = []
        for written_path, source in zip(written, sources, strict=True):
            if not written_path:  # stays empty: ingest reports it
                relative_paths.append("")
                continue
            relative = Path(os.path.normpath(with_forward_slashes(written_path)))
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            if os.path.isfile(source):
                shutil.copy2(source, staging / relative)
            relative_paths.append(relative.as_posix())  # a missing file stays listed: ingest reports it
        manifest = pd.DataFrame({"path": relative_paths, "label": rows["label"],
                                 # a missing id stays missing (ingest rejects it), not "<site>-NA" of one pooled patient
                                 "patient_id": [p if is_missing_id(p) else f"{prefix}{p}" for p in rows["patient_id"]],
                                 "smear_id": [f"{prefix}{s}" for s in rows["smear_id"]],
                                 "site": site, "cohort": rows["cohort"]})
        write_text(manifest.to_csv(index=False, lineterminator="\n"), staging / "manifest.csv")
    manifest_path = target / "manifest.csv"
    digest = site_digest(manifest_path)
    entry = {"manifest": (SITES_DIR / site / "manifest.csv").as_posix(), "sha256": digest}
    update_config(project, entry)
    tracked = dvc_add and (project / ".dvc").is_dir() and _dvc_add(project, SITES_DIR / site)
    return SiteResult(site=site, manifest=manifest_path, images=len(manifest),
                      patients=int(manifest["patient_id"].nunique()), sha256=digest, dvc_tracked=bool(tracked))


def _refuse_paths_outside(rows: pd.DataFrame, written: list[str], sources: list[str], source_root: str) -> None:
    """Raise one SmearnetError naming every row whose file is not inside the site folder (nothing copied yet)."""
    bad = []
    for row, written_path, source, patient_id in zip(rows["row"], written, sources, rows["patient_id"], strict=True):
        problem = confinement_problem(written_path, source_root, opened=source)
        if problem is None and os.path.normpath(with_forward_slashes(written_path)) == "manifest.csv":
            problem = (OUTSIDE_FOLDER, "lists the site's manifest.csv itself, not an image")
        if problem is not None:
            bad.append(f"row {row} ({row_file(written_path, patient_id)}): {redact(problem[1], patient_id)}")
    if bad:
        more = f"; and {len(bad) - _MAX_ROWS_IN_MESSAGE} more" if len(bad) > _MAX_ROWS_IN_MESSAGE else ""
        raise SmearnetError(
            f"{len(bad)} row(s) of the site delivery {source_root} point outside the site folder: "
            f"{'; '.join(bad[:_MAX_ROWS_IN_MESSAGE])}{more}. Nothing was copied.",
            "copy those images into the site folder and list them by paths relative to it "
            "(e.g. images/cell1.jpg), then re-run ingest-site.",
        )


def check_sites_are_composed(project: Path) -> None:
    """Raise unless `conf/data/synthetic.yaml` composes `conf/data/sites/registered.yaml` (else sites would be
    listed in a file Hydra never reads)."""
    data_conf = Path(project) / DATA_CONF
    if not data_conf.is_file():
        raise SmearnetError(f"{data_conf} not found.", "run ingest-site from the project root (or pass --project).")
    defaults = (yaml.safe_load(data_conf.read_text(encoding="utf-8")) or {}).get("defaults") or []
    key, option = SITES_DEFAULT
    if not any(isinstance(item, dict) and item.get(key) == option for item in defaults):
        raise SmearnetError(
            f"{data_conf} does not compose the sites file {SITES_CONF}, so a registered site would be ignored.",
            f"add `- {key}: {option}` after `- _self_` under `defaults:` in {data_conf}.",
        )


def registered_sites(project: Path) -> list:
    """The `data.extra_manifests` entries of `conf/data/sites/registered.yaml` (those of the dataset config
    when the file does not exist yet: sites listed there by an earlier version are carried over)."""
    sites_conf = Path(project) / SITES_CONF
    if sites_conf.is_file():
        loaded = yaml.safe_load(sites_conf.read_text(encoding="utf-8")) or {}
    else:
        loaded = yaml.safe_load((Path(project) / DATA_CONF).read_text(encoding="utf-8")) or {}
    return list(loaded.get("extra_manifests") or [])


def update_config(project: Path, entry: dict[str, str]) -> list[dict[str, str]]:
    """Add (or replace, by manifest path) `entry` in `data.extra_manifests` of conf/ and of params.yaml."""
    check_sites_are_composed(project)
    entries = [e for e in registered_sites(project) if _manifest_of(e) != entry["manifest"]] + [entry]
    write_text(_SITES_CONF_HEADER + yaml.safe_dump({"extra_manifests": entries}, sort_keys=False),
               Path(project) / SITES_CONF)
    params = Path(project) / "params.yaml"
    if params.is_file():  # keep overrides composed into params.yaml; only this key changes
        cfg = OmegaConf.load(params)
        OmegaConf.update(cfg, "data.extra_manifests", entries, force_add=True)
        write_text(OmegaConf.to_yaml(cfg), params)
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
