"""`smearnet ingest-site`: every listed file stays inside the delivery folder, and sites are listed in their own
YAML file that Hydra composes (conf/data/sites/registered.yaml), never by rewriting hand-written config."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from bad_inputs import make_rgb_jpeg, snapshot, write_manifest
from conftest import REPO_ROOT
from smearnet.cli import compose_params, main
from smearnet.config import compose_config
from smearnet.data.sites import DATA_CONF, SITES_CONF, ingest_site
from smearnet.errors import SmearnetError


@pytest.fixture
def project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    shutil.copytree(REPO_ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("sites"))
    compose_params(["train.cycles=1"], project / "params.yaml")
    return project


def _delivery(folder: Path, paths: list[str]) -> Path:
    """A delivery folder with a manifest listing `paths` (one patient per row, ids in the file names)."""
    rows = [{"path": path, "label": "normal", "patient_id": f"patient-{n:02d}"} for n, path in enumerate(paths)]
    write_manifest(folder / "manifest.csv", rows)
    return folder


def test_delivery_naming_files_outside_its_folder_is_refused_before_copying(tmp_path: Path, project: Path) -> None:
    outside = tmp_path / "other_hospital"
    for n in (1, 2, 3):
        make_rgb_jpeg(outside, f"patient-{n:02d}_cell.jpg", seed=n)
    delivery = tmp_path / "delivery"
    make_rgb_jpeg(delivery / "images", "patient-00_cell.jpg")
    os.symlink(outside / "patient-03_cell.jpg", delivery / "images" / "patient-03_cell.jpg")
    _delivery(delivery, ["images/patient-00_cell.jpg", str(outside / "patient-01_cell.jpg"),
                         "../other_hospital/patient-02_cell.jpg", "images/patient-03_cell.jpg", "manifest.csv"])
    conf_before = snapshot(project / "conf")

    with pytest.raises(SmearnetError) as caught:
        ingest_site(delivery, "hospital_b", project=project, dvc_add=False)

    message = str(caught.value)
    assert "4 row(s) of the site delivery" in message and "Nothing was copied" in message
    assert "row 3 (<patient_id>_cell.jpg): absolute path (paths must be relative to the manifest's folder)" in message
    assert "row 4 (<patient_id>_cell.jpg): path leaves the manifest's folder through '..'" in message
    assert "row 5 (<patient_id>_cell.jpg): path leads outside the manifest's folder through a symlink" in message
    assert "row 6 (manifest.csv): lists the site's manifest.csv itself" in message
    assert "patient-0" not in message
    assert not (project / "data").exists() and snapshot(project / "conf") == conf_before


def test_class_per_folder_delivery_ignores_resource_forks_and_refuses_outside_links(tmp_path: Path,
                                                                                   project: Path) -> None:
    delivery = tmp_path / "delivery"
    make_rgb_jpeg(delivery / "normal", "cell1.jpg", seed=1)
    make_rgb_jpeg(delivery / "normal" / ".ipynb_checkpoints", "cell1.jpg", seed=9)
    (delivery / "normal" / "._cell1.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    os.symlink("cell1.jpg", delivery / "normal" / "cell1_link.jpg")  # inside: copied as a file

    result = ingest_site(delivery, "hospital_b", project=project, dvc_add=False)
    site = pd.read_csv(result.manifest, dtype=str)
    assert site["path"].tolist() == ["normal/cell1.jpg", "normal/cell1_link.jpg"]
    assert not (result.manifest.parent / "normal" / "cell1_link.jpg").is_symlink()

    make_rgb_jpeg(tmp_path / "elsewhere", "stray.jpg")
    os.symlink(tmp_path / "elsewhere" / "stray.jpg", delivery / "normal" / "stray.jpg")
    with pytest.raises(SmearnetError, match=r"row \d+ \(stray\.jpg\): path leads outside .* through a symlink"):
        ingest_site(delivery, "hospital_c", project=project, dvc_add=False)


def test_windows_delivery_with_backslash_paths_lands_in_sub_folders(tmp_path: Path, project: Path) -> None:
    delivery = tmp_path / "delivery"
    make_rgb_jpeg(delivery / "images" / "smear 1", "cell.jpg")
    (delivery / "manifest.csv").write_bytes(b"path,label,patient_id\r\nimages\\smear 1\\cell.jpg,normal,p1\r\n")
    result = ingest_site(delivery, "hospital_b", project=project, dvc_add=False)
    assert pd.read_csv(result.manifest, dtype=str)["path"].tolist() == ["images/smear 1/cell.jpg"]
    assert (result.manifest.parent / "images" / "smear 1" / "cell.jpg").is_file()


def test_a_missing_patient_id_is_not_prefixed_into_a_pooled_patient(tmp_path: Path, project: Path) -> None:
    # "hospital_b-NA" would pass ingest as one patient holding every row whose id R wrote as NA.
    delivery = tmp_path / "delivery"
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        make_rgb_jpeg(delivery, name)
    (delivery / "manifest.csv").write_text("path,label,patient_id\na.jpg,normal,NA\nb.jpg,normal,nan\n"
                                           "c.jpg,normal,p1\n")
    result = ingest_site(delivery, "hospital_b", project=project, dvc_add=False)
    written = pd.read_csv(result.manifest, dtype=str, keep_default_na=False)
    assert written["patient_id"].tolist() == ["NA", "nan", "hospital_b-p1"]


def test_sites_are_listed_in_their_own_yaml_that_hydra_composes(tmp_path: Path, project: Path) -> None:
    data_conf_before = (project / DATA_CONF).read_bytes()
    for name in ("hospital_b", "hospital_c"):
        make_rgb_jpeg(tmp_path / name / "images", "cell.jpg", seed=len(name))
        _delivery(tmp_path / name, ["images/cell.jpg"])
    main(["ingest-site", str(tmp_path / "hospital_b"), "--site", "hospital_b", "--project", str(project),
          "--no-dvc-add"])
    ingest_site(tmp_path / "hospital_c", "hospital_c", project=project, dvc_add=False)
    ingest_site(tmp_path / "hospital_b", "hospital_b", project=project, dvc_add=False)  # re-delivery: replaced

    assert (project / DATA_CONF).read_bytes() == data_conf_before  # hand-written config never rewritten
    text = (project / SITES_CONF).read_text()
    assert text.startswith("# Written by `smearnet ingest-site`")
    entries = yaml.safe_load(text)["extra_manifests"]
    assert [e["manifest"] for e in entries] == ["data/sites/hospital_c/manifest.csv",
                                                "data/sites/hospital_b/manifest.csv"]
    for overrides in ([], ["data=manifest", "data.manifest=x.csv"], ["data=pbc"]):
        composed = compose_config(["train.cycles=1", *overrides], conf_dir=project / "conf")
        assert OmegaConf.to_container(composed.data.extra_manifests) == entries, overrides
    composed = compose_config(["train.cycles=1"], conf_dir=project / "conf")
    assert OmegaConf.to_yaml(composed) == (project / "params.yaml").read_text()  # conf/ and params.yaml agree


def test_a_dataset_config_that_does_not_compose_the_sites_file_is_refused(tmp_path: Path, project: Path) -> None:
    data_conf = project / DATA_CONF
    legacy = {"manifest": "data/sites/hospital_a/manifest.csv", "sha256": "ab" * 16}
    written = data_conf.read_text().replace("  - optional sites@_here_: registered", "  - _self_")
    data_conf.write_text(written.replace("extra_manifests: []", f"extra_manifests: [{legacy}]".replace("'", "")))
    make_rgb_jpeg(tmp_path / "delivery" / "images", "cell.jpg")
    _delivery(tmp_path / "delivery", ["images/cell.jpg"])
    with pytest.raises(SmearnetError, match=r"does not compose the sites file .*add `- optional sites@_here_: "
                                            r"registered` after `- _self_`"):
        ingest_site(tmp_path / "delivery", "hospital_b", project=project, dvc_add=False)
    assert not (project / "data").exists()

    # Sites an earlier version listed in the dataset config itself are carried over into the sites file.
    data_conf.write_text(data_conf.read_text().replace("  - _self_\n  - _self_",
                                                       "  - _self_\n  - optional sites@_here_: registered"))
    ingest_site(tmp_path / "delivery", "hospital_b", project=project, dvc_add=False)
    entries = yaml.safe_load((project / SITES_CONF).read_text())["extra_manifests"]
    assert entries == [legacy, {"manifest": "data/sites/hospital_b/manifest.csv", "sha256": entries[1]["sha256"]}]
