"""Training at scale: DDP on CPU processes, resuming a killed run, and the pieces that make them agree.

The slow tests run the real stage script (``pipeline/train.py``) in temporary projects, because Lightning's
``strategy=ddp`` re-launches the calling script for the other ranks.

What DDP guarantees, checked on any CPU: 2 processes with ``train.batch_size=4`` against 1 process with
``batch_size=8`` (same global batch, same data, same seed) take the same epochs and steps; at every step the two
ranks train on disjoint halves of the images the single process trains on (the distributed sampler deals each
epoch's permutation into two disjoint shards covering the training set); gradients are all-reduced, so the two
ranks end with bit-identical parameters; rank 0 alone writes one finished MLflow run. A probe (``PROBE_SCRIPT``:
the stage script plus a recording callback) reports each rank's images per step and its final parameters.

With no BatchNorm (lightcnn, dropout off) the 1- and 2-process runs differ only by float rounding: the same
weights (each tensor within 1e-4 of its norm; 1e-7 to 4e-6 here under five oneDNN/ATen ISA levels, while single
near-zero elements moved by up to 1.3e-5, past an element-wise atol of 1e-5), val loss within 0.1%, the same val
accuracy and F1. resnet18 has BatchNorm, which cannot be synchronised on CPU (torch's SyncBatchNorm is GPU-only),
so each process normalises with statistics of 4 images instead of 8 and the runs take different paths, which the
CPU's float rounding moves further: the DDP run's last-epoch val accuracy was 0.92 here and 0.75 on a Zen 5 EPYC.
So the only resnet18 learning figure asserted is a wide one: both runs' best val loss below half of chance
(ln 3 = 1.10; 0.0001 to 0.12 here over 8 seeds and 3 oneDNN/ATen ISA levels).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.utils.data import DistributedSampler

from conftest import REPO_ROOT, colour_cells
from smearnet.errors import SmearnetError
from smearnet.models.inference import load_trained
from smearnet.models.samplers import EpochShuffleSampler
from smearnet.models.training import TimmSyncBatchNorm, build_trainer

TRAIN_SCRIPT = REPO_ROOT / "pipeline" / "train.py"
CLASSES = ["red", "green", "blue"]
TRAIN_IMAGES, VAL_IMAGES, GLOBAL_BATCH, CYCLES = 48, 12, 8, 3
STEPS_PER_EPOCH = TRAIN_IMAGES // GLOBAL_BATCH
COMMON = [f"data.classes=[{','.join(CLASSES)}]", f"train.cycles={CYCLES}", "trainer.num_workers=0",
          "trainer.precision=32-true", "trainer.sync_batchnorm=false", "trainer.deterministic=true",
          # The paper's recipe, whatever the demo experiment uses: no random augmentation (each DDP rank would
          # draw its own), Adam + triangular cycles, plain cross-entropy (chance is ln 3).
          "train.dihedral_augment=false", "train.stain_augment.enabled=false", "train.optimizer=adam",
          "train.schedule=triangular", "train.label_smoothing=0.0", "train.weight_decay=0.0", "train.lr_min=0.001",
          "train.lr_max=0.01"]
RESNET = ["model=resnet18", "model.resnet18.input_size=[32,32]"]
LIGHTCNN = ["model=lightcnn", "model.lightcnn.input_size=[32,40]", "model.lightcnn.drop_rate=0.0"]
ONE_PROCESS = [f"train.batch_size={GLOBAL_BATCH}", "trainer.devices=1", "trainer.strategy=auto"]
TWO_PROCESSES = [f"train.batch_size={GLOBAL_BATCH // 2}", "trainer.devices=2", "trainer.strategy=ddp"]
CHANCE_LOSS = math.log(len(CLASSES))  # cross-entropy of a uniform guess

# The stage script with a recording callback. Lightning re-launches `sys.argv[0]` for the other DDP ranks, so
# every rank runs this probe; it imports pipeline/train.py as a module (runpy would swap sys.argv[0]).
PROBE_SCRIPT = f'''
import importlib.util, json
from pathlib import Path

import lightning as L
import torch

import smearnet.models.training
from smearnet.errors import run_cli


class Probe(L.Callback):
    """Per rank: the training images (dataset indices) of every step and the parameters after training."""

    def on_train_start(self, trainer, pl_module):
        loader = trainer.train_dataloader
        dataset = loader.dataset
        self.index = {{dataset[i][0].contiguous().numpy().tobytes(): i for i in range(len(dataset))}}
        self.sampler = type(loader.sampler).__name__
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append([self.index[image.contiguous().numpy().tobytes()] for image in batch[0]])

    def on_train_end(self, trainer, pl_module):
        folder = Path("probe")
        folder.mkdir(exist_ok=True)
        rank = trainer.global_rank
        torch.save({{name: p.detach().clone() for name, p in pl_module.named_parameters()}},
                   folder / f"rank{{rank}}.pt")
        (folder / f"rank{{rank}}.json").write_text(json.dumps(
            {{"world_size": trainer.world_size, "global_step": trainer.global_step, "sampler": self.sampler,
              "steps": self.steps}}))


build_trainer = smearnet.models.training.build_trainer
smearnet.models.training.build_trainer = lambda *a, callbacks=(), **k: build_trainer(*a, callbacks=[*callbacks, Probe()], **k)
spec = importlib.util.spec_from_file_location("train_stage", {str(TRAIN_SCRIPT)!r})
stage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage)
run_cli(stage.main)
'''


# ------------------------------------------------------------------------------------------- fast tests


def test_epoch_shuffle_gives_ddp_ranks_the_same_images_per_step():
    dataset = list(range(TRAIN_IMAGES))
    single = EpochShuffleSampler(dataset, seed=42)
    ranks = [DistributedSampler(dataset, num_replicas=2, rank=r, shuffle=True, seed=42) for r in range(2)]
    orders = []
    for epoch in range(3):
        for sampler in (single, *ranks):
            sampler.set_epoch(epoch)
        order = list(single)
        rank_orders = [list(rank) for rank in ranks]
        half = GLOBAL_BATCH // 2
        for step in range(STEPS_PER_EPOCH):
            ddp_step = {i for rank_order in rank_orders for i in rank_order[step * half:(step + 1) * half]}
            assert ddp_step == set(order[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH])
        assert sorted(order) == dataset and list(single) == order  # a permutation, repeatable within the epoch
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]


def test_sync_batchnorm_plugin_keeps_timm_activations():
    import timm
    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", num_classes=3).eval()  # BatchNormAct2d(+SiLU) throughout
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        plugin = TimmSyncBatchNorm()
        synced = plugin.apply(model).eval()  # eval mode: SyncBatchNorm does not communicate, so it runs on CPU
        assert sum(isinstance(m, SyncBatchNormAct) for m in synced.modules()) > 40
        torch.testing.assert_close(synced(images), expected)
        reverted = plugin.revert(synced).eval()
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in reverted.modules())
        assert sum(isinstance(m, BatchNormAct2d) for m in reverted.modules()) > 40
        torch.testing.assert_close(reverted(images), expected)


def test_sync_batchnorm_on_cpu_is_refused_with_a_fix():
    trainer_cfg = {"accelerator": "cpu", "devices": 2, "num_nodes": 1, "strategy": "ddp", "precision": "32-true",
                   "sync_batchnorm": True, "deterministic": False}
    with pytest.raises(SmearnetError, match="sync_batchnorm=false"):
        build_trainer(trainer_cfg, {"cycles": 1}, None)


def test_cpu_ddp_trainer_uses_gloo_and_knows_ranks_before_fit():
    from lightning.pytorch.strategies import DDPStrategy

    trainer_cfg = {"accelerator": "cpu", "devices": 2, "num_nodes": 1, "strategy": "ddp", "precision": "32-true",
                   "sync_batchnorm": False, "deterministic": False}
    trainer = build_trainer(trainer_cfg, {"cycles": 1}, None, enable_progress_bar=False)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.strategy._process_group_backend == "gloo"
    assert trainer.world_size == 2 and trainer.is_global_zero  # what train_backbone gates its writes on


# ------------------------------------------------------------------------------------- script-level runs


@dataclass
class Project:
    """A temporary project folder with params.yaml and manifests, trained by `pipeline/train.py <backbone>`."""

    root: Path
    backbone: str
    experiment: str
    tracking_uri: str
    probe: bool = False  # run PROBE_SCRIPT instead of the bare stage script

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints" / self.backbone

    def metrics(self) -> dict:
        return json.loads((self.root / "metrics" / "train" / f"{self.backbone}.json").read_text())

    def start(self, env: dict) -> subprocess.Popen:
        script = TRAIN_SCRIPT
        if self.probe:
            script = self.root / "probe_train.py"
            script.write_text(PROBE_SCRIPT)
        return subprocess.Popen([sys.executable, str(script), self.backbone], cwd=self.root, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def probed(self, rank: int) -> tuple[dict, dict]:
        """(the probe's record, the parameters after training) of one rank."""
        record = json.loads((self.root / "probe" / f"rank{rank}.json").read_text())
        return record, torch.load(self.root / "probe" / f"rank{rank}.pt", weights_only=True)

    def train(self, env: dict) -> dict:
        process = self.start(env)
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, f"training failed:\n{output[:3000]}\n...\n{output[-1500:]}"
        return self.metrics()

    def train_runs(self) -> list:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment)
        return client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'train'")


