"""Inference engines agree with eager fp32; ONNX exports are cached by weights; bad settings fail clearly."""

import pytest
import torch

from smearnet.engines import EngineSpec, build_engine, engine_spec, weights_digest
from smearnet.errors import SmearnetError
from smearnet.models import build_model, model_input_spec

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


def test_int8_is_calibrated_cached_and_agrees(trained_like, tmp_path):
    net, images, input_spec = trained_like
    spec = EngineSpec(engine="onnxruntime", precision="int8", batch_size=8)
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
    assert len(exports) == 2 and all(name.startswith(digest) for name in exports)  # fp32 + int8, nothing partial
    build_engine(net, input_spec, spec, cache_dir=tmp_path, calibration=calibration)
    assert calls == [1]  # the second build reused the cached int8 model


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
    with pytest.raises(SmearnetError, match="Unknown inference.engine"):
        engine_spec({"engine": "tensorrt"})
    with pytest.raises(SmearnetError, match="not available with engine `eager`"):
        engine_spec({"engine": "eager", "precision": "int8"})
    with pytest.raises(SmearnetError, match="batch_size"):
        engine_spec({"batch_size": 0})
