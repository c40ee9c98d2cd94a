"""What this machine computes natively, for the settings that pay only where it does.

bf16 pays on CPUs whose oneDNN kernels run it natively (AVX-512 or AMX: Intel Xeon since Cooper Lake, AMD EPYC
since Zen 4): about 2x the fp32 training throughput there. On a CPU with AVX2 only (AMD EPYC Zen 3, older Xeons)
PyTorch emulates it: a resnet18 training step at 112 px took 28 s in bf16 against 1.9 s in fp32 on such a machine
(2 cores). `trainer.precision: auto` and the `auto` inference engine therefore use bf16 only where it is native.
"""

from __future__ import annotations

import torch

AUTO = "auto"
BF16_TRAINING = "bf16-mixed"
FP32_TRAINING = "32-true"


def native_bf16(accelerator: str = "cpu") -> bool:
    """Whether bf16 math runs natively: on CPU oneDNN's bf16 path (AVX-512 BW/VL/DQ or AMX), on CUDA the device's."""
    if accelerator in ("gpu", "cuda"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def training_precision(precision: str, accelerator: str = "cpu") -> str:
    """`trainer.precision` as Lightning takes it: `auto` is bf16-mixed where bf16 is native (`native_bf16`), else
    32-true; any other value is kept as configured."""
    if str(precision) != AUTO:
        return str(precision)
    return BF16_TRAINING if native_bf16(accelerator) else FP32_TRAINING


def cpu_isa() -> str:
    """The widest vector instruction set PyTorch dispatches to here ("AVX2", "AVX512", ...), and whether bf16 is
    native: what tells two CPUs of one model name apart in a benchmark."""
    return f"{torch.backends.cpu.get_cpu_capability()}, bf16 {'native' if native_bf16() else 'emulated'}"


__all__ = ["AUTO", "BF16_TRAINING", "FP32_TRAINING", "cpu_isa", "native_bf16", "training_precision"]
