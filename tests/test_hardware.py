"""smearnet.models.hardware: bf16 only where the CPU runs it natively, whichever CPU the tests run on."""

import pytest
import torch

from smearnet.models import hardware
from smearnet.models.hardware import cpu_isa, native_bf16, training_precision
from smearnet.models.settings import TrainerSettings

TRAINER = {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "precision": "auto",
           "sync_batchnorm": False, "deterministic": True, "num_workers": 0}


@pytest.mark.parametrize("native, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_precision_is_bf16_only_where_bf16_is_native(monkeypatch, native, expected):
    monkeypatch.setattr(hardware, "native_bf16", lambda accelerator="cpu": native)
    assert training_precision("auto") == expected
    assert TrainerSettings.from_mapping(TRAINER).precision == expected  # recorded as what ran, never "auto"
    for configured in ("32-true", "bf16-mixed"):  # a configured precision is the user's to keep
        assert training_precision(configured) == configured
    assert cpu_isa().endswith("bf16 native" if native else "bf16 emulated")


def test_this_machine_is_described_as_torch_sees_it():
    assert native_bf16() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert cpu_isa().startswith(torch.backends.cpu.get_cpu_capability() + ", bf16 ")


def test_a_trainer_built_with_auto_precision_runs_the_resolved_one(monkeypatch):
    from smearnet.models.training import build_trainer

    for native, plugin in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(hardware, "native_bf16", lambda accelerator="cpu", native=native: native)
        trainer = build_trainer(TRAINER, {"cycles": 1}, None, enable_progress_bar=False)
        assert trainer.precision == plugin
