"""Shared fixtures: offline hubs, a private MLflow store per test, tiny manifests."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Pseudonyms need a key; the tests share one (tests/test_pseudonyms.py checks the key file and CI rules).
os.environ.setdefault("SMEARNET_ID_SALT", "smearnet-tests-key")

REPO_ROOT = Path(__file__).resolve().parents[1]
PBC_DIR = Path(os.environ.get("SMEARNET_PBC_DIR", REPO_ROOT.parent / "shared" / "data" / "pbc"))


def benchmark_script(name: str) -> ModuleType:
    """`benchmarks/<name>.py` imported as a module (its functions tested without running `main`)."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory) -> Path:
    """An empty, migrated sqlite store: creating one runs MLflow's migrations (~2 s), copying it takes ~0.05 s."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session")
def mlflow_store(_mlflow_template):
    """`mlflow_store(folder)`: a private sqlite store in `folder` (a copy of the migrated template); its URI.

    Each test's store and artifacts live in that test's own folder and nowhere else, so pytest can delete a
    passing test's folder as soon as it ends (`tmp_path_retention_policy = "failed"`): a full run then needs
    the disk of its largest test, not the sum of all of them."""

    def make(folder: Path) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_mlflow_template, folder / "mlflow.db")
        return f"sqlite:///{folder / 'mlflow.db'}"

    return make


@pytest.fixture(scope="module")
def module_folder(request, tmp_path_factory):
    """`module_folder(name)`: a folder for a module's shared fixtures, deleted when the module ends unless one of
    its tests failed (kept then, like a failed test's own folder)."""
    made: list[Path] = []
    failed_before = request.session.testsfailed

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    if request.session.testsfailed == failed_before:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def mlflow_uri(mlflow_store, tmp_path, monkeypatch) -> str:
    """This test's private sqlite tracking store (never the repo's mlflow.db).

    The test runs in its own folder, because MLflow puts a new experiment's artifacts under the working
    directory's ./mlruns; the global tracking URI is this store's during the test and unset after it."""
    import mlflow

    uri = mlflow_store(tmp_path / "mlflow")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def colour_cells(folder: Path, labels: list[str], patients: list[str], *, size: int = 72, seed: int = 0,
                 smears: list[str] | None = None, cohorts: list[str] | None = None) -> pd.DataFrame:
    """A manifest of tiny, learnable images: each class a different dominant colour plus noise."""
    rng = np.random.default_rng(seed)
    palette = {0: (200, 60, 60), 1: (60, 200, 60), 2: (60, 60, 200), 3: (200, 200, 60)}
    names = sorted(set(labels))
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (label, patient) in enumerate(zip(labels, patients)):
        base = np.array(palette[names.index(label) % 4], dtype=float)
        pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        path = folder / f"cell_{i:04d}.png"
        Image.fromarray(pixels).save(path)
        rows.append({"path": str(path), "label": label, "patient_id": patient,
                     "smear_id": smears[i] if smears else patient, "site": "default",
                     "cohort": cohorts[i] if cohorts else "development"})
    return pd.DataFrame(rows)


def class_folders(root: Path, per_class: int, *, size: int = 72, seed: int = 0) -> Path:
    """One folder a class (the PBC layout) of red, green and blue cells that a network learns in a few steps."""
    rng = np.random.default_rng(seed)
    for label, colour in (("red", (200, 60, 60)), ("green", (60, 200, 60)), ("blue", (60, 60, 200))):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour, dtype=float) + rng.normal(0, 30, (size, size, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / label / f"{label}_{i:02d}.png")
    return root
