"""Each configured architecture trains through the project's Lightning module: a few Adam steps on one fixed
batch lower its loss (random init, reduced input size: the hub is offline and CPUs are slow)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from smearnet.models.training import CellClassifier, EpochLines, build_trainer, epoch_line

CLASSES = ["red", "green", "blue"]
# A small constant rate: from random init, 1e-3 (the paper's lr_min) throws EfficientNet-B8 off a fixed batch.
TRAIN_CFG = {"lr_min": 1e-4, "lr_max": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "cycles": 1,
             "limit_train_batches": None, "patience": None}


def trainer_cfg(precision: str = "32-true") -> dict:
    return {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "precision": precision,
            "sync_batchnorm": False, "deterministic": False}


def colour_batch(per_class: int, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images whose class is their dominant colour channel, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(len(CLASSES)).repeat_interleave(per_class)
    images = torch.randn(len(targets), 3, height, width, generator=generator) * 0.5
    images[torch.arange(len(targets)), targets] += 1.0
    return images, targets


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these small steps gain little from two, and on a shared 2-core machine a busy
    neighbour stalls OpenMP's spinning threads (measured: this file 140 s with two threads, 28 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LossRecorder(L.Callback):
    """The training loss of every step, as computed before that step's update."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit_fixed_batch(model_cfg: dict, images: torch.Tensor, targets: torch.Tensor, steps: int,
                    precision: str = "32-true",
                    callbacks: tuple[L.Callback, ...] = ()) -> tuple[CellClassifier, list[float]]:
    """`steps` optimizer steps of CellClassifier on the same batch; returns the module and the loss per step."""
    L.seed_everything(0)
    module = CellClassifier(model_cfg, TRAIN_CFG, CLASSES)
    recorder = LossRecorder()
    trainer = build_trainer(trainer_cfg(precision), TRAIN_CFG, None, enable_progress_bar=False,
                            callbacks=[recorder, *callbacks])
    assert trainer.checkpoint_callback is None
    repeated = TensorDataset(images.repeat(steps, 1, 1, 1), targets.repeat(steps))
    trainer.fit(module, DataLoader(repeated, batch_size=len(targets), shuffle=False))
    assert trainer.global_step == steps and len(recorder.losses) == steps
    return module, recorder.losses


@pytest.mark.parametrize(("arch", "size", "steps"), [
    # The paper's three large backbones run in the slow lane; the fast lane keeps the small one.
    pytest.param("xception71", (64, 64), 4, marks=pytest.mark.slow),
    pytest.param("tf_efficientnet_b8", (64, 64), 3, marks=pytest.mark.slow),
    pytest.param("repvgg_b3g4", (64, 64), 4, marks=pytest.mark.slow),
    ("lightcnn", (80, 100), 6),
])
def test_backbone_overfits_a_fixed_batch(arch: str, size: tuple[int, int], steps: int) -> None:
    images, targets = colour_batch(per_class=2, height=size[0], width=size[1])
    model_cfg = {"name": arch, "arch": arch, "input_size": list(size), "pretrained": False, "drop_rate": 0.0}
    _, losses = fit_fixed_batch(model_cfg, images, targets, steps)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], f"{arch} did not learn: losses {losses}"


def test_bf16_mixed_precision_trains_on_cpu() -> None:
    images, targets = colour_batch(per_class=4, height=32, width=32)
    conv_output_dtypes: list[torch.dtype] = []

    class RecordConvDtype(L.Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            first_conv = next(m for m in pl_module.net.modules() if isinstance(m, torch.nn.Conv2d))
            first_conv.register_forward_hook(lambda module, args, output: conv_output_dtypes.append(output.dtype))

    model_cfg = {"name": "resnet18", "arch": "resnet18", "input_size": [32, 32], "pretrained": False}
    module, losses = fit_fixed_batch(model_cfg, images, targets, steps=4, precision="bf16-mixed",
                                     callbacks=(RecordConvDtype(),))
    assert conv_output_dtypes and set(conv_output_dtypes) == {torch.bfloat16}  # autocast ran the convolutions
    assert all(p.dtype == torch.float32 for p in module.parameters())  # master weights stay fp32
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_a_log_gets_one_line_per_epoch_with_the_time_left(capsys) -> None:
    """Where stdout is not a terminal (a CI job, `dvc exp run > log`) the live bar, which a log shows only at the end,
    gives way to a line per epoch (here stdout is captured, so not a terminal)."""
    images, targets = colour_batch(per_class=2, height=32, width=32)
    model_cfg = {"name": "resnet18", "arch": "resnet18", "input_size": [32, 32], "pretrained": False}
    L.seed_everything(0)
    trainer = build_trainer(trainer_cfg(), {**TRAIN_CFG, "cycles": 3}, None, progress_label="pretrain@resnet18")
    assert trainer.progress_bar_callback is None
    data = DataLoader(TensorDataset(images, targets), batch_size=len(targets))
    trainer.fit(CellClassifier(model_cfg, TRAIN_CFG, CLASSES), data, data)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pretrain@resnet18 epoch")]
    assert [line.split(":")[0] for line in lines] == [f"pretrain@resnet18 epoch {n}/3" for n in (1, 2, 3)]
    assert all("train loss" in line and "val accuracy" in line for line in lines)
    assert lines[-1].endswith("about 0.0 min left")


def test_no_progress_means_no_epoch_lines(capsys) -> None:
    trainer = build_trainer(trainer_cfg(), TRAIN_CFG, None, enable_progress_bar=False)
    assert trainer.progress_bar_callback is None
    assert not any(isinstance(c, EpochLines) for c in trainer.callbacks)


def test_epoch_line_projects_the_mean_epoch_time_over_the_epochs_left() -> None:
    metrics = {"train/loss_epoch": torch.tensor(0.8123), "val/loss": torch.tensor(0.64), "val/accuracy": 0.9131}
    line = epoch_line("train@resnet18", 3, 30, metrics, [50.0, 40.0, 30.0])
    assert line == ("train@resnet18 epoch 3/30: train loss 0.812, val loss 0.640, val accuracy 0.913; 30 s, "
                    "about 18.0 min left")  # 27 epochs left at a mean 40 s
    assert epoch_line("x", 1, 2, {}, [60.0]).endswith(": no metrics yet; 60 s, about 1.0 min left")
