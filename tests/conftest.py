"""Shared fixtures: offline hubs, a private MLflow store per test, tiny manifests."""

from __future__ import annotations

import importlib.util
import os
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
def _mlflow_store(tmp_path_factory) -> str:
    # Creating a sqlite store runs MLflow's migrations (~10 s): one store for the session.
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def mlflow_uri(_mlflow_store, monkeypatch) -> str:
    """The session's sqlite tracking store (never the repo's mlflow.db); use unique model names per test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _mlflow_store)
    return _mlflow_store


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
