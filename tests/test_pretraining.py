"""Cell-domain starting weights: the pretrain stage's library and how the train stage starts from them."""

import json
from pathlib import Path

import mlflow
import pytest
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from conftest import class_folders, colour_cells
from smearnet.config import compose_config, model_config
from smearnet.errors import SmearnetError
from smearnet.models.factory import _head_keys, build_model
from smearnet.models.pretraining import PretrainSettings, pretrain_backbone, split_for_pretraining
from smearnet.models.settings import TrainSettings
from smearnet.models.training import train_backbone

SMALL = {"resnet18": [32, 32], "lightcnn": [80, 100]}
LARGE = {"xception71": [71, 71], "efficientnet_b8": [32, 32], "repvgg_b3g4": [32, 32]}


def _cell_weights_round_trip(backbone: str, size: list[int], tmp_path: Path) -> None:
    cfg = {**model_config(compose_config([f"model={backbone}"]), backbone), "input_size": size,
           "pretrained": False, "weights_path": None}
    source = build_model(cfg, num_classes=8)
    with torch.no_grad():  # far from any fresh initialisation, so a reset head cannot equal the saved one
        for parameter in source.parameters():
            parameter.fill_(0.0123)
    path = tmp_path / f"{backbone}.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    for classes in (2, 8):  # another class count, and the same one: the head is reset either way
        target = build_model({**cfg, "cell_weights": str(path)}, num_classes=classes)
        head = _head_keys(target)
        assert head, f"{backbone}: no classifier found"
        loaded, saved = target.state_dict(), source.state_dict()
        for key, value in loaded.items():
            if key in head:
                assert value.shape[0] == classes
                assert value.shape != saved[key].shape or not torch.equal(value, saved[key]), key
            else:
                torch.testing.assert_close(value, saved[key], msg=f"{backbone}: {key} not loaded")


