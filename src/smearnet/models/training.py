"""Fine-tuning with Lightning: Adam + triangular cyclical LR (paper 1, Sections 2.4 and 3.2).

Single-process and data-parallel (``trainer.strategy=ddp``) runs train the same way:

- ``train.batch_size`` is per process; the global batch is ``batch_size * world_size``.
- Training images are drawn each epoch from ``seed + epoch`` (``train.sampler``, smearnet.models.samplers: a
  permutation, what DistributedSampler does, or a class-balanced draw), so N processes with batch B/N see the same
  images per step as one process with batch B, and a run resumed from ``last.ckpt`` sees the epochs in the order an
  uninterrupted run would.
- Global rank 0 alone resets the checkpoint folder, writes files and owns the (single) MLflow run.
"""

from __future__ import annotations

import hashlib
import os
import json
import math
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch.utils.data import DataLoader

from smearnet.errors import SmearnetError
from smearnet.evaluation.metrics import accuracy_interval
from smearnet.io import file_sha256
from smearnet.models.contrastive import (OBJECTIVES, TwoViews, global_pairs, nt_xent, projection_head,
                                         random_resized_crop)
from smearnet.models.embeddings import classifier_layer, logits_and_embeddings
from smearnet.models.factory import build_model
from smearnet.models.hardware import training_precision
from smearnet.models.optim import build_optimizer, build_schedule
from smearnet.models.samplers import loss_class_weights, training_sampler
from smearnet.models.settings import TrainSettings

RUN_ID_FILE = "mlflow_run_id.txt"
FINISHED_FILE = "finished.json"  # a completed run's metrics and best checkpoint, written after the weights
# What a checkpoint and its finished.json hold; part of the run fingerprint, so a run recorded in an older format is
# trained again rather than resumed or reused. 2: checkpoints carry their epoch's validation figures and the train
# stage reports the shipped (lowest-validation-loss) checkpoint's, not the last epoch's.
CHECKPOINT_FORMAT = 2


