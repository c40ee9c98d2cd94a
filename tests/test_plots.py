"""Tests for smearnet.evaluation.plots: PNGs are written, records have the dvc plots fields."""

from __future__ import annotations

from pathlib import Path

import pytest

from smearnet.errors import SmearnetError
from smearnet.evaluation.plots import confusion_matrix_png, confusion_matrix_records, roc_png, roc_records

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ["lymphocyte", "covid_rl", "neutrophil", "monocyte"]
MATRIX = [[50, 3, 1, 0], [2, 40, 0, 0], [4, 0, 60, 0], [0, 0, 0, 0]]  # monocyte absent


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("normalise", [False, True])
def test_confusion_matrix_png(tmp_path, normalise):
    target = tmp_path / "plots" / f"confusion_{normalise}.png"
    written = confusion_matrix_png(MATRIX, CLASSES, target, normalise=normalise, title="Test split")
    assert written == target and _is_png(target)


def test_confusion_matrix_png_shape_error(tmp_path):
    with pytest.raises(SmearnetError, match="shape"):
        confusion_matrix_png([[1, 2], [3, 4]], CLASSES, tmp_path / "bad.png")


def test_roc_png_several_curves_with_threshold_point(tmp_path):
    curves = {
        "share": {"fpr": [0.0, 0.0, 0.5, 0.5, 1.0], "tpr": [0.0, 0.75, 0.75, 1.0, 1.0], "auc": 0.9375},
        "noisy_or": {"fpr": [0.0, 0.25, 1.0], "tpr": [0.0, 0.5, 1.0], "auc": 0.625},
    }
    target = tmp_path / "roc.png"
    assert roc_png(curves, target, threshold_point=(0.0, 0.75), title="Smear scores") == target
    assert _is_png(target)
    with pytest.raises(SmearnetError):
        roc_png({}, tmp_path / "empty.png")


def test_confusion_matrix_records():
    records = confusion_matrix_records(["covid_rl", "lymphocyte"], ["covid_rl", "covid_rl"])
    assert records == [
        {"actual": "covid_rl", "predicted": "covid_rl"},
        {"actual": "lymphocyte", "predicted": "covid_rl"},
    ]
    with pytest.raises(SmearnetError):
        confusion_matrix_records(["a"], [])


def test_roc_records():
    records = roc_records([0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [float("inf"), 0.3, 0.0])
    assert records == [
        {"fpr": 0.0, "tpr": 0.0, "threshold": None},
        {"fpr": 0.0, "tpr": 1.0, "threshold": 0.3},
        {"fpr": 1.0, "tpr": 1.0, "threshold": 0.0},
    ]
    with pytest.raises(SmearnetError):
        roc_records([0.0], [0.0, 1.0], [0.5])