@pytest.mark.parametrize("backbone", sorted(SMALL))
def test_cell_weights_load_into_the_backbone_with_the_head_reset(backbone, tmp_path):
    _cell_weights_round_trip(backbone, SMALL[backbone], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", sorted(LARGE))
def test_cell_weights_load_into_each_large_backbone_with_the_head_reset(backbone, tmp_path):
    _cell_weights_round_trip(backbone, LARGE[backbone], tmp_path)


def test_imagenet_weights_take_precedence_over_cell_weights(tmp_path):
    cfg = {"name": "r", "arch": "resnet18", "input_size": [32, 32], "pretrained": False, "allow_random_init": True}
    imagenet, cell = build_model(cfg, 1000), build_model(cfg, 8)
    torch.nn.init.constant_(imagenet.conv1.weight, 0.5)
    torch.nn.init.constant_(cell.conv1.weight, -0.5)
    save_file({k: v.contiguous() for k, v in imagenet.state_dict().items()}, str(tmp_path / "imagenet.safetensors"))
    save_file({k: v.contiguous() for k, v in cell.state_dict().items()}, str(tmp_path / "cell.safetensors"))
    both = {**cfg, "pretrained": True, "weights_path": str(tmp_path / "imagenet.safetensors"),
            "cell_weights": str(tmp_path / "cell.safetensors")}
    assert float(build_model(both, 2).conv1.weight.detach().mean()) == pytest.approx(0.5)
    assert float(build_model({**both, "pretrained": False}, 2).conv1.weight.detach().mean()) == pytest.approx(-0.5)
    with pytest.raises(SmearnetError, match="does not exist"):
        build_model({**cfg, "cell_weights": str(tmp_path / "missing.safetensors")}, 2)


def test_validation_cells_are_chosen_by_content_not_by_row_order():
    cells = pd.DataFrame({"label": ["a"] * 10 + ["b"] * 10, "sha256": [f"{i:02x}" * 32 for i in range(20)],
                          "path": [f"p{i}" for i in range(20)]})
    train, val = split_for_pretraining(cells, 0.2)
    shuffled_train, shuffled_val = split_for_pretraining(cells.sample(frac=1.0, random_state=3), 0.2)
    assert sorted(val["path"]) == sorted(shuffled_val["path"]) == ["p0", "p1", "p10", "p11"]
    assert len(train) == 16 and not set(train["path"]) & set(val["path"])


def _settings(root: Path, *overrides: str) -> PretrainSettings:
    cfg = compose_config(["model=resnet18", "model.resnet18.input_size=[32,32]", "pretrain.enabled=true",
                          f"pretrain.root={root}", "pretrain.val_fraction=0.25", "pretrain.train.batch_size=8",
                          "pretrain.train.cycles=3", "pretrain.train.channels_last=false",
                          "pretrain.train.dihedral_augment=false", *overrides])
    return PretrainSettings.from_params(cfg, "resnet18")


def test_pretraining_writes_weights_a_model_card_and_an_mlflow_run(tmp_path, mlflow_uri):
    root = tmp_path / "cells"
    class_folders(root, 12)
    out = tmp_path / "pretrained"
    card = pretrain_backbone(_settings(root, "pretrain.exclude_classes=[blue]"), out, tmp_path / "ckpt",
                             progress=False)
    assert card["enabled"] and card["data"]["classes"] == ["green", "red"]  # blue held out
    assert card["data"]["train_cells"] == 18 and card["data"]["val_cells"] == 6
    assert card["val_accuracy"] >= 0.8
    assert json.loads((out / "card.json").read_text()) == json.loads(json.dumps(card))
    text = (out / "MODEL_CARD.md").read_text()
    assert "Held out of pretraining: blue" in text and f"{card['val_accuracy']:.4f}" in text
    assert 1 <= card["best_epoch"] <= card["epochs"] and f"the weights of epoch {card['best_epoch']}" in text
    run = mlflow.get_run(card["mlflow_run_id"])
    assert run.data.tags["stage"] == "pretrain" and run.info.run_name == "pretrain-resnet18"
    logged = {item.path for item in mlflow.MlflowClient().list_artifacts(run.info.run_id, "model_dir")}
    assert {"model_dir/weights.safetensors", "model_dir/MODEL_CARD.md", "model_dir/card.json"} <= logged

    # The train stage starts from them: with the head reset, the backbone's first layer is the pretrained one.
    labels = ["red", "green", "blue"] * 4
    train = colour_cells(tmp_path / "t", labels, [f"p{i}" for i in range(12)], size=32, seed=5)
    cfg = compose_config(["model=resnet18", "model.resnet18.input_size=[32,32]", "data.classes=[red,green,blue]",
                          f"model.resnet18.cell_weights={out / 'weights.safetensors'}", "train.batch_size=8",
                          "train.cycles=1", "train.lr_max=1e-9", "train.lr_min=1e-9"])
    train_backbone(TrainSettings.from_params(cfg, "resnet18"), train, train, tmp_path / "model",
                   tmp_path / "ckpt-train", progress=False)
    pretrained, tuned = load_file(str(out / "weights.safetensors")), load_file(str(tmp_path / "model" / "weights.safetensors"))
    torch.testing.assert_close(tuned["conv1.weight"], pretrained["conv1.weight"], atol=1e-5, rtol=1e-4)
    assert tuned["fc.weight"].shape[0] == 3 and pretrained["fc.weight"].shape[0] == 2


def test_disabled_pretraining_writes_a_card_saying_so_and_no_weights(tmp_path):
    out = tmp_path / "pretrained"
    settings = _settings(tmp_path / "nowhere", "pretrain.enabled=false")
    assert pretrain_backbone(settings, out, tmp_path / "ckpt", progress=False) == {"enabled": False,
                                                                                   "backbone": "resnet18"}
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "card.json"]


def test_a_missing_pretraining_folder_or_class_is_refused_with_the_fix(tmp_path):
    with pytest.raises(SmearnetError, match="does not exist"):
        pretrain_backbone(_settings(tmp_path / "nowhere"), tmp_path / "out", tmp_path / "ckpt", progress=False)
    root = tmp_path / "cells"
    class_folders(root, 12)
    with pytest.raises(SmearnetError, match=r"\['purple'\]"):
        pretrain_backbone(_settings(root, "pretrain.exclude_classes=[purple]"), tmp_path / "out", tmp_path / "ckpt",
                          progress=False)