class CellClassifier(L.LightningModule):
    """A backbone with a head for `classes`, trained with cross-entropy (each class weighted by `class_weights`,
    when given: `train.class_weights`; a plain list in the hyperparameters, not a buffer, so the weights file and
    the checkpoint's state dict hold the network alone)."""

    def __init__(self, model_cfg: Mapping, train_cfg: Mapping, classes: Sequence[str],
                 class_weights: Sequence[float] | None = None):
        super().__init__()
        self.save_hyperparameters({"model_cfg": _plain(model_cfg), "train_cfg": _plain(train_cfg),
                                   "classes": list(classes),
                                   "class_weights": None if class_weights is None else [float(w) for w in class_weights]})
        self.classes = list(classes)
        self.train_cfg = _plain(train_cfg)
        self.net = build_model(model_cfg, num_classes=len(classes))
        self.class_weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        self.loss = torch.nn.CrossEntropyLoss(label_smoothing=float(self.train_cfg.get("label_smoothing") or 0.0))
        self.channels_last = bool(self.train_cfg.get("channels_last", False))
        self.saved_val_metrics: dict[str, float] = {}  # set when loaded from a checkpoint (on_load_checkpoint)
        self.saved_epoch: int | None = None
        if self.channels_last:  # NHWC: oneDNN's fast convolution layout on CPU (about 2x with bf16 here)
            self.net = self.net.to(memory_format=torch.channels_last)
        # `objective` (smearnet.models.contrastive): contrastive and both add a projection head beside the network,
        # fed by the features its classifier reads (smearnet.models.embeddings: one pass gives logits and features).
        self.objective = str(self.train_cfg.get("objective") or "supervised")
        if self.objective not in OBJECTIVES:
            raise SmearnetError(f"`objective` is {self.objective!r}; expected one of {list(OBJECTIVES)}.",
                                "e.g. pretrain.train.objective=contrastive.")
        if self.objective != "supervised":
            self.projection = projection_head(classifier_layer(self.net).in_features)
        n = len(classes)
        self.train_accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=n, average="micro")
        self.val_accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=n, average="micro")
        self.val_macro_f1 = torchmetrics.classification.MulticlassF1Score(num_classes=n, average="macro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self._layout(images))

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def logits_and_embeddings(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_and_embeddings(self.net, self._layout(images))

    def training_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with the module's label smoothing, each class weighted by `class_weights` when set
        (validation loss stays unweighted, so checkpoints are chosen on the cells as they come)."""
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        return torch.nn.functional.cross_entropy(logits, targets, weight=weight,
                                                 label_smoothing=self.loss.label_smoothing)

    def contrastive_loss(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """NT-Xent of the projected features of two views of the same cells, over the global batch under DDP."""
        first, second = global_pairs(self.projection(first), self.projection(second))
        return nt_xent(first, second, float(self.train_cfg["contrastive_temperature"]))

    def objective_loss(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One training batch's loss under the module's objective, and logits to score the batch's cells by.

        Supervised batches are (N, C, H, W); contrastive and both read TwoViews batches, (N, 2, C, H, W), crop each
        view at random and keep the pairs adjacent."""
        if self.objective == "supervised":
            logits = self(images)
            return self.training_loss(logits, targets), logits
        views = random_resized_crop(images.flatten(0, 1), float(self.train_cfg["contrastive_crop"]))
        logits, features = self.logits_and_embeddings(views)
        loss = self.contrastive_loss(features[0::2], features[1::2])
        if self.objective == "both":
            loss = loss + self.training_loss(logits, targets.repeat_interleave(2))
        else:  # the head takes no part: a zero term keeps DDP from waiting for its gradients
            loss = loss + 0.0 * logits.sum()
        return loss, logits[0::2]

    def training_step(self, batch, batch_idx):
        images, targets = batch
        loss, logits = self.objective_loss(images, targets)
        self.train_accuracy(logits, targets)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/accuracy", self.train_accuracy, on_step=False, on_epoch=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        images, targets = batch
        if self.objective != "contrastive":
            logits = self(images)
            self.log("val/loss", self.loss(logits, targets), on_epoch=True, prog_bar=True, sync_dist=True)
        else:
            logits, first = self.logits_and_embeddings(images)
            if len(images) > 1:  # no labels: how well each cell finds its own quarter-turned view among the batch
                _, second = self.logits_and_embeddings(torch.rot90(images, 1, dims=(2, 3)))
                self.log("val/loss", self.contrastive_loss(first, second), on_epoch=True, prog_bar=True,
                         sync_dist=True)
        self.val_accuracy(logits, targets)
        self.val_macro_f1(logits, targets)
        self.log("val/accuracy", self.val_accuracy, on_epoch=True, prog_bar=True)
        self.log("val/macro_f1", self.val_macro_f1, on_epoch=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the validation figures of the epoch whose weights are saved: the train stage reports those of the
        weights it ships (the lowest-validation-loss checkpoint), not the last epoch's."""
        checkpoint["val_metrics"] = {key: float(value) for key, value in self.trainer.callback_metrics.items()
                                     if key.startswith("val/")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.saved_val_metrics = dict(checkpoint.get("val_metrics") or {})
        self.saved_epoch = checkpoint.get("epoch")

    def configure_optimizers(self):
        cfg = self.train_cfg
        steps_per_cycle = max(2, math.ceil(self.trainer.estimated_stepping_batches / max(1, self.trainer.max_epochs)))
        optimizer = build_optimizer(self.parameters(), cfg)
        scheduler = build_schedule(optimizer, cfg, steps_per_cycle, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class TimmSyncBatchNorm(TorchSyncBatchNorm):
    """Lightning's sync-BatchNorm plugin, converting with timm so BatchNormAct2d keeps its activation.

    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (Lightning's default) replaces timm's BatchNormAct2d by a
    bare SyncBatchNorm and silently drops the activation fused into it (every BN+SiLU of EfficientNet-B8).
    """

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)

    def revert(self, model: torch.nn.Module) -> torch.nn.Module:
        from timm.layers import BatchNormAct2d, SyncBatchNormAct

        if not isinstance(model, SyncBatchNormAct):
            return super().revert(model)  # plain SyncBatchNorm; recurses into children through this method
        reverted = BatchNormAct2d(model.num_features, model.eps, model.momentum, model.affine,
                                  model.track_running_stats, apply_act=False)
        if model.affine:
            reverted.weight, reverted.bias = model.weight, model.bias
        reverted.running_mean, reverted.running_var = model.running_mean, model.running_var
        reverted.num_batches_tracked = model.num_batches_tracked
        for name, child in model.named_children():  # the original `drop` and `act`
            reverted.add_module(name, self.revert(child))
        return reverted.train(model.training)


def build_trainer(trainer_cfg: Mapping, train_cfg: Mapping, checkpoint_dir: Path | None, *, logger=None,
                  enable_progress_bar: bool = True, progress_label: str = "training",
                  callbacks: Sequence = ()) -> L.Trainer:
    """A Lightning Trainer from `trainer` config: devices, nodes, strategy, precision, checkpoints.

    ``checkpoint_dir=None`` turns checkpointing and early stopping off (benchmarks, tests without validation).
    Progress goes to a terminal as Lightning's live bar; to a log (a CI job, `dvc exp run > log`), where that bar
    shows only its last frame, as one `EpochLines` line per epoch headed `progress_label`.
    """
    accelerator = str(trainer_cfg["accelerator"])
    sync_batchnorm = bool(trainer_cfg["sync_batchnorm"])
    if sync_batchnorm and accelerator == "cpu":
        raise SmearnetError("trainer.sync_batchnorm=true needs GPUs: torch's SyncBatchNorm refuses CPU tensors.",
                            "set trainer.sync_batchnorm=false for CPU runs (each process then normalises with "
                            "its own batch statistics).")
    own_callbacks: list[L.Callback] = []
    if checkpoint_dir is not None:
        own_callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor="val/loss", mode="min",
                                             save_top_k=1, save_last=True, every_n_epochs=1,
                                             auto_insert_metric_name=False))
        if train_cfg.get("patience"):
            own_callbacks.append(EarlyStopping(monitor="val/loss", patience=int(train_cfg["patience"])))
    live_bar = enable_progress_bar and sys.stdout.isatty()
    if enable_progress_bar and not live_bar:
        own_callbacks.append(EpochLines(progress_label))
    strategy = str(trainer_cfg["strategy"])
    if strategy == "ddp" and accelerator == "cpu":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="gloo")
    return L.Trainer(
        accelerator=accelerator, devices=trainer_cfg["devices"],
        num_nodes=int(trainer_cfg["num_nodes"]), strategy=strategy, precision=training_precision(trainer_cfg["precision"], accelerator),
        plugins=[TimmSyncBatchNorm()] if sync_batchnorm else None, deterministic=bool(trainer_cfg["deterministic"]),
        max_epochs=int(train_cfg["cycles"]), limit_train_batches=train_cfg.get("limit_train_batches") or 1.0,
        callbacks=[*own_callbacks, *callbacks], logger=logger if logger is not None else False,
        enable_checkpointing=checkpoint_dir is not None, enable_progress_bar=live_bar,
        enable_model_summary=False, log_every_n_steps=10, num_sanity_val_steps=0,
    )


def run_fingerprint(*parts) -> str:
    """Identity of a training run: same fingerprint means `last.ckpt` may be resumed."""
    text = json.dumps([_plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def starting_weights_digest(model_cfg: Mapping) -> str | None:
    """sha256 of the local file the network starts from (``weights_path`` or ``cell_weights``), if any: new
    starting weights at the same path make a new run, never a resumed or reused one."""
    path = model_cfg.get("weights_path") if model_cfg.get("pretrained") else model_cfg.get("cell_weights")
    path = Path(str(path)).expanduser() if path else None
    return file_sha256(path) if path is not None and path.is_file() else None


def resumable_checkpoint(checkpoint_dir: Path, fingerprint: str) -> Path | None:
    """`last.ckpt` when it was written by a run with this fingerprint (read-only; safe on every rank)."""
    stamp = checkpoint_dir / "fingerprint.txt"
    last = checkpoint_dir / "last.ckpt"
    if stamp.is_file() and stamp.read_text().strip() == fingerprint and last.is_file():
        return last
    return None


def finished_run(checkpoint_dir: Path, fingerprint: str) -> dict | None:
    """What a completed run with this fingerprint recorded (its metrics and best checkpoint), else None.

    Asking for the same run again (DVC re-runs `train` when code it imports changed) reuses that outcome: resuming
    a fit that already reached its last epoch would train nothing yet report the metrics of whatever Lightning
    restored, not the run's.
    """
    from smearnet.io import read_json

    stamp = checkpoint_dir / "fingerprint.txt"
    record = checkpoint_dir / FINISHED_FILE
    if not (stamp.is_file() and stamp.read_text().strip() == fingerprint and record.is_file()):
        return None
    finished = read_json(record)
    if finished.get("fingerprint") != fingerprint or not (checkpoint_dir / finished.get("best", "")).is_file():
        return None
    return finished


def reset_checkpoint_dir(checkpoint_dir: Path, fingerprint: str) -> None:
    """Empty the folder of another run's checkpoints and stamp it with this run's fingerprint."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for item in checkpoint_dir.iterdir():
        if item.is_dir():
            shutil.rmtree(item)
        else:
            item.unlink()
    (checkpoint_dir / "fingerprint.txt").write_text(fingerprint + "\n")


class EpochLines(L.Callback):
    """One line per finished epoch on stdout (global rank 0): losses, validation accuracy, time, time left.

    For logs, where a live progress bar shows nothing until training ends; `label` heads each line.
    """

    def __init__(self, label: str):
        self.label = label
        self.epoch_seconds: list[float] = []
        self._started = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):  # after the epoch's validation (Lightning 2)
        self.epoch_seconds.append(time.perf_counter() - self._started)
        if not trainer.is_global_zero:
            return
        print(epoch_line(self.label, trainer.current_epoch + 1, trainer.max_epochs, trainer.callback_metrics,
                         self.epoch_seconds), flush=True)


def epoch_line(label: str, epoch: int, epochs: int, metrics: Mapping, epoch_seconds: Sequence[float]) -> str:
    """`<label> epoch 3/30: train loss 0.812, val loss 0.640, val accuracy 0.913; 41 s, about 18.5 min left`."""
    shown = [(name, key) for name, key in (("train loss", "train/loss_epoch"), ("val loss", "val/loss"),
                                           ("val accuracy", "val/accuracy")) if key in metrics]
    figures = ", ".join(f"{name} {float(metrics[key]):.3f}" for name, key in shown)
    left = (epochs - epoch) * sum(epoch_seconds) / len(epoch_seconds)
    return (f"{label} epoch {epoch}/{epochs}: {figures or 'no metrics yet'}; {epoch_seconds[-1]:.0f} s, "
            f"about {left / 60:.1f} min left")


class Stopwatch(L.Callback):
    """Wall time of the training loop (validation and checkpointing excluded) and images trained, for images/s.

    Both travel in the checkpoint: a run resumed from `last.ckpt` reports the training its weights took over every
    attempt up to that checkpoint, not only the last attempt's.
    """

    def __init__(self):
        self.seconds = 0.0
        self.images = 0
        self._started: float | None = None

    def _resume(self) -> None:
        if self._started is None:
            self._started = time.perf_counter()

    def _pause(self) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._resume()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._resume()  # after a mid-epoch validation

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.images += int(batch[0].shape[0]) * trainer.world_size

    def on_validation_start(self, trainer, pl_module):
        self._pause()

    def on_train_epoch_end(self, trainer, pl_module):
        self._pause()

    def state_dict(self) -> dict:
        return {"seconds": self.seconds, "images": self.images}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seconds, self.images = float(state_dict["seconds"]), int(state_dict["images"])


def _plain(value):
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


TRAIN_SOURCES = {"train": "data/upsampled/manifest.csv", "val": "data/split/manifest.csv"}


def train_backbone(settings: TrainSettings, train_manifest, val_manifest, model_dir: Path, checkpoint_dir: Path,
                   *, progress: bool = True, stage: str = "train", sources: Mapping[str, str] = TRAIN_SOURCES) -> dict:
    """Train one backbone as `settings` says; write weights + model.json to `model_dir`; log to MLflow (rank 0).

    `stage` names the MLflow run (`<stage>-<backbone>`) and its tags; `sources` says where the train and val
    manifests come from (logged as the run's datasets).

    Resumes from `checkpoint_dir/last.ckpt`, continuing its MLflow run, when the previous attempt had the same
    settings and data. Returns the metrics written to metrics/train/<backbone>.json ({} on ranks other than 0).
    """
    import mlflow
    from lightning.pytorch.loggers import MLFlowLogger

    from smearnet.data.loaders import CellImages, make_loader
    from smearnet.models.inference import save_trained
    from smearnet.io import write_json, write_text
    from smearnet.models.factory import model_input_spec
    from smearnet.tracking.runs import log_dataset, revision_tags, setup_mlflow, stage_tags, tracking_uri

    name, model_cfg, recipe = settings.backbone, dict(settings.model), settings.recipe
    classes = list(settings.classes)
    train_cfg, trainer_cfg = recipe.to_dict(), settings.trainer.to_dict()
    input_spec = model_input_spec(model_cfg)
    seed = settings.seed
    L.seed_everything(seed, workers=True)
    data_hash = hashlib.sha256(pd_bytes(train_manifest) + pd_bytes(val_manifest)).hexdigest()[:16]
    fingerprint = run_fingerprint(model_cfg, train_cfg, trainer_cfg, classes, seed, data_hash,
                                  starting_weights_digest(model_cfg), CHECKPOINT_FORMAT)
    # Every rank decides before any rank writes (rank 0 resets only after this, and checkpoints only once all
    # ranks have joined the process group), so all ranks agree on resuming.
    resume_from = resumable_checkpoint(checkpoint_dir, fingerprint)
    run_id_file = checkpoint_dir / RUN_ID_FILE
    run_id = None
    if resume_from is not None and run_id_file.is_file():
        run_id = run_id_file.read_text().strip() or None

    finished = finished_run(checkpoint_dir, fingerprint)
    if finished is not None:
        return _reuse_finished_run(finished, checkpoint_dir, model_dir, name, model_cfg, classes, input_spec)

    batch_size = int(recipe.batch_size)
    workers = int(settings.trainer.num_workers)
    cache = bool(recipe.cache_images)
    train_images = CellImages(train_manifest, classes, input_spec, cache=cache and workers == 0,
                              dihedral=bool(recipe.dihedral_augment), stain=recipe.stain_augment)
    sampler = training_sampler(recipe.sampler, train_images.targets, seed)
    train_loader = DataLoader(train_images if recipe.objective == "supervised" else TwoViews(train_images),
                              batch_size=batch_size, sampler=sampler,
                              num_workers=workers, persistent_workers=workers > 0)
    val_loader = make_loader(val_manifest, classes, input_spec, batch_size=batch_size, shuffle=False,
                             num_workers=workers, cache=cache)

    setup_mlflow(settings.mlflow)
    experiment = str(settings.mlflow["experiment"])
    # Rank 0 nests the run under the pipeline execution's parent run (other DDP ranks log nothing).
    rank_zero = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"
    tags = (stage_tags(settings.mlflow, stage, backbone=name) if rank_zero
            else {**revision_tags(experiment=experiment), "stage": stage, "backbone": name})
    logger = MLFlowLogger(experiment_name=experiment, run_name=f"{stage}-{name}",
                          tracking_uri=tracking_uri(settings.mlflow), tags=tags, run_id=run_id)
    stopwatch = Stopwatch()
    trainer = build_trainer(trainer_cfg, train_cfg, checkpoint_dir, logger=logger, enable_progress_bar=progress,
                            progress_label=f"{stage}@{name}", callbacks=[stopwatch])
    if trainer.is_global_zero:  # the global rank is known from the environment before fit launches any process
        if resume_from is None:
            _end_abandoned_run(run_id_file)
            reset_checkpoint_dir(checkpoint_dir, fingerprint)
        write_text(logger.run_id + "\n", run_id_file)  # creates the run (rank 0 only; other ranks get a dummy)
        logger.log_hyperparams({"backbone": name, "arch": model_cfg["arch"], "input_size": list(model_cfg["input_size"]),
                                "pretrained": model_cfg["pretrained"], "train_images": len(train_manifest),
                                "val_images": len(val_manifest), "world_size": trainer.world_size,
                                "global_batch_size": batch_size * trainer.world_size,
                                **{f"train.{k}": v for k, v in train_cfg.items()},
                                **{f"trainer.{k}": v for k, v in trainer_cfg.items()}})
    module = CellClassifier(model_cfg, train_cfg, classes,
                            loss_class_weights(recipe.class_weights, train_images.targets, len(classes)))
    # Checkpoints hold tensors and plain values only (the hyperparameters are plain dicts): loaded weights-only, so
    # a tampered last.ckpt cannot run code.
    trainer.fit(module, train_loader, val_loader, ckpt_path=str(resume_from) if resume_from else None,
                weights_only=True)
    if not trainer.is_global_zero:
        return {}

    best_path = trainer.checkpoint_callback.best_model_path or str(checkpoint_dir / "last.ckpt")
    best = CellClassifier.load_from_checkpoint(best_path, map_location="cpu", weights_only=True)
    shipped = best.saved_val_metrics  # the saved weights' own validation figures (on_save_checkpoint)
    accuracy = shipped.get("val/accuracy", float("nan"))
    metrics = {
        "best_val_loss": float(trainer.checkpoint_callback.best_model_score or float("nan")),
        "val_accuracy": accuracy,
        "val_accuracy_interval": accuracy_interval(accuracy, len(val_manifest)),
        "val_cells": len(val_manifest),
        "val_macro_f1": shipped.get("val/macro_f1", float("nan")),
        "best_epoch": int(best.saved_epoch) + 1 if best.saved_epoch is not None else None,  # 1-based, as `epochs`
        "last_val_accuracy": float(trainer.callback_metrics.get("val/accuracy", float("nan"))),
        "epochs": int(trainer.current_epoch),
        "global_steps": int(trainer.global_step),
        "train_seconds": round(stopwatch.seconds, 2),
        "train_images": stopwatch.images,
        "train_images_per_second": round(stopwatch.images / stopwatch.seconds, 2) if stopwatch.seconds else 0.0,
        "resumed": bool(resume_from),
    }
    meta = {"name": name, "model_cfg": _plain(model_cfg), "classes": classes, "input_spec": input_spec,
            "fingerprint": fingerprint, "mlflow_run_id": logger.run_id, "metrics": metrics}
    save_trained(best.net, model_dir, meta)
    write_json({"fingerprint": fingerprint, "best": os.path.relpath(best_path, checkpoint_dir),
                "mlflow_run_id": logger.run_id, "metrics": metrics}, checkpoint_dir / FINISHED_FILE)
    client = mlflow.MlflowClient()
    client.log_metric(logger.run_id, "best_val_loss", metrics["best_val_loss"])
    if recipe.objective != "contrastive" and math.isfinite(metrics["val_accuracy"]):  # the shipped checkpoint's
        client.log_metric(logger.run_id, "shipped_val_accuracy", metrics["val_accuracy"])
    client.log_metric(logger.run_id, "train_images_per_second", metrics["train_images_per_second"])
    # The weights go to the run; only the register stage registers a version, the selected backbone with the
    # smear rule measured for it (one registered model per task, smearnet-<data.name>).
    client.log_artifacts(logger.run_id, str(model_dir), artifact_path="model_dir")
    for role, frame in (("train", train_manifest), ("val", val_manifest)):
        log_dataset(frame, name=role, context="training" if role == "train" else "validation",
                    source=sources[role], run_id=logger.run_id)
    return metrics


def _reuse_finished_run(finished: dict, checkpoint_dir: Path, model_dir: Path, name: str, model_cfg: Mapping,
                        classes: list, input_spec: dict) -> dict:
    """Write the finished run's best weights and its recorded metrics again (rank 0); nothing is retrained."""
    from smearnet.models.inference import save_trained

    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        return {}
    best = CellClassifier.load_from_checkpoint(checkpoint_dir / finished["best"], map_location="cpu",
                                               weights_only=True)
    metrics = dict(finished["metrics"])
    meta = {"name": name, "model_cfg": _plain(model_cfg), "classes": classes, "input_spec": input_spec,
            "fingerprint": finished["fingerprint"], "mlflow_run_id": finished["mlflow_run_id"], "metrics": metrics}
    save_trained(best.net, model_dir, meta)
    return metrics


def pd_bytes(frame) -> bytes:
    """Stable bytes of a manifest's paths (relative to the project, so a moved clone still resumes) and labels."""

    root = Path.cwd().resolve()
    return "\n".join(f"{os.path.relpath(p, root)}\t{l}" for p, l in zip(frame["path"], frame["label"])).encode()


def _end_abandoned_run(run_id_file: Path) -> None:
    """Mark the MLflow run of an attempt that left no resumable checkpoint KILLED instead of RUNNING forever."""
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id = run_id_file.read_text().strip() if run_id_file.is_file() else ""
    if not run_id:
        return
    client = mlflow.MlflowClient()
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")
    except MlflowException:  # the run lives in another tracking store, or was deleted
        pass
