import json

import pytest
import torch

from conftest import colour_cells
from smearnet.config import compose_config
from smearnet.models.inference import load_trained, predict_probabilities
from smearnet.errors import SmearnetError
from smearnet.data.loaders import StainAugment
from smearnet.models.optim import build_optimizer, build_schedule, triangular_cyclic_lr
from smearnet.models.samplers import ClassBalancedSampler, EpochShuffleSampler
from smearnet.models.settings import TrainRecipe, TrainSettings
from smearnet.models.training import (CellClassifier, reset_checkpoint_dir, resumable_checkpoint, run_fingerprint,
                                      train_backbone)

RECIPE = {"lr_min": 1e-4, "lr_max": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8}


def test_cyclic_lr_hits_bounds_at_the_right_steps():
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = triangular_cyclic_lr(optimizer, 1e-3, 1e-2, steps_per_cycle=10)
    lrs = []
    for _ in range(21):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-3) and lrs[5] == pytest.approx(1e-2)
    assert lrs[10] == pytest.approx(1e-3) and lrs[15] == pytest.approx(1e-2) and lrs[20] == pytest.approx(1e-3)
    assert max(lrs) == pytest.approx(1e-2) and min(lrs) == pytest.approx(1e-3)


def test_onecycle_warms_up_to_lr_max_then_anneals_to_lr_min():
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], {**RECIPE, "optimizer": "adamw",
                                                                        "weight_decay": 0.05})
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 0.05
    scheduler = build_schedule(optimizer, {**RECIPE, "schedule": "onecycle", "warmup_fraction": 0.2},
                               steps_per_cycle=10, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-4) and max(lrs) == pytest.approx(1e-2) and lrs.index(max(lrs)) in (19, 20)
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05) and all(a >= b for a, b in zip(lrs[20:], lrs[21:]))


def test_sgd_uses_nesterov_momentum_and_unknown_names_fail():
    sgd = build_optimizer([torch.nn.Parameter(torch.zeros(1))], {**RECIPE, "optimizer": "sgd"})
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.9
    adam = build_optimizer([torch.nn.Parameter(torch.zeros(1))], RECIPE)  # the paper's default
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["weight_decay"] == 0.0
    with pytest.raises(SmearnetError, match="train.optimizer"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], {**RECIPE, "optimizer": "lamb"})
    with pytest.raises(SmearnetError, match="train.schedule"):
        build_schedule(adam, {**RECIPE, "schedule": "cosine"}, 10, 100)


def test_label_smoothing_and_channels_last_reach_the_module():
    model_cfg = {"name": "r", "arch": "resnet18", "input_size": [32, 32], "pretrained": False,
                 "allow_random_init": True}
    module = CellClassifier(model_cfg, {**RECIPE, "label_smoothing": 0.1, "channels_last": True}, ["a", "b"])
    assert module.loss.label_smoothing == 0.1
    assert module.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert module(torch.randn(2, 3, 32, 32)).shape == (2, 2)


def test_balanced_class_weights_weigh_the_training_loss_and_leave_the_checkpoint_loadable(tmp_path):
    model_cfg = {"name": "r", "arch": "resnet18", "input_size": [32, 32], "pretrained": False,
                 "allow_random_init": True}
    module = CellClassifier(model_cfg, {**RECIPE, "label_smoothing": 0.1}, ["a", "b"], class_weights=[0.5, 5.0])
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 0, 1])
    with torch.no_grad():
        logits = module(images)
        loss = float(module.training_loss(logits, targets))
    weighted = torch.nn.functional.cross_entropy(logits, targets, weight=torch.tensor([0.5, 5.0]), label_smoothing=0.1)
    plain = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=0.1)
    assert loss == pytest.approx(float(weighted), rel=1e-5) and float(weighted) != pytest.approx(float(plain), rel=1e-3)
    # The weights are hyperparameters, not state: the state dict is the network's alone, and a checkpoint reloads.
    assert all(key.startswith("net.") for key in module.state_dict())
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.0"}, path)
    again = CellClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    assert again.class_weights.tolist() == [0.5, 5.0]