@pytest.fixture(scope="module")
def manifests(module_folder) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training manifest, split manifest with the validation cells) of learnable colour cells."""
    folder = module_folder("cells")
    train = colour_cells(folder / "train", CLASSES * (TRAIN_IMAGES // 3), [f"t{i}" for i in range(TRAIN_IMAGES)],
                         size=32, seed=1)
    val = colour_cells(folder / "val", CLASSES * (VAL_IMAGES // 3), [f"v{i}" for i in range(VAL_IMAGES)],
                       size=32, seed=2)
    split = pd.concat([train.assign(split="train"), val.assign(split="val")], ignore_index=True)
    return train, split


@pytest.fixture(scope="module")
def scale_store(module_folder, mlflow_store) -> str:
    """The MLflow store of this module's training scripts (the resume test finds an earlier run in it)."""
    return mlflow_store(module_folder("mlflow"))


@pytest.fixture(scope="module")
def train_env(scale_store) -> dict:
    """The environment of the training scripts: offline hub, the module's private MLflow store, one thread per
    process (as Lightning gives each DDP process on 2 cores; also spares OpenMP stalls on a shared machine)."""
    return dict(os.environ, HF_HUB_OFFLINE="1", MLFLOW_TRACKING_URI=scale_store, PYTHONHASHSEED="0",
                OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def make_project(module_folder, manifests, scale_store):
    from smearnet.cli import compose_params
    from smearnet.io import write_manifest

    def make(name: str, backbone: str, overrides: list[str], *, probe: bool = False) -> Project:
        root = module_folder(name)
        experiment = f"scale-{root.name}"
        compose_params([*COMMON, *overrides, f"mlflow.experiment={experiment}", f"registry.model_name={experiment}"],
                       root / "params.yaml")
        train, split = manifests
        write_manifest(train, root / "data" / "upsampled" / "manifest.csv")
        write_manifest(split, root / "data" / "split" / "manifest.csv")
        return Project(root, backbone, experiment, scale_store, probe)

    return make


@pytest.fixture(scope="module")
def resnet_one_process(make_project, train_env) -> Project:
    """An uninterrupted single-process resnet18 run: the reference for DDP and for resuming."""
    project = make_project("one", "resnet18", [*RESNET, *ONE_PROCESS], probe=True)
    project.train(train_env)
    return project


def assert_one_finished_run(project: Project, *, world_size: int) -> None:
    runs = project.train_runs()
    assert len(runs) == 1, f"expected one MLflow training run, got {len(runs)}"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == str(world_size)
    assert run.data.params["global_batch_size"] == str(GLOBAL_BATCH)
    assert (project.checkpoints / "mlflow_run_id.txt").read_text().strip() == run.info.run_id


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process(make_project, train_env, resnet_one_process):
    project = make_project("ddp", "resnet18", [*RESNET, *TWO_PROCESSES], probe=True)
    ddp = project.train(train_env)
    one = resnet_one_process.metrics()
    for key in ("epochs", "global_steps", "resumed"):
        assert ddp[key] == one[key], key
    assert (ddp["epochs"], ddp["global_steps"]) == (CYCLES, CYCLES * STEPS_PER_EPOCH)

    # The data: every step, each rank trains on its half of the single process's global batch.
    single, _ = resnet_one_process.probed(0)
    (rank0, weights0), (rank1, weights1) = project.probed(0), project.probed(1)
    assert single["sampler"] == "EpochShuffleSampler" and single["world_size"] == 1
    for rank in (rank0, rank1):
        assert rank["sampler"] == "DistributedSampler" and rank["world_size"] == 2
        assert rank["global_step"] == ddp["global_steps"] and len(rank["steps"]) == ddp["global_steps"]
        assert all(len(step) == GLOBAL_BATCH // 2 for step in rank["steps"])
    for epoch in range(CYCLES):
        steps = slice(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH)
        shards = [[i for step in rank["steps"][steps] for i in step] for rank in (rank0, rank1)]
        assert not set(shards[0]) & set(shards[1]), f"epoch {epoch}: the ranks' shards overlap"
        assert sorted(shards[0] + shards[1]) == list(range(TRAIN_IMAGES)), f"epoch {epoch}: not one pass"
    for step, (images0, images1, images) in enumerate(zip(rank0["steps"], rank1["steps"], single["steps"])):
        assert sorted(images0 + images1) == sorted(images), f"step {step}: not the single process's batch"

    # The gradients: all-reduced every step, so both ranks hold the same parameters after training
    # (BatchNorm's running statistics are buffers, updated from each rank's own images, and may differ).
    assert weights0.keys() == weights1.keys() and len(weights0) > 50
    differing = [name for name, weight in weights0.items() if not torch.equal(weight, weights1[name])]
    assert not differing, f"the DDP ranks' weights differ after training (not all-reduced): {differing[:5]}"

    # Both learned the colour task, by a margin no CPU's rounding closes (the figures themselves differ).
    for run, metrics in (("2 processes", ddp), ("1 process", one)):
        loss = metrics["best_val_loss"]
        assert loss < CHANCE_LOSS / 2, f"{run}: best val loss {loss:.3f}, chance level is ln 3 = {CHANCE_LOSS:.3f}"
    assert_one_finished_run(project, world_size=2)
    assert load_trained(project.root / "models" / "resnet18").meta["metrics"]["global_steps"] == ddp["global_steps"]


@pytest.mark.slow
def test_ddp_without_batchnorm_equals_one_process(make_project, train_env):
    one_project = make_project("lightcnn-one", "lightcnn", [*LIGHTCNN, *ONE_PROCESS])
    one = one_project.train(train_env)
    project = make_project("lightcnn-ddp", "lightcnn", [*LIGHTCNN, *TWO_PROCESSES])
    ddp = project.train(train_env)
    assert (ddp["epochs"], ddp["global_steps"]) == (one["epochs"], one["global_steps"])
    assert (ddp["epochs"], ddp["global_steps"]) == (CYCLES, CYCLES * STEPS_PER_EPOCH)
    assert ddp["best_val_loss"] == pytest.approx(one["best_val_loss"], rel=1e-3)
    assert ddp["val_accuracy"] == pytest.approx(one["val_accuracy"], abs=1e-6)
    assert ddp["val_macro_f1"] == pytest.approx(one["val_macro_f1"], abs=1e-6)
    one_weights = load_trained(one_project.root / "models" / "lightcnn").net.state_dict()
    ddp_weights = load_trained(project.root / "models" / "lightcnn").net.state_dict()
    for name, weight in one_weights.items():  # the same model, up to float rounding
        drift = float((ddp_weights[name] - weight).norm() / weight.norm())
        assert drift < 1e-4, f"{name}: |ddp - one| / |one| = {drift:.1e}"
    assert_one_finished_run(project, world_size=2)


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint_and_its_mlflow_run(make_project, train_env, resnet_one_process):
    import mlflow

    project = make_project("resume", "resnet18", [*RESNET, *ONE_PROCESS])
    # A previous attempt with other settings, killed before its first checkpoint: its run must not stay RUNNING.
    client = mlflow.MlflowClient(tracking_uri=project.tracking_uri)
    experiment = client.create_experiment(project.experiment, artifact_location=(project.root / "mlruns").as_uri())
    stale = client.create_run(experiment, tags={"stage": "train"})
    project.checkpoints.mkdir(parents=True)
    (project.checkpoints / "fingerprint.txt").write_text("other-settings\n")
    (project.checkpoints / "mlflow_run_id.txt").write_text(stale.info.run_id + "\n")

    process = project.start(train_env)
    last = project.checkpoints / "last.ckpt"
    deadline = time.monotonic() + 600
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"training ended before it was killed:\n{output[-3000:]}"
    assert last.is_file() and not (project.root / "metrics" / "train" / "resnet18.json").exists()
    first_run_id = (project.checkpoints / "mlflow_run_id.txt").read_text().strip()
    assert first_run_id != stale.info.run_id
    assert client.get_run(stale.info.run_id).info.status == "KILLED"
    assert client.get_run(first_run_id).info.status == "RUNNING"  # SIGKILL: nothing could close it

    resumed = project.train(train_env)
    assert resumed["resumed"] is True
    assert (resumed["epochs"], resumed["global_steps"]) == (CYCLES, CYCLES * STEPS_PER_EPOCH)
    # Restored weights, optimizer, LR schedule and per-epoch shuffling: the same result as never stopping.
    uninterrupted = resnet_one_process.metrics()
    assert resumed["best_val_loss"] == pytest.approx(uninterrupted["best_val_loss"], rel=1e-4)
    assert resumed["val_accuracy"] == pytest.approx(uninterrupted["val_accuracy"], abs=1e-6)
    # The training time and images counted travel in the checkpoint: the resumed run reports every attempt's
    # training up to the checkpoint it resumed from, so as many images as a run that never stopped.
    assert resumed["train_images"] == uninterrupted["train_images"] == CYCLES * TRAIN_IMAGES
    resumed_weights = load_trained(project.root / "models" / "resnet18").net.state_dict()
    for name, weight in load_trained(resnet_one_process.root / "models" / "resnet18").net.state_dict().items():
        torch.testing.assert_close(resumed_weights[name], weight, rtol=1e-5, atol=1e-6, msg=name)
    runs = {run.info.run_id: run for run in project.train_runs()}
    assert set(runs) == {stale.info.run_id, first_run_id}  # continued, not a new run
    assert runs[first_run_id].info.status == "FINISHED"
    model_meta = json.loads((project.root / "models" / "resnet18" / "model.json").read_text())
    assert model_meta["mlflow_run_id"] == first_run_id
