"""Cells in, smear calls out: what `smearnet predict`, the served model and the promotion gate share.

``cell_outputs_for_images`` runs a model's inference engine over decoded images (and, for a MIL rule, the
eager network for embeddings); ``call_cells`` applies a ``SmearRule`` through ``SmearRule.classify`` and
returns one row per cell carrying its smear's score, threshold and call and the cell's weight, plus one row
per smear.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from smearnet.errors import SmearnetError
from smearnet.models.inference import TrainedModel
from smearnet.models.embeddings import batch_embeddings
from smearnet.smear.mil import MILAggregator
from smearnet.smear.rule import RULE_FILE, SmearRule, load_rule


def served_rule(model_dir: Path, serving: Mapping) -> tuple[SmearRule, MILAggregator | None]:
    """The smear rule packaged with a model version (``smear_rule.json``).

    A version registered before smear rules were packaged carries only ``positive_class`` and
    ``smear_threshold`` in ``serving.json``: it is served with the share rule it was measured with. A
    ``serving.json`` that names another score (``smear_score``) but lost its ``smear_rule.json`` is refused: its
    threshold belongs to that score.
    """
    if (Path(model_dir) / RULE_FILE).is_file():
        return load_rule(Path(model_dir))
    named = serving.get("smear_score", "share_predicted_positive")
    if named != "share_predicted_positive":
        raise SmearnetError(f"{model_dir} names the smear score {named!r} but carries no {RULE_FILE}.",
                            "download the whole version again (models:/...), or re-register it (register stage).")
    if "smear_threshold" in serving and "positive_class" in serving:
        return SmearRule(score="share_predicted_positive", positive_class=str(serving["positive_class"]),
                         threshold=float(serving["smear_threshold"]),
                         threshold_from="serving.json of a version registered before smear rules"), None
    raise SmearnetError(f"{model_dir} carries no smear rule ({RULE_FILE}).",
                        "use a version registered by the register stage, or a workspace after `dvc repro smear`.")


@torch.inference_mode()
def cell_outputs_for_images(model: TrainedModel, images: Sequence, *,
                            embeddings: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Softmax probabilities (rows of NaN for ``None``, undecodable, entries) through the model's engine,
    and penultimate embeddings (rows of NaN likewise) when asked."""
    from smearnet.data.loaders import cell_tensor

    good = [i for i, image in enumerate(images) if image is not None]
    probabilities = np.full((len(images), len(model.classes)), np.nan, dtype=np.float32)
    features = None
    if good:
        batch = torch.stack([cell_tensor(images[i], model.input_spec) for i in good])
        probabilities[good] = torch.softmax(model.logits(batch), dim=1).numpy()
        if embeddings:
            values = batch_embeddings(model.net.eval(), batch).numpy()
            features = np.full((len(images), values.shape[1]), np.nan, dtype=np.float32)
            features[good] = values
    return probabilities, features


def call_cells(rule: SmearRule, aggregator: MILAggregator | None, classes: Sequence[str], smear_ids: Sequence,
               probabilities: np.ndarray, *, embeddings: np.ndarray | None = None,
               errors: Sequence[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per cell (``smear_id, predicted, prob_<class>..., cell_weight, smear_score, smear_threshold,
    smear_call, error``) and one row per smear (``SmearRule.classify``).

    ``predicted`` is the rule's cell call (``SmearRule.cell_calls``): the arg-max, or, when the rule carries a cell
    threshold, the positive class exactly when its calibrated probability reaches it. ``prob_<class>`` are the
    probabilities the rule calls by: the engine's, calibrated with the rule's temperature (the identity at T = 1),
    so a reader can check each call against ``prob_<positive>`` and the cell threshold the model card states.

    A cell that could not be decoded keeps its row with ``error`` set and no prediction; its smear is called
    on the other cells, or ``undetermined`` when none is left.
    """
    ids = [str(s) for s in smear_ids]
    smears, weights = rule.classify(ids, probabilities, classes, embeddings=embeddings, aggregator=aggregator)
    cells = pd.DataFrame({"smear_id": ids})
    cells["predicted"] = rule.cell_calls(probabilities, classes)
    calibrated = rule.calibrated(probabilities) if len(probabilities) else np.zeros((0, len(classes)), np.float32)
    for index, name in enumerate(classes):
        cells[f"prob_{name}"] = calibrated[:, index]
    cells["cell_weight"] = weights
    by_smear = smears.set_index("smear_id")
    cells["smear_score"] = cells["smear_id"].map(by_smear["score"]).astype(float)
    cells["smear_threshold"] = float(rule.threshold)
    cells["smear_call"] = cells["smear_id"].map(by_smear["call"])
    cells["error"] = list(errors) if errors is not None else ""
    return cells, smears

