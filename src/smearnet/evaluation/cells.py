"""Cell-level evaluation of the selected model on the test split."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from smearnet.models.inference import TrainedModel, predict_probabilities, predictions_table
from smearnet.evaluation.metrics import cell_metrics
from smearnet.evaluation.plots import confusion_matrix_png


def evaluate_cells(model: TrainedModel, cells: pd.DataFrame, positive_class: str, *, batch_size: int,
                   confidence: float, n_resamples: int, out_dir: Path) -> tuple[dict, pd.DataFrame]:
    """Predict every cell, compute the cell metrics (`n_resamples` bootstrap resamples for the macro-F1 interval)
    and draw the confusion matrices into `out_dir`."""
    probabilities = predict_probabilities(model, cells, batch_size=batch_size, desc="evaluate")
    table = predictions_table(cells, probabilities, model.classes)
    y_true = class_indices(cells["label"], model.classes)
    metrics = cell_metrics(y_true, probabilities, model.classes, positive_class, confidence, n_resamples=n_resamples)
    matrix = metrics["confusion_matrix"]
    confusion_matrix_png(matrix, model.classes, out_dir / "confusion.png", title=f"{model.name}: test cells")
    confusion_matrix_png(matrix, model.classes, out_dir / "confusion_normalised.png", normalise=True,
                         title=f"{model.name}: test cells, row-normalised")
    return metrics, table


def class_indices(labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Class names to indices into `classes`."""
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[label] for label in labels], dtype=int)
