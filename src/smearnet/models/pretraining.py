"""Cell-domain starting weights (DVC stage `pretrain@<backbone>`).

Where no model hub can be reached every backbone would start from random weights, and a hospital's own dataset is
small. This stage trains the configured backbone once on a class-per-folder collection of cells (``pretrain.root``;
the PBC set of 8 CellaVision classes under ``experiment=finetune``), supervised on the folder labels, contrastive
(SimCLR, no labels) or both (``pretrain.train.objective``, smearnet.models.contrastive), and writes its weights
(safetensors), ``model.json`` and a model card with the validation accuracy of the features' k-NN vote (the one
figure every objective has). ``model.<name>.cell_weights`` then points the train stage at
them (`smearnet.models.factory`: the head is reset, and ImageNet weights, when configured, take precedence).

Cells are checked by the ingest checks (undecodable, too small and duplicate files are left out and counted);
the validation cells are chosen by content digest, so the choice depends neither on file order nor on any key.
"""

from __future__ import annotations

import datetime
import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from smearnet.config import model_config, plain
from smearnet.data.ingest import validate_manifest
from smearnet.data.sources import manifest_from_folder
from smearnet.errors import SmearnetError
from smearnet.evaluation.benchmark import device_name
from smearnet.evaluation.metrics import accuracy_interval
from smearnet.io import read_json, write_json, write_text
from smearnet.models.inference import META_FILE
from smearnet.models.settings import TrainerSettings, TrainRecipe, TrainSettings
from smearnet.models.training import train_backbone

CARD_JSON = "card.json"
CARD_MD = "MODEL_CARD.md"


@dataclass(frozen=True)
class PretrainSettings:
    """The `pretrain` section for one backbone, parsed once at the stage's edge."""

    enabled: bool
    root: str
    classes: tuple[str, ...] | None       # None: every class folder under root
    exclude_classes: tuple[str, ...]      # held out of pretraining (e.g. to measure transfer to them)
    val_fraction: float
    model: Mapping[str, Any]              # `model.<backbone>` without `cell_weights` (pretraining starts afresh)
    recipe: TrainRecipe
    trainer: TrainerSettings
    seed: int
    mlflow: Mapping[str, Any]

    @classmethod
    def from_params(cls, params: Mapping[str, Any], backbone: str) -> PretrainSettings:
        pre = plain(params["pretrain"])
        fraction = float(pre["val_fraction"])
        if not 0.0 < fraction < 1.0:
            raise SmearnetError(f"`pretrain.val_fraction` is {fraction}; it must lie strictly between 0 and 1.",
                                "e.g. pretrain.val_fraction=0.1.")
        return cls(enabled=bool(pre["enabled"]), root=str(pre["root"]),
                   classes=tuple(str(c) for c in pre["classes"]) if pre.get("classes") else None,
                   exclude_classes=tuple(str(c) for c in pre.get("exclude_classes") or ()),
                   val_fraction=fraction, model={**model_config(params, backbone), "cell_weights": None},
                   recipe=TrainRecipe.from_mapping(pre["train"]),
                   trainer=TrainerSettings.from_mapping(params["trainer"]), seed=int(params["seed"]),
                   mlflow={key: plain(params["mlflow"][key]) for key in ("tracking_uri", "experiment")})

    @property
    def backbone(self) -> str:
        return str(self.model["name"])