def test_checkpoint_is_resumed_only_for_the_same_run(tmp_path):
    folder = tmp_path / "ckpt"
    fingerprint = run_fingerprint({"a": 1})
    reset_checkpoint_dir(folder, fingerprint)
    (folder / "last.ckpt").write_bytes(b"x")
    assert resumable_checkpoint(folder, fingerprint) == folder / "last.ckpt"
    assert resumable_checkpoint(folder, run_fingerprint({"a": 2})) is None
    reset_checkpoint_dir(folder, run_fingerprint({"a": 2}))
    assert not (folder / "last.ckpt").exists()


def tiny_settings(*overrides: str) -> TrainSettings:
    cfg = compose_config(["model=resnet18", "model.resnet18.input_size=[32,32]", "data.classes=[red,green,blue]",
                          "train.batch_size=8", "train.cycles=3", "trainer.deterministic=true", *overrides])
    return TrainSettings.from_params(cfg, "resnet18")


def test_train_settings_are_parsed_once_and_frozen():
    settings = tiny_settings("train.betas=[0.8,0.99]", "trainer.devices=[0,1]")
    assert settings.backbone == "resnet18" and settings.model["name"] == "resnet18"
    assert settings.classes == ("red", "green", "blue") and settings.seed == 42
    assert settings.recipe.betas == (0.8, 0.99) and settings.recipe.to_dict()["betas"] == [0.8, 0.99]
    assert settings.trainer.devices == (0, 1) and settings.trainer.to_dict()["devices"] == [0, 1]
    assert set(settings.mlflow) == {"tracking_uri", "experiment"}
    assert "models" not in settings.recipe.to_dict()  # adding a backbone changes no other backbone's settings
    with pytest.raises(AttributeError):
        settings.seed = 1
    with pytest.raises(SmearnetError, match="Backbone `vit_huge` is not configured"):
        TrainSettings.from_params(compose_config([]), "vit_huge")
    assert TrainRecipe.from_mapping({"batch_size": 4, "cycles": 1, "lr_min": 0.1, "lr_max": 1}).optimizer == "adam"


def test_the_sampler_and_stain_augmentation_are_part_of_the_frozen_recipe():
    assert tiny_settings().recipe.stain_augment == StainAugment(enabled=True)  # the demo recipe jitters colour
    default = tiny_settings("train.stain_augment.enabled=false").recipe
    assert default.sampler == "shuffle" and default.stain_augment == StainAugment() and not default.stain_augment.enabled
    assert default.class_weights == "none"
    recipe = tiny_settings("train.sampler=balanced", "train.stain_augment.enabled=true",
                           "train.stain_augment.hue=4", "train.class_weights=balanced").recipe
    assert recipe.sampler == "balanced" and recipe.stain_augment == StainAugment(enabled=True, hue=4.0)
    assert recipe.class_weights == "balanced"
    # In the run's fingerprint, its checkpoint's hyperparameters and its MLflow params, as plain values.
    assert recipe.to_dict()["stain_augment"] == {**default.to_dict()["stain_augment"], "enabled": True, "hue": 4.0}
    assert run_fingerprint(recipe.to_dict()) != run_fingerprint(default.to_dict())
    with pytest.raises(AttributeError):
        recipe.stain_augment.enabled = False


@pytest.mark.parametrize("overrides, sampler, jittered", [
    (("train.stain_augment.enabled=false",), EpochShuffleSampler, False),
    (("train.sampler=balanced", "train.stain_augment.enabled=true"), ClassBalancedSampler, True)])
def test_train_backbone_builds_its_training_loader_from_the_recipe(overrides, sampler, jittered, colour_split,
                                                                   tmp_path, monkeypatch):
    class Built(Exception):
        pass

    def capture(dataset, **kwargs):
        raise Built(dataset, kwargs)

    monkeypatch.setattr("smearnet.models.training.DataLoader", capture)  # the training loader only
    train, val = colour_split
    with pytest.raises(Built) as built:
        train_backbone(tiny_settings(*overrides), train, val, tmp_path / "model", tmp_path / "ckpt", progress=False)
    dataset, kwargs = built.value.args
    assert type(kwargs["sampler"]) is sampler and len(kwargs["sampler"]) == len(train)
    assert (dataset.colour is not None) is jittered


