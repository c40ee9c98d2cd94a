"""Why a smear was called: its score against the threshold and the cells that weighed most, with heat maps.

``explain_smears`` takes the per-cell rows of ``smearnet.smear.calls.call_cells`` (each cell's weight in its
smear's score: MIL attention, or its share of the smear's positive probability) and builds one
``SmearExplanation`` per smear for ``smear_report_html``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from smearnet.explain.html import CellExplanation, SmearExplanation, png_bytes
from smearnet.explain.saliency import grad_cam, overlay
from smearnet.models.inference import TrainedModel
from smearnet.smear.mil import MILAggregator
from smearnet.smear.rule import SmearRule

THUMBNAIL = 160  # px: the longest side of a cell image on the page


def explain_smears(model: TrainedModel, positive_class: str, score_name: str, cells: pd.DataFrame,
                   smears: pd.DataFrame, *, load_image: Callable[[str], Image.Image], cells_per_smear: int = 6,
                   name_cells: bool = True) -> list[SmearExplanation]:
    """One explanation per row of ``smears`` (``smear_id, score, threshold, call``), showing the
    ``cells_per_smear`` cells of highest ``cell_weight`` and the Grad-CAM map of the positive class over what
    the network sees (the cell at its input size and crop).

    ``cells`` needs ``path, smear_id, predicted, prob_<positive_class>, cell_weight, error``; undecodable cells
    are never shown. ``name_cells=False`` labels cells by their rank instead of their file name (for pages
    that leave the hospital, e.g. MLflow, where file names may carry identifiers).
    """
    from smearnet.data.loaders import cell_tensor

    positive_index = model.classes.index(positive_class)
    explanations = []
    for smear in smears.itertuples(index=False):
        members = cells[(cells["smear_id"].astype(str) == str(smear.smear_id)) & (cells["error"] == "")]
        shown = members.sort_values("cell_weight", ascending=False, kind="stable").head(cells_per_smear)
        images = [load_image(str(path)) for path in shown["path"]]
        inputs = torch.stack([cell_tensor(image, model.input_spec) for image in images]) if images else None
        heat = grad_cam(model.net, inputs, positive_index) if images else np.zeros((0, 1, 1))
        gallery = []
        for rank, (row, image, cam) in enumerate(zip(shown.itertuples(index=False), images, heat, strict=True)):
            thumb = _thumbnail(image)
            seen = _input_view(inputs[rank], model.input_spec)
            gallery.append(CellExplanation(
                label=Path(str(row.path)).name if name_cells else f"cell {rank + 1}",
                predicted=str(row.predicted), probability=float(getattr(row, f"prob_{positive_class}")),
                weight=float(row.cell_weight), image_png=png_bytes(thumb),
                overlay_png=png_bytes(overlay(seen, cam))))
        explanations.append(SmearExplanation(
            smear_id=str(smear.smear_id), score_name=score_name, score=float(smear.score),
            threshold=float(smear.threshold), call=str(smear.call), n_cells=int(len(members)), cells=gallery))
    return explanations


def _thumbnail(image: Image.Image) -> Image.Image:
    copy = image.convert("RGB").copy()
    copy.thumbnail((THUMBNAIL, THUMBNAIL))
    return copy


def _input_view(tensor: torch.Tensor, input_spec: dict) -> np.ndarray:
    """The network's input (crop, size) back as 8-bit RGB, so a heat map lies exactly over what it explains."""
    mean = torch.tensor(input_spec["mean"]).view(3, 1, 1)
    std = torch.tensor(input_spec["std"]).view(3, 1, 1)
    rgb = (tensor.float() * std + mean).clamp(0, 1).mul(255).round().byte()
    return rgb.permute(1, 2, 0).numpy()


def explain_cells(model: TrainedModel, rule: SmearRule, aggregator: MILAggregator | None, cells: pd.DataFrame, *,
                  cells_per_smear: int = 6, name_cells: bool = True) -> list[SmearExplanation]:
    """Classify the cells of ``cells`` (``path``, ``smear_id``), call their smears with ``rule`` and explain them."""
    from smearnet.data.decode import load_rgb
    from smearnet.smear.calls import call_cells, cell_outputs_for_images

    images = [load_rgb(Path(path)) for path in cells["path"]]
    probabilities, embeddings = cell_outputs_for_images(model, images, embeddings=rule.uses_mil)
    table, smears = call_cells(rule, aggregator, model.classes, cells["smear_id"], probabilities,
                               embeddings=embeddings)
    table.insert(0, "path", list(cells["path"]))
    by_path = dict(zip(cells["path"].astype(str), images, strict=False))
    return explain_smears(model, rule.positive_class, rule.score, table, smears, load_image=by_path.__getitem__,
                          cells_per_smear=cells_per_smear, name_cells=name_cells)
