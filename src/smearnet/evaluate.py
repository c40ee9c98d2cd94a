"""Cell-level evaluation of the selected model, and the cells the smear stage scores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from smearnet.compose import compose_smears
from smearnet.inference import TrainedModel, predict_probabilities, predictions_table
from smearnet.metrics import cell_metrics
from smearnet.plots import confusion_matrix_png


def smear_cells(split_manifest: pd.DataFrame, compose: Mapping | None = None, *, positive_class: str = "",
                seed: int = 0) -> tuple[pd.DataFrame, str]:
    """Cells whose smears are classified blind, and where they came from.

    The assessment cohort when the data has one; else, with `smear.compose.enabled`, smears simulated from
    the test split (see smearnet.compose); else the test split's own smears.
    """
    assessment = split_manifest[split_manifest["split"] == "assessment"]
    if not assessment.empty:
        return assessment, "assessment"
    test = split_manifest[split_manifest["split"] == "test"]
    if compose and compose.get("enabled"):
        target = str(compose.get("target_class") or positive_class)
        return compose_smears(test, target, seed=seed), f"composed from test cells (target {target})"
    return test, "test"


def evaluate_cells(model: TrainedModel, cells: pd.DataFrame, positive_class: str, *, batch_size: int,
                   confidence: float, out_dir: Path) -> tuple[dict, pd.DataFrame]:
    """Predict every cell, compute the cell metrics and draw the confusion matrices into `out_dir`."""
    probabilities = predict_probabilities(model, cells, batch_size=batch_size, desc="evaluate")
    table = predictions_table(cells, probabilities, model.classes)
    y_true = class_indices(cells["label"], model.classes)
    metrics = cell_metrics(y_true, probabilities, model.classes, positive_class, confidence)
    matrix = metrics["confusion_matrix"]
    confusion_matrix_png(matrix, model.classes, out_dir / "confusion.png", title=f"{model.name}: test cells")
    confusion_matrix_png(matrix, model.classes, out_dir / "confusion_normalised.png", normalise=True,
                         title=f"{model.name}: test cells, row-normalised")
    return metrics, table


def smear_cell_probabilities(model: TrainedModel, cells: pd.DataFrame, test: pd.DataFrame,
                             test_table: pd.DataFrame, *, batch_size: int) -> np.ndarray:
    """Probabilities for the smear cells; cells drawn from the test split reuse the test predictions.

    Composed smears repeat test cells across smears, so predicting them again would cost more than the
    test split itself; only assessment cells (never seen by `evaluate_cells`) go through the network.
    """
    rows = cells["cell_index"] if "cell_index" in cells else cells.index
    positions = test.index.get_indexer(rows)
    if (positions >= 0).all():
        return test_table[[f"prob_{name}" for name in model.classes]].to_numpy()[positions]
    return predict_probabilities(model, cells, batch_size=batch_size, desc="smear cells")


def class_indices(labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Class names to indices into `classes`."""
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[label] for label in labels], dtype=int)