def test_reported_validation_figures_are_those_of_the_shipped_checkpoint(colour_split, tmp_path, mlflow_uri,
                                                                       monkeypatch):
    """The train stage ships the lowest-validation-loss checkpoint; its metrics must describe those weights, not the
    last epoch. The validation loss is made to rise every epoch, so the first epoch's weights are shipped."""
    import torch

    class RisingValidationLoss(torch.nn.CrossEntropyLoss):
        calls = 0

        def forward(self, logits, targets):
            loss = super().forward(logits, targets)
            if torch.is_grad_enabled():  # training: the real loss
                return loss
            RisingValidationLoss.calls += 1
            return loss + 100.0 * RisingValidationLoss.calls

    monkeypatch.setattr("smearnet.models.training.torch.nn.CrossEntropyLoss", RisingValidationLoss)
    train, val = colour_split
    metrics = train_backbone(tiny_settings("train.lr_max=0.00003"), train, val, tmp_path / "model", tmp_path / "ckpt",
                             progress=False)
    assert metrics["best_epoch"] == 1 and metrics["epochs"] == 3
    model = load_trained(tmp_path / "model")
    calls = predict_probabilities(model, val, progress=False).argmax(1)
    shipped = float((calls == [model.classes.index(x) for x in val["label"]]).mean())
    assert metrics["val_accuracy"] == pytest.approx(shipped, abs=1e-6)
    low, high = metrics["val_accuracy_interval"]
    assert metrics["val_cells"] == len(val) and low <= shipped <= high
    assert "last_val_accuracy" in metrics  # the last epoch's, beside (here 0.58 shipped vs 0.75 last on an AVX2 EPYC)


def test_the_run_fingerprint_ignores_the_other_backbones():
    one, two = tiny_settings(), tiny_settings("model=[resnet18,lightcnn]")
    assert one == two  # so train@resnet18 resumes (and DVC keeps it) when lightcnn is added


@pytest.fixture
def colour_split(tmp_path):
    labels = ["red", "green", "blue"] * 16
    train = colour_cells(tmp_path / "train", labels, [f"p{i}" for i in range(48)], size=32, seed=1)
    val = colour_cells(tmp_path / "val", labels[:12], [f"v{i}" for i in range(12)], size=32, seed=2)
    return train, val


def test_train_backbone_learns_and_logs_its_weights_with_the_run(colour_split, tmp_path, mlflow_uri):
    import mlflow

    train, val = colour_split
    metrics = train_backbone(tiny_settings(), train, val, tmp_path / "model", tmp_path / "ckpt", progress=False)
    assert metrics["val_accuracy"] >= 0.9 and metrics["global_steps"] == 3 * 6
    model = load_trained(tmp_path / "model")
    probabilities = predict_probabilities(model, val, progress=False)
    assert (probabilities.argmax(1) == [model.classes.index(x) for x in val["label"]]).mean() >= 0.9
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    run = mlflow.get_run(meta["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "val/loss" in run.data.metrics
    assert run.data.tags["backbone"] == "resnet18" and "smearnet.pipeline_run" in run.data.tags
    logged = {item.path for item in mlflow.MlflowClient().list_artifacts(run.info.run_id, "model_dir")}
    assert {"model_dir/weights.safetensors", "model_dir/model.json"} <= logged
    # Only the register stage registers a version (the selected backbone with its smear rule).
    assert not mlflow.MlflowClient().search_model_versions("name='test-training-resnet18'")

    # The same finished run asked again (DVC re-runs `train` when code it imports changed) trains nothing and
    # reports the run's own metrics and best weights, not what a resumed, already-complete fit would show.
    weights = (tmp_path / "model" / "weights.safetensors").read_bytes()
    (tmp_path / "model" / "weights.safetensors").unlink()
    again = train_backbone(tiny_settings(), train, val, tmp_path / "model", tmp_path / "ckpt", progress=False)
    assert again == metrics and again["resumed"] is False
    assert (tmp_path / "model" / "weights.safetensors").read_bytes() == weights
    assert json.loads((tmp_path / "model" / "model.json").read_text())["mlflow_run_id"] == meta["mlflow_run_id"]
    # Checkpoints are loaded weights-only: tensors and plain values, no pickled code.
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert "models" not in checkpoint["hyper_parameters"]["train_cfg"]
