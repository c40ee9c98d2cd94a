"""Figures (PNG, matplotlib Agg) and row records for ``dvc plots``.

Figures are drawn on a bare ``matplotlib.figure.Figure`` (no pyplot, no global state),
which renders PNGs with the Agg canvas whatever backend the process has configured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from smearnet.errors import SmearnetError


def _save(figure: Figure, path: str | Path) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(target, format="png", dpi=150, bbox_inches="tight")
    return target


def confusion_matrix_png(
    matrix: Sequence[Sequence[float]] | np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    *,
    normalise: bool = False,
    title: str = "",
) -> Path:
    """Heat map of a confusion matrix of counts (rows = truth, columns = predicted).

    Every cell is annotated with its count; with ``normalise`` the colour is the row share
    (recall of the true class) and the annotation shows the share above the count.
    """
    counts = np.asarray(matrix, dtype=np.float64)
    n_classes = len(class_names)
    if counts.shape != (n_classes, n_classes):
        raise SmearnetError(
            f"Confusion matrix has shape {counts.shape} but there are {n_classes} class names.",
            "Pass a square count matrix with one row and column per class.",
        )
    row_totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(row_totals > 0, counts / row_totals, np.nan)
    shown = shares if normalise else counts
    colour_max = 1.0 if normalise else max(float(np.nanmax(counts)) if counts.size else 1.0, 1.0)

    side = max(4.0, 0.9 * n_classes + 2.0)
    figure = Figure(figsize=(side + 1.0, side))
    axes = figure.add_subplot()
    image = axes.imshow(np.nan_to_num(shown), cmap="Blues", vmin=0.0, vmax=colour_max)
    colourbar = figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    colourbar.set_label("share of true class" if normalise else "cells")

    for row in range(n_classes):
        for column in range(n_classes):
            count = int(round(counts[row, column]))
            if normalise:
                share = shares[row, column]
                text = f"{share:.2f}\n({count})" if math.isfinite(share) else f"–\n({count})"
                level = 0.0 if not math.isfinite(share) else share
            else:
                text = f"{count}"
                level = counts[row, column]
            axes.text(
                column, row, text, ha="center", va="center", fontsize=9,
                color="white" if level > 0.55 * colour_max else "black",
            )  # fmt: skip

    axes.set_xticks(range(n_classes), labels=list(class_names), rotation=45, ha="right", rotation_mode="anchor")
    axes.set_yticks(range(n_classes), labels=list(class_names))
    axes.set_xlabel("Predicted class")
    axes.set_ylabel("True class")
    axes.set_title(title or ("Confusion matrix (row-normalised)" if normalise else "Confusion matrix (counts)"))
    return _save(figure, path)


def roc_png(
    curves: Mapping[str, Mapping[str, Any]],
    path: str | Path,
    *,
    threshold_point: tuple[float, float] | None = None,
    title: str = "",
) -> Path:
    """ROC curves on one axis, ``curves = {name: {"fpr", "tpr", "auc"}}``, AUC in the legend.

    ``threshold_point`` = ``(fpr, tpr)`` of the operating point to mark.
    """
    if not curves:
        raise SmearnetError("roc_png got no curves to draw.", "Pass {name: {'fpr': ..., 'tpr': ..., 'auc': ...}}.")
    figure = Figure(figsize=(5.5, 5.5))
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance (AUC 0.5)")
    for name, curve in curves.items():
        missing = {"fpr", "tpr", "auc"} - set(curve)
        if missing:
            raise SmearnetError(f"ROC curve {name!r} lacks {sorted(missing)}.", "Build curves with roc_points().")
        auc = float(curve["auc"])
        axes.plot(curve["fpr"], curve["tpr"], linewidth=1.8, label=f"{name} (AUC {auc:.3f})")
    if threshold_point is not None:
        axes.plot(
            [threshold_point[0]], [threshold_point[1]], marker="o", markersize=8, color="black",
            linestyle="none", label=f"threshold (FPR {threshold_point[0]:.2f}, TPR {threshold_point[1]:.2f})",
        )  # fmt: skip
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.set_aspect("equal")
    axes.grid(True, alpha=0.3)
    axes.set_xlabel("False positive rate (1 − specificity)")
    axes.set_ylabel("True positive rate (sensitivity)")
    axes.set_title(title or "ROC")
    axes.legend(loc="lower right", fontsize=8)
    return _save(figure, path)


def confusion_matrix_records(y_true_names: Sequence[str], y_pred_names: Sequence[str]) -> list[dict[str, str]]:
    """Rows ``{"actual", "predicted"}`` for the ``dvc plots`` confusion template."""
    if len(y_true_names) != len(y_pred_names):
        raise SmearnetError(
            f"Got {len(y_true_names)} true labels but {len(y_pred_names)} predictions.",
            "Pass one true and one predicted class name per cell.",
        )
    return [
        {"actual": str(actual), "predicted": str(predicted)} for actual, predicted in zip(y_true_names, y_pred_names)
    ]


def roc_records(
    fpr: Sequence[float], tpr: Sequence[float], thresholds: Sequence[float]
) -> list[dict[str, float | None]]:
    """Rows ``{"fpr", "tpr", "threshold"}`` for ``dvc plots``; a non-finite threshold becomes None."""
    if not len(fpr) == len(tpr) == len(thresholds):
        raise SmearnetError(
            f"fpr, tpr and thresholds differ in length ({len(fpr)}, {len(tpr)}, {len(thresholds)}).",
            "Pass the three lists from roc_points().",
        )
    return [
        {
            "fpr": float(rate_false),
            "tpr": float(rate_true),
            "threshold": float(threshold) if math.isfinite(float(threshold)) else None,
        }
        for rate_false, rate_true, threshold in zip(fpr, tpr, thresholds)
    ]
