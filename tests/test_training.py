import json

import pytest
import torch

from conftest import colour_cells
from smearnet.config import compose_config
from smearnet.inference import load_trained, predict_probabilities
from smearnet.training import (reset_checkpoint_dir, resumable_checkpoint, run_fingerprint, train_backbone,
                               triangular_cyclic_lr)


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


def test_checkpoint_is_resumed_only_for_the_same_run(tmp_path):
    folder = tmp_path / "ckpt"
    fingerprint = run_fingerprint({"a": 1})
    reset_checkpoint_dir(folder, fingerprint)
    (folder / "last.ckpt").write_bytes(b"x")
    assert resumable_checkpoint(folder, fingerprint) == folder / "last.ckpt"
    assert resumable_checkpoint(folder, run_fingerprint({"a": 2})) is None
    reset_checkpoint_dir(folder, run_fingerprint({"a": 2}))
    assert not (folder / "last.ckpt").exists()


def tiny_config(registry_name="test-training", **train):
    cfg = compose_config(["model=resnet18", "model.resnet18.input_size=[32,32]", "data.classes=[red,green,blue]",
                          "train.batch_size=8", "train.cycles=3", "trainer.deterministic=true",
                          f"registry.model_name={registry_name}"])
    for key, value in train.items():
        cfg.train[key] = value
    return cfg


@pytest.fixture
def colour_split(tmp_path):
    labels = ["red", "green", "blue"] * 16
    train = colour_cells(tmp_path / "train", labels, [f"p{i}" for i in range(48)], size=32, seed=1)
    val = colour_cells(tmp_path / "val", labels[:12], [f"v{i}" for i in range(12)], size=32, seed=2)
    return train, val


def test_train_backbone_learns_logs_and_registers(colour_split, tmp_path, mlflow_uri):
    import mlflow

    train, val = colour_split
    metrics = train_backbone(tiny_config(), "resnet18", train, val, tmp_path / "model", tmp_path / "ckpt",
                             progress=False)
    assert metrics["val_accuracy"] >= 0.9 and metrics["global_steps"] == 3 * 6
    model = load_trained(tmp_path / "model")
    probabilities = predict_probabilities(model, val, progress=False)
    assert (probabilities.argmax(1) == [model.classes.index(x) for x in val["label"]]).mean() >= 0.9
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    run = mlflow.get_run(meta["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "val/loss" in run.data.metrics
    assert run.data.tags["backbone"] == "resnet18" and "smearnet.pipeline_run" in run.data.tags
    versions = mlflow.MlflowClient().search_model_versions("name='test-training-resnet18'")
    assert len(versions) == 1
