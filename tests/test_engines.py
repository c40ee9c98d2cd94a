"""Inference engines agree with eager fp32; ONNX exports are cached by weights; bad settings fail clearly."""

import os
import subprocess
import sys

import pytest
import torch

from smearnet.models.engines import (EngineSpec, build_engine, engine_artifact, engine_spec, runs_from_artifact,
                              weights_digest)
from smearnet.errors import SmearnetError
from smearnet.models.factory import build_model, model_input_spec

CFG = {"name": "tiny", "arch": "resnet18", "input_size": [32, 32], "pretrained": False, "weights_path": None,
       "allow_random_init": True}


@pytest.fixture(scope="module")
def trained_like():
    """A small resnet whose predictions are not near ties (a few steps on a fixed, separable batch)."""
    torch.manual_seed(0)
    net = build_model(CFG, num_classes=3)
    images = torch.randn(24, 3, 32, 32)
    targets = torch.arange(24) % 3
    images += targets.view(-1, 1, 1, 1).float()  # classes differ in brightness
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(30):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(images), targets).backward()
        optimizer.step()
    return net.eval(), images, model_input_spec(CFG)


def _agreement(engine, net, images):
    with torch.inference_mode():
        reference = net(images)
    logits = engine(images)
    assert logits.shape == reference.shape and logits.dtype == torch.float32
    return float((logits.argmax(1) == reference.argmax(1)).float().mean()), float((logits - reference).abs().max())


@pytest.mark.parametrize("spec", [EngineSpec(precision="bf16", channels_last=True, batch_size=5),
                                  EngineSpec(engine="onnxruntime", batch_size=7)], ids=lambda s: s.label)
def test_engine_agrees_with_eager_fp32(trained_like, spec, tmp_path):
    net, images, input_spec = trained_like
    agreement, difference = _agreement(build_engine(net, input_spec, spec, cache_dir=tmp_path), net, images)
    assert agreement == 1.0
    assert difference < (0.5 if spec.precision == "bf16" else 1e-3)


@pytest.mark.parametrize("spec, files", [
    (EngineSpec(engine="onnxruntime", precision="int8", batch_size=8), 2),  # fp32 export + its int8 version
    pytest.param(EngineSpec(engine="compile", precision="int8", channels_last=True, batch_size=8), 1,
                 marks=pytest.mark.slow),  # the quantised program (Inductor compiles it on the first batch)
], ids=lambda v: v.label if isinstance(v, EngineSpec) else None)
def test_int8_is_calibrated_cached_and_agrees(trained_like, spec, files, tmp_path):
    net, images, input_spec = trained_like
    with pytest.raises(SmearnetError, match="calibration"):
        build_engine(net, input_spec, spec, cache_dir=tmp_path)
    calls = []

    def calibration():
        calls.append(1)
        return [images[:12], images[12:]]

    engine = build_engine(net, input_spec, spec, cache_dir=tmp_path, calibration=calibration)
    agreement, _ = _agreement(engine, net, images)
    assert agreement >= 0.9
    exports = sorted(p.name for p in tmp_path.iterdir())
    digest = weights_digest(net)
    assert len(exports) == files and all(name.startswith(digest) for name in exports)  # nothing partial
    build_engine(net, input_spec, spec, cache_dir=tmp_path, calibration=calibration)
    assert calls == [1]  # the second build reused the cached int8 model


@pytest.mark.slow
def test_cached_int8_program_runs_on_int8_kernels_in_a_fresh_process(trained_like, tmp_path):
    """A served model loads its int8 program in a new process: Inductor must still fuse it into oneDNN int8
    convolutions (without torchao's passes it silently runs dequantise + fp32 convolutions, 5x slower)."""
    net, images, input_spec = trained_like
    spec = EngineSpec(engine="compile", precision="int8", channels_last=True, batch_size=8)
    engine_artifact(net, input_spec, spec, cache_dir=tmp_path, calibration=lambda: [images])
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    script = f"""
import torch
from torch._dynamo.utils import counters
from smearnet.models.engines import EngineSpec, build_engine
from smearnet.models.factory import build_model, model_input_spec
net = build_model({CFG!r}, num_classes=3)
net.load_state_dict(torch.load({str(tmp_path / "weights.pt")!r}))
spec = EngineSpec(engine="compile", precision="int8", channels_last=True, batch_size=8)
engine = build_engine(net, model_input_spec({CFG!r}), spec, cache_dir={str(tmp_path)!r})  # no calibration: cached
engine(torch.randn(8, 3, 32, 32))
print(counters["inductor"]["qconv_weight_prepack_matcher_count"])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) > 0  # convolutions lowered to oneDNN int8 kernels


def test_tta_is_invariant_to_flips_and_rotations(trained_like):
    net, images, input_spec = trained_like
    engine = build_engine(net, input_spec, EngineSpec(tta=True, batch_size=24))
    assert engine.spec.label == "eager-fp32-tta"
    upright = engine(images)
    assert torch.allclose(upright, engine(torch.rot90(images, 1, dims=(-2, -1)).flip(-1)), atol=1e-4)
    assert not torch.allclose(upright, build_engine(net, input_spec, EngineSpec())(images), atol=1e-4)


def test_cache_key_changes_with_the_weights(trained_like):
    net, _, _ = trained_like
    other = build_model(CFG, num_classes=3)
    assert weights_digest(net) == weights_digest(net) != weights_digest(other)


@pytest.mark.slow
def test_compiled_engine_pads_to_one_shape_and_agrees(trained_like):
    net, images, input_spec = trained_like
    engine = build_engine(net, input_spec, EngineSpec(engine="compile", precision="fp32", batch_size=10))
    agreement, difference = _agreement(engine, net, images)  # 24 cells: batches of 10, 10 and 4 (padded)
    assert agreement == 1.0 and difference < 1e-3


def test_settings_are_checked():
    assert engine_spec({"engine": "onnxruntime", "precision": "int8"}).label == "onnxruntime-int8"
    assert engine_spec(None) == EngineSpec()
    assert engine_spec({"engine": "compile", "precision": "int8+bf16", "channels_last": True}).label == \
        "compile-int8+bf16-cl"
    assert [runs_from_artifact(engine_spec(s)) for s in ({"engine": "onnxruntime"}, {"engine": "compile"},
                                                          {"engine": "compile", "precision": "int8"})] == [True, False, True]
    with pytest.raises(SmearnetError, match="Unknown inference.engine"):
        engine_spec({"engine": "tensorrt"})
    with pytest.raises(SmearnetError, match="not available with engine `eager`"):
        engine_spec({"engine": "eager", "precision": "int8"})
    with pytest.raises(SmearnetError, match="batch_size"):
        engine_spec({"batch_size": 0})
