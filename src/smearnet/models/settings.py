"""The train stage's settings: parsed once from its slice of params.yaml into frozen dataclasses, so the
training code below the stage never sees a DictConfig."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from smearnet.config import model_config, plain
from smearnet.errors import SmearnetError
from smearnet.data.loaders import StainAugment
from smearnet.models.hardware import training_precision


@dataclass(frozen=True)
class TrainRecipe:
    """The `train.*` keys one backbone's training reads. `train.models` is not one of them: adding a backbone
    re-trains none of the others (dvc.yaml declares these keys one by one for `train@<backbone>`)."""

    batch_size: int
    cycles: int
    lr_min: float
    lr_max: float
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-08
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "triangular"
    warmup_fraction: float = 0.15
    label_smoothing: float = 0.0
    channels_last: bool = False
    limit_train_batches: int | float | None = None
    patience: int | None = None
    cache_images: bool = True
    dihedral_augment: bool = False
    sampler: str = "shuffle"                            # smearnet.models.samplers.SAMPLERS
    class_weights: str = "none"                         # smearnet.models.samplers.CLASS_WEIGHTS
    stain_augment: StainAugment = StainAugment()        # off
    objective: str = "supervised"                       # smearnet.models.contrastive.OBJECTIVES
    contrastive_temperature: float = 0.2                # NT-Xent temperature (contrastive, both)
    contrastive_crop: float = 0.6                       # smallest random crop side, a fraction of the image

    @classmethod
    def from_mapping(cls, train: Mapping[str, Any]) -> TrainRecipe:
        values = {field.name: train[field.name] if field.default is MISSING else train.get(field.name, field.default)
                  for field in fields(cls)}
        return cls(**{**values, "betas": tuple(float(b) for b in values["betas"]), "sampler": str(values["sampler"]),
                      "class_weights": str(values["class_weights"]),
                      "objective": str(values["objective"]),
                      "stain_augment": StainAugment.from_mapping(values["stain_augment"])})

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples): the checkpoint's hyperparameters, the run fingerprint, MLflow params."""
        return {**asdict(self), "betas": list(self.betas)}


@dataclass(frozen=True)
class TrainerSettings:
    """The `trainer` section: devices, nodes, strategy, precision, determinism, loader workers."""

    accelerator: str = "cpu"
    devices: int | str | tuple[int, ...] = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    sync_batchnorm: bool = False
    deterministic: bool = True
    num_workers: int = 0

    @classmethod
    def from_mapping(cls, trainer: Mapping[str, Any]) -> TrainerSettings:
        """From the `trainer` section; `precision: auto` becomes bf16-mixed where this machine runs bf16 natively,
        else 32-true (`smearnet.models.hardware.training_precision`), so what is recorded is what ran."""
        values = {field.name: trainer[field.name] for field in fields(cls)}
        values["precision"] = training_precision(values["precision"], str(values["accelerator"]))
        if isinstance(values["devices"], (list, tuple)):
            values["devices"] = tuple(values["devices"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        if isinstance(values["devices"], tuple):
            values["devices"] = list(values["devices"])
        return values


@dataclass(frozen=True)
class TrainSettings:
    """Everything `train_backbone` reads, built once by the train stage from its declared parameters."""

    backbone: str
    model: Mapping[str, Any]      # `model.<backbone>` with its name (what smearnet.models.factory reads); plain
    classes: tuple[str, ...]
    recipe: TrainRecipe
    trainer: TrainerSettings
    seed: int
    mlflow: Mapping[str, Any]     # `mlflow.tracking_uri` and `mlflow.experiment`; plain

    @classmethod
    def from_params(cls, params: Mapping[str, Any], backbone: str) -> TrainSettings:
        """From the stage's parameters (`smearnet.config.stage_params`, or a composed configuration in tests):
        `seed`, `data.classes`, `model.<backbone>`, the recipe's `train.*` keys, `trainer`, `mlflow`."""
        recipe = TrainRecipe.from_mapping(params["train"])
        if recipe.objective == "contrastive":
            raise SmearnetError("`train.objective=contrastive` trains no classifier, so the train stage has nothing "
                                "to evaluate.", "use it for cell-domain starting weights "
                                "(pretrain.train.objective=contrastive); train with supervised or both.")
        return cls(backbone=backbone, model=model_config(params, backbone),
                   classes=tuple(str(name) for name in params["data"]["classes"]),
                   recipe=recipe,
                   trainer=TrainerSettings.from_mapping(params["trainer"]), seed=int(params["seed"]),
                   mlflow={key: plain(params["mlflow"][key]) for key in ("tracking_uri", "experiment")})
