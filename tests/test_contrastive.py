"""Self-supervised pretraining (SimCLR): the loss, the views, the k-NN yardstick, and the pretrain stage with it."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import class_folders
from smearnet.config import compose_config, model_config
from smearnet.errors import SmearnetError
from smearnet.models.contrastive import TwoViews, global_pairs, knn_accuracy, nt_xent, random_resized_crop
from smearnet.models.factory import build_model
from smearnet.models.pretraining import PretrainSettings, pretrain_backbone
from smearnet.models.settings import TrainSettings
from smearnet.models.training import CellClassifier

MODEL = {"name": "r", "arch": "resnet18", "input_size": [32, 32], "pretrained": False, "allow_random_init": True}
RECIPE = {"lr_min": 1e-4, "lr_max": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8, "contrastive_temperature": 0.2,
          "contrastive_crop": 0.6}


def test_nt_xent_is_log_of_the_candidates_when_nothing_is_told_apart_and_small_when_pairs_match():
    same = torch.ones(4, 8)
    assert float(nt_xent(same, same, 0.5)) == pytest.approx(math.log(2 * 4 - 1), rel=1e-6)
    distinct = torch.eye(4, 8) * 5
    assert float(nt_xent(distinct, distinct, 0.1)) < 0.01  # each view's partner is the only one pointing its way
    first, second = torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), torch.randn(6, 8)
    assert float(nt_xent(first, second, 0.2)) == pytest.approx(float(nt_xent(second, first, 0.2)), rel=1e-5)
    with pytest.raises(ValueError, match="N >= 2"):
        nt_xent(torch.ones(1, 8), torch.ones(1, 8), 0.2)


GLOBAL_PAIRS, FEATURES = 12, 8


def _pairs_and_projection() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randn(GLOBAL_PAIRS, FEATURES, generator=generator) for _ in range(2))
    torch.manual_seed(1)
    return first, second, torch.nn.Linear(FEATURES, 4)


def _contrast_on_one_of_two_processes(rank: int, folder: str, gather: bool) -> None:
    """One DDP process: its half of the pairs, the loss, gradients averaged over the processes as DDP does."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    first, second, projection = _pairs_and_projection()
    mine = slice(rank * GLOBAL_PAIRS // 2, (rank + 1) * GLOBAL_PAIRS // 2)
    a, b = projection(first[mine]), projection(second[mine])
    loss = nt_xent(*(global_pairs(a, b) if gather else (a, b)), 0.2)
    loss.backward()
    for parameter in projection.parameters():
        dist.all_reduce(parameter.grad)
        parameter.grad /= 2
    torch.save({"loss": loss.detach(), "grads": [p.grad for p in projection.parameters()]}, f"{folder}/{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_contrasts_each_view_against_the_global_batch_as_one_process_would(tmp_path):
    first, second, projection = _pairs_and_projection()
    assert global_pairs(first, second) == (first, second)  # no process group: the pairs as they are
    loss = nt_xent(projection(first), projection(second), 0.2)
    loss.backward()
    single = [p.grad for p in projection.parameters()]
    for gather, folder in ((True, tmp_path / "gathered"), (False, tmp_path / "local")):
        folder.mkdir()
        torch.multiprocessing.spawn(_contrast_on_one_of_two_processes, args=(str(folder), gather), nprocs=2)
        ranks = [torch.load(folder / f"{rank}.pt") for rank in (0, 1)]
        matches = [torch.allclose(rank["loss"], loss, rtol=1e-5)
                   and all(torch.allclose(g, s, rtol=1e-4, atol=1e-6) for g, s in zip(rank["grads"], single))
                   for rank in ranks]
        # Gathered: both processes hold the one-process loss and, after DDP's average, its gradient. Each process
        # contrasting its own half (what this replaced) is another loss with fewer negatives.
        assert matches == ([True, True] if gather else [False, False]), folder.name


def test_random_crops_keep_the_shape_and_a_full_crop_keeps_the_image():
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(random_resized_crop(images, 1.0), images, atol=1e-5, rtol=1e-5)
    cropped = random_resized_crop(images, 0.5, torch.Generator().manual_seed(2))
    again = random_resized_crop(images, 0.5, torch.Generator().manual_seed(2))
    assert cropped.shape == images.shape and torch.equal(cropped, again)
    assert not torch.allclose(cropped, images, atol=1e-2)


def test_two_views_are_two_draws_of_the_augmentation():
    class Noisy(torch.utils.data.Dataset):
        targets = [0, 1]

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.randn(3, 4, 4), self.targets[i]

    views, target = TwoViews(Noisy())[1]
    assert views.shape == (2, 3, 4, 4) and target == 1 and not torch.equal(views[0], views[1])


def test_knn_accuracy_counts_the_neighbours_vote():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    targets = torch.tensor([0, 0, 1, 1])
    assert knn_accuracy(train, targets, torch.tensor([[1.0, 0.05], [0.05, 1.0]]), torch.tensor([0, 1]), k=2) == 1.0
    assert knn_accuracy(train, targets, torch.tensor([[1.0, 0.05], [0.05, 1.0]]), torch.tensor([1, 1]), k=2) == 0.5


@pytest.mark.parametrize("objective", ["supervised", "contrastive", "both"])
def test_the_objective_says_which_parts_learn(objective):
    """supervised: backbone and classifier; contrastive: the projection and the backbone, not the classifier;
    both: all three."""
    torch.manual_seed(0)
    module = CellClassifier(MODEL, {**RECIPE, "objective": objective}, ["a", "b"])
    targets = torch.tensor([0, 1, 0, 1])
    images = torch.randn(4, 3, 32, 32) if objective == "supervised" else torch.randn(4, 2, 3, 32, 32)
    loss, logits = module.objective_loss(images, targets)
    assert logits.shape == (4, 2) and torch.isfinite(loss)
    loss.backward()
    learns = {part: any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params.parameters())
              for part, params in (("backbone", module.net.conv1), ("classifier", module.net.fc),
                                   ("projection", getattr(module, "projection", torch.nn.Identity())))}
    assert learns == {"backbone": True, "classifier": objective != "contrastive", "projection": objective != "supervised"}
    if objective == "both":  # the sum of the two losses, on the same crops
        torch.manual_seed(1)
        total, _ = module.objective_loss(images, targets)
        torch.manual_seed(1)
        module.objective = "contrastive"
        contrastive, _ = module.objective_loss(images, targets)
        torch.manual_seed(1)
        views = random_resized_crop(images.flatten(0, 1), 0.6)
        supervised = module.training_loss(module(views), targets.repeat_interleave(2))
        assert total.item() == pytest.approx(contrastive.item() + supervised.item(), rel=1e-4)


def test_the_train_stage_refuses_a_contrastive_objective_and_unknown_objectives_are_refused():
    with pytest.raises(SmearnetError, match="trains no classifier"):
        TrainSettings.from_params(compose_config(["train.objective=contrastive"]), "resnet18")
    assert TrainSettings.from_params(compose_config(["train.objective=both"]), "resnet18").recipe.objective == "both"
    with pytest.raises(SmearnetError, match="expected one of"):
        CellClassifier(MODEL, {**RECIPE, "objective": "dino"}, ["a", "b"])


def test_contrastive_pretraining_writes_weights_without_the_projection_and_a_card_with_the_knn_figure(tmp_path,
                                                                                                      mlflow_uri):
    root = class_folders(tmp_path / "cells", 8)
    cfg = compose_config(["model=resnet18", "model.resnet18.input_size=[32,32]", "pretrain.enabled=true",
                          f"pretrain.root={root}", "pretrain.val_fraction=0.25", "pretrain.train.batch_size=8",
                          "pretrain.train.cycles=2", "pretrain.train.channels_last=false",
                          "pretrain.train.objective=contrastive"])
    out = tmp_path / "pretrained"
    card = pretrain_backbone(PretrainSettings.from_params(cfg, "resnet18"), out, tmp_path / "ckpt", progress=False)
    assert card["objective"] == "contrastive" and card["val_accuracy"] is None
    assert 0.0 <= card["knn_val_accuracy"] <= 1.0
    low, high = card["knn_val_accuracy_interval"]
    assert low <= card["knn_val_accuracy"] <= high
    assert json.loads((out / "card.json").read_text())["objective"] == "contrastive"
    text = (out / "MODEL_CARD.md").read_text()
    assert "No classifier was trained" in text and f"{card['knn_val_accuracy']:.4f}" in text and "NT-Xent" in text
    weights = load_file(str(out / "weights.safetensors"))
    assert not any(key.startswith("projection") for key in weights) and "conv1.weight" in weights
    # The fine-tuning start: the backbone as pretrained, the head reset for the task's classes.
    model = build_model({**model_config(cfg, "resnet18"), "cell_weights": str(out / "weights.safetensors")}, 5)
    torch.testing.assert_close(model.conv1.weight.detach(), weights["conv1.weight"])
    assert model.fc.weight.shape[0] == 5


@pytest.mark.slow
def test_contrastive_pretraining_runs_on_two_ddp_processes(tmp_path, mlflow_uri):
    """The pretrain stage script under `trainer.strategy=ddp` on 2 CPU processes (gloo): the projections are gathered
    across processes every step (equal shards), and rank 0 alone writes the weights and the card."""
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT
    from smearnet.cli import compose_params

    root = class_folders(tmp_path / "cells", 8)
    compose_params(["model=resnet18", "model.resnet18.input_size=[32,32]", "pretrain.enabled=true",
                    f"pretrain.root={root}", "pretrain.val_fraction=0.25", "pretrain.train.batch_size=4",
                    "pretrain.train.cycles=2", "pretrain.train.channels_last=false",
                    "pretrain.train.objective=contrastive", "trainer.devices=2", "trainer.strategy=ddp",
                    "trainer.num_workers=0", "trainer.precision=32-true", "trainer.sync_batchnorm=false"],
                   tmp_path / "params.yaml")
    env = dict(os.environ, HF_HUB_OFFLINE="1", MLFLOW_TRACKING_URI=mlflow_uri, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "pipeline" / "pretrain.py"), "resnet18"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    card = json.loads((tmp_path / "models" / "pretrained" / "resnet18" / "card.json").read_text())
    assert card["objective"] == "contrastive" and 0.0 <= card["knn_val_accuracy"] <= 1.0
    assert "pretrain@resnet18 epoch 2/2" in result.stdout  # one line per epoch, from rank 0 alone
    assert result.stdout.count("pretrain@resnet18 epoch 1/2") == 1