def pretraining_cells(root: Path, classes: Sequence[str] | None, exclude: Sequence[str], *,
                      workers: int = 2, progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """The accepted cells of the class folders under `root` (less `exclude`) and what was left out, as counts."""
    if not root.is_dir():
        raise SmearnetError(f"The pretraining folder {root} does not exist.",
                            "point `pretrain.root` at a folder with one sub-folder of images per class "
                            "(e.g. ../shared/data/pbc), or set pretrain.enabled=false.")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    wanted = list(classes) if classes else found
    unknown = sorted(set(wanted) - set(found)) + sorted(set(exclude) - set(found))
    if unknown:
        raise SmearnetError(f"`pretrain` names class folder(s) {unknown} that {root} does not hold; "
                            f"it holds {found}.", "fix pretrain.classes / pretrain.exclude_classes.")
    kept = [name for name in wanted if name not in set(exclude)]
    if len(kept) < 2:
        raise SmearnetError(f"Pretraining needs at least two classes; {kept} remain after exclusions.",
                            "exclude fewer classes from pretraining.")
    result = validate_manifest(manifest_from_folder(root, kept), kept, on_bad_row="quarantine",
                               duplicates="quarantine", workers=workers, progress=progress)
    left_out = result.quarantined["check"].value_counts().to_dict() if len(result.quarantined) else {}
    return result.accepted, {str(k): int(v) for k, v in left_out.items()}


def split_for_pretraining(cells: pd.DataFrame, val_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and validation cells: in each class, the `val_fraction` of cells with the lowest content digest."""
    order = cells.sort_values(["label", "sha256"])
    rank = order.groupby("label").cumcount()
    size = order.groupby("label")["label"].transform("size")
    is_val = rank < (size * val_fraction).round().clip(lower=1)
    return order[~is_val], order[is_val]


def pretrain_backbone(settings: PretrainSettings, out_dir: Path, checkpoint_dir: Path, *,
                      progress: bool = True) -> dict:
    """Pretrain as `settings` says; write weights, model.json and the model card to `out_dir`; return the card.

    Disabled, it writes only a card saying so (the train stage then starts as `model.<name>` says).
    """
    if not settings.enabled:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)  # DVC's declared (persisted) output, empty
        card = {"enabled": False, "backbone": settings.backbone}
        write_json(card, out_dir / CARD_JSON)
        write_text(f"# No cell-domain pretraining for {settings.backbone}\n\n`pretrain.enabled` is false: the train "
                   "stage starts from ImageNet weights or random init, as `model.<name>` configures.\n",
                   out_dir / CARD_MD)
        return card
    root = Path(settings.root)
    started = time.perf_counter()
    cells, left_out = pretraining_cells(root, settings.classes, settings.exclude_classes, progress=progress)
    train, val = split_for_pretraining(cells, settings.val_fraction)
    classes = tuple(sorted(cells["label"].unique()))
    train_settings = TrainSettings(backbone=settings.backbone, model=settings.model, classes=classes,
                                   recipe=settings.recipe, trainer=settings.trainer, seed=settings.seed,
                                   mlflow=settings.mlflow)
    source = f"{root.as_posix()} (class folders)"
    metrics = train_backbone(train_settings, train, val, out_dir, checkpoint_dir, progress=progress,
                             stage="pretrain", sources={"train": source, "val": source})
    if not metrics:  # a DDP rank other than 0
        return {}
    meta = read_json(out_dir / META_FILE)
    knn = features_knn_accuracy(out_dir, train, val)
    # A contrastive run trains no classifier: its head's accuracy means nothing, the features' k-NN accuracy does.
    supervised = settings.recipe.objective != "contrastive"
    card = {
        "enabled": True, "backbone": settings.backbone, "arch": settings.model["arch"],
        "input_size": list(settings.model["input_size"]), "center_crop": settings.model.get("center_crop", 1.0),
        "data": {"root": root.as_posix(), "classes": list(classes), "excluded_classes": list(settings.exclude_classes),
                 "train_cells": int(len(train)), "val_cells": int(len(val)),
                 "cells_per_class": {str(k): int(v) for k, v in cells["label"].value_counts().sort_index().items()},
                 "left_out": left_out, "content_digest": _content_digest(cells)},
        "recipe": settings.recipe.to_dict(), "precision": settings.trainer.precision,
        "objective": settings.recipe.objective,
        "val_accuracy": metrics["val_accuracy"] if supervised else None,
        "val_accuracy_interval": metrics["val_accuracy_interval"] if supervised else None,
        "val_macro_f1": metrics["val_macro_f1"] if supervised else None,
        "knn_val_accuracy": knn,
        "knn_val_accuracy_interval": accuracy_interval(knn, len(val)),
        "epochs": metrics["epochs"], "best_epoch": metrics["best_epoch"],  # the shipped weights: lowest val loss
        "train_seconds": metrics["train_seconds"], "stage_seconds": round(time.perf_counter() - started, 1),
        "device": device_name(), "date": datetime.date.today().isoformat(),
        "mlflow_run_id": meta["mlflow_run_id"], "resumed": metrics["resumed"],
    }
    write_json(card, out_dir / CARD_JSON)
    write_text(model_card_markdown(card), out_dir / CARD_MD)
    _log_card(settings.mlflow, card["mlflow_run_id"], out_dir)
    return card


def features_knn_accuracy(model_dir: Path, train: pd.DataFrame, val: pd.DataFrame, k: int = 20) -> float:
    """Validation accuracy of a k-nearest-neighbour vote over the training cells' features (the classifier's input)
    of the weights in `model_dir`: one yardstick for supervised and self-supervised features alike."""
    from smearnet.models.contrastive import knn_accuracy
    from smearnet.models.embeddings import cell_embeddings
    from smearnet.models.inference import load_trained

    model = load_trained(model_dir)

    def embedded(cells: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        targets = torch.tensor([model.classes.index(label) for label in cells["label"]])
        return torch.from_numpy(cell_embeddings(model, cells, batch_size=64)), targets

    return knn_accuracy(*embedded(train), *embedded(val), k=k)


def model_card_markdown(card: Mapping[str, Any]) -> str:
    """The model card a reader opens first: what the weights saw, how they were trained, how good they are."""
    data, recipe = card["data"], card["recipe"]
    knn_low, knn_high = card["knn_val_accuracy_interval"]
    if card["val_accuracy"] is None:
        head = "- No classifier was trained (`objective: contrastive`, no labels): the k-NN figure is the one to read."
    else:
        low, high = card["val_accuracy_interval"]
        head = (f"- Accuracy {card['val_accuracy']:.4f} (95% Wilson interval {low:.4f}-{high:.4f}) on "
                f"{data['val_cells']} cells; macro-F1 {card['val_macro_f1']:.4f}; {card['epochs']} epochs, the weights "
                f"of epoch {card['best_epoch']} (lowest validation loss).")
    per_class = ", ".join(f"{k} {v}" for k, v in data["cells_per_class"].items())
    left_out = ", ".join(f"{v} {k}" for k, v in data["left_out"].items()) or "none"
    return "\n".join([
        f"# Cell-domain starting weights: {card['backbone']} ({card['arch']})",
        "",
        f"Trained {card['date']} on {card['device']} by the `pretrain` stage; used by `experiment=finetune` through "
        "`model.<name>.cell_weights` (the classifier head is reset for the task's classes).",
        "",
        "## Data",
        f"- Folder `{data['root']}`: {data['train_cells']} training and {data['val_cells']} validation cells "
        f"(validation: the lowest content digests of each class). Content digest {data['content_digest'][:16]}.",
        f"- Classes: {per_class}. Held out of pretraining: {', '.join(data['excluded_classes']) or 'none'}.",
        f"- Left out by the ingest checks: {left_out}.",
        "- The folder's own README states its source and licence; cite it wherever these weights are used.",
        "",
        "## Recipe",
        f"- Input {card['input_size'][0]}x{card['input_size'][1]} px, centre crop {card['center_crop']}, "
        f"precision {card['precision']}.",
        f"- {recipe['cycles']} passes, batch {recipe['batch_size']}, {recipe['optimizer']} + {recipe['schedule']}, "
        f"lr {recipe['lr_min']}..{recipe['lr_max']}, weight decay {recipe['weight_decay']}, "
        f"label smoothing {recipe['label_smoothing']}, flips/rotations {recipe['dihedral_augment']}.",
        f"- Objective {card['objective']}" + ("" if card["objective"] == "supervised" else
                                              f" (SimCLR NT-Xent, temperature {recipe['contrastive_temperature']}, "
                                              f"random crops down to {recipe['contrastive_crop']} of the side)") + ".",
        "",
        "## Accuracy (validation cells of the pretraining classes)",
        head,
        f"- Features alone: a 20-nearest-neighbour vote among the training cells' features is right for "
        f"{card['knn_val_accuracy']:.4f} (95% Wilson interval {knn_low:.4f}-{knn_high:.4f}) of validation cells.",
        f"- Training time {card['train_seconds']:.0f} s (stage {card['stage_seconds']:.0f} s). MLflow run "
        f"`{card['mlflow_run_id']}`.",
        "",
    ])


def _content_digest(cells: pd.DataFrame) -> str:
    return hashlib.sha256("\n".join(sorted(cells["sha256"])).encode()).hexdigest()


def _log_card(mlflow_cfg: Mapping[str, Any], run_id: str, out_dir: Path) -> None:
    import mlflow

    from smearnet.tracking.runs import setup_mlflow

    setup_mlflow(mlflow_cfg)
    client = mlflow.MlflowClient()
    for name in (CARD_MD, CARD_JSON):
        client.log_artifact(run_id, str(out_dir / name), artifact_path="model_dir")
