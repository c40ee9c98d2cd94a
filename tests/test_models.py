"""smearnet.models.factory and .lightcnn: paper architectures, local weights, offline use, reparameterisation."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
from omegaconf import OmegaConf
from torch import nn

from smearnet.models import factory as models
from smearnet.errors import SmearnetError
from smearnet.models.factory import build_model, model_input_spec, reparameterize_for_inference
from smearnet.models.lightcnn import LightCNN


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network; huggingface_hub reads HF_HUB_OFFLINE at import, so patch both."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def cfg(arch: str, **overrides: Any) -> dict[str, Any]:
    base = {
        "name": arch,
        "arch": arch,
        "input_size": None,
        "pretrained": False,
        "weights_path": None,
        "allow_random_init": False,
    }
    return {**base, **overrides}


# ------------------------------------------------------------------------------- paper architectures


@pytest.mark.parametrize(
    ("arch", "size"),
    [
        ("xception71", (64, 64)),
        ("tf_efficientnet_b8", (64, 64)),
        ("repvgg_b3g4", (64, 64)),
        ("lightcnn", (80, 100)),
    ],
)
def test_paper_models_give_three_logits(arch: str, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(cfg(arch), num_classes=3).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()


def test_build_accepts_omegaconf_and_drop_rate() -> None:
    model = build_model(OmegaConf.create(cfg("resnet18", drop_rate=0.3)), num_classes=3)
    assert model.drop_rate == 0.3
    assert model.get_classifier().out_features == 3
    light = build_model(OmegaConf.create(cfg("lightcnn", input_size=[80, 100], channels=[32, 64])), 4)
    assert isinstance(light, LightCNN)
    assert light.drop_fc.p == 0.1  # the paper's dropout when the config gives none


def test_pretrained_false_never_calls_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pretrained=false must not load weights")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_download)
    assert build_model(cfg("resnet18"), num_classes=3).get_classifier().out_features == 3


# ------------------------------------------------------------------------------------------ lightcnn

# Paper 2, section 3.1: C2 "32 x 100 x 80 nodes", C3 "32 x 50 x 40", C4 "64 x 50 x 40", C5 "64 x 25 x 20"
# (the paper lists W before H; input "(80, 100)" is H x W), then fully connected C6 and the 4-way output C7.
PAPER_LAYER_SHAPES = {
    "features.conv1": (32, 80, 100),  # C2
    "features.pool1": (32, 40, 50),  # C3
    "features.conv2": (64, 40, 50),  # C4
    "features.pool2": (64, 20, 25),  # C5
    "fc": (128,),  # C6 (width not given in the paper; ours)
    "classifier": (4,),  # C7
}


def test_lightcnn_layer_shapes_match_the_paper() -> None:
    model = build_model(cfg("lightcnn"), num_classes=4).eval()
    shapes: dict[str, tuple[int, ...]] = {}
    for name in PAPER_LAYER_SHAPES:
        module = model.get_submodule(name)
        module.register_forward_hook(lambda m, i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:])))
    with torch.no_grad():
        model(torch.randn(2, 3, 80, 100))
    assert shapes == PAPER_LAYER_SHAPES
    conv1, conv2 = model.features.conv1, model.features.conv2
    assert conv1.kernel_size == conv2.kernel_size == (9, 9)
    assert isinstance(model.features.act1, nn.Tanh) and isinstance(model.act_fc, nn.Tanh)
    assert isinstance(model.features.pool1, nn.MaxPool2d) and model.features.pool1.stride == 2


def test_lightcnn_parameter_count() -> None:
    model = LightCNN(num_classes=4)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()}
    # The paper counts 32 x (9x9 + 1) and 64 x (9x9 + 1) for the convolutions, i.e. per input channel;
    # a real convolution sees every input channel: 3 and 32 of them.
    assert sum(p.numel() for p in model.features.conv1.parameters()) == 3 * 32 * 81 + 32 == 7_808
    assert sum(p.numel() for p in model.features.conv2.parameters()) == 32 * 64 * 81 + 64 == 165_952
    assert model.fc.in_features == 64 * 25 * 20  # the paper's n5, "64 x 25 x 20 nodes"
    assert counts["fc"] == (64 * 25 * 20 + 1) * 128
    assert counts["classifier"] == (128 + 1) * 4
    assert sum(p.numel() for p in model.parameters()) == 4_270_404


def test_lightcnn_other_input_size_and_wrong_size_error() -> None:
    model = build_model(cfg("lightcnn", input_size=[64, 64], channels=[16, 32], fc_units=32), 4).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)
        with pytest.raises(SmearnetError, match="64x64"):
            model(torch.randn(2, 3, 80, 100))


# ------------------------------------------------------------------------------------- local weights


def _imagenet_file(tmp_path: Path, arch: str, suffix: str, wrap: bool = False) -> tuple[Path, dict]:
    torch.manual_seed(1)
    state_dict = timm.create_model(arch, num_classes=1000).state_dict()
    path = tmp_path / f"{arch}{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(state_dict, str(path))
    else:
        torch.save({"state_dict": state_dict, "epoch": 3} if wrap else state_dict, path)
    return path, state_dict


def _assert_backbone_loaded_head_reset(model: nn.Module, state_dict: dict, head: str) -> None:
    own = model.state_dict()
    head_keys = {f"{head}.weight", f"{head}.bias"}
    assert own[f"{head}.weight"].shape[0] == 3
    assert state_dict[f"{head}.weight"].shape[0] == 1000
    for key, value in own.items():
        if key not in head_keys:
            assert torch.equal(value, state_dict[key]), key


@pytest.mark.parametrize(
    ("suffix", "wrap"), [(".safetensors", False), (".pth", False), (".bin", False), (".pth", True)]
)
def test_local_weights_load_with_new_head(tmp_path: Path, suffix: str, wrap: bool) -> None:
    path, state_dict = _imagenet_file(tmp_path, "resnet18", suffix, wrap)
    model = build_model(cfg("resnet18", pretrained=True, weights_path=str(path)), num_classes=3)
    _assert_backbone_loaded_head_reset(model, state_dict, "fc")


def test_local_weights_xception71(tmp_path: Path) -> None:
    path, state_dict = _imagenet_file(tmp_path, "xception71", ".safetensors")
    model = build_model(cfg("xception71", pretrained=True, weights_path=str(path)), num_classes=3)
    _assert_backbone_loaded_head_reset(model, state_dict, "head.fc")


def test_local_weights_lightcnn_round_trip(tmp_path: Path) -> None:
    source = LightCNN(num_classes=4)
    path = tmp_path / "lightcnn.safetensors"
    safetensors.torch.save_file(source.state_dict(), str(path))
    same = build_model(cfg("lightcnn", pretrained=True, weights_path=str(path)), num_classes=4)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in same.state_dict().items())
    fewer = build_model(cfg("lightcnn", pretrained=True, weights_path=str(path)), num_classes=3)
    assert torch.equal(fewer.fc.weight, source.fc.weight) and fewer.classifier.out_features == 3


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path, _ = _imagenet_file(tmp_path, "resnet18", ".safetensors")
    with pytest.raises(SmearnetError, match="lacks"):
        build_model(cfg("resnet34", pretrained=True, weights_path=str(path)), num_classes=3)


def test_missing_weights_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "xception71.safetensors"
    with pytest.raises(SmearnetError, match="nowhere/xception71.safetensors"):
        build_model(cfg("xception71", pretrained=True, weights_path=str(missing)), num_classes=3)


class _RunsCodeWhenUnpickled:
    """Unpickling this calls os.makedirs(marker): stands in for any code a hostile .pth could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (os.makedirs, (self.marker,))


def test_pickled_objects_are_refused_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    hostile = tmp_path / "hostile.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _RunsCodeWhenUnpickled(marker)}, hostile)
    with pytest.raises(SmearnetError, match="will not unpickle untrusted code") as caught:
        build_model(cfg("resnet18", pretrained=True, weights_path=str(hostile)), num_classes=3)
    assert "safetensors" in str(caught.value) and "state_dict" in str(caught.value)
    assert not marker.exists()


def test_a_saved_module_is_refused(tmp_path: Path) -> None:
    whole = tmp_path / "whole_model.pt"
    torch.save(timm.create_model("resnet18"), whole)
    with pytest.raises(SmearnetError, match="will not unpickle untrusted code"):
        build_model(cfg("resnet18", pretrained=True, weights_path=str(whole)), num_classes=3)


def test_a_file_without_tensors_is_refused(tmp_path: Path) -> None:
    numbers = tmp_path / "numbers.pth"
    torch.save({"epoch": 3, "lr": 0.1}, numbers)
    with pytest.raises(SmearnetError, match="not a plain state dict"):
        build_model(cfg("resnet18", pretrained=True, weights_path=str(numbers)), num_classes=3)


# ------------------------------------------------------------------------------ pretrained, offline


def test_offline_pretrained_falls_back_to_random_init_when_allowed(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=models.__name__):
        model = build_model(cfg("resnet18", pretrained=True, allow_random_init=True), num_classes=3)
    assert model.get_classifier().out_features == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == models.__name__]
    assert warnings and "RANDOM INIT" in warnings[0].getMessage()
    assert "weights_path" in warnings[0].getMessage()


@pytest.mark.parametrize("arch", ["resnet18", "lightcnn"])
def test_offline_pretrained_fails_clearly_when_not_allowed(arch: str) -> None:
    with pytest.raises(SmearnetError) as caught:
        build_model(cfg(arch, pretrained=True), num_classes=3)
    message = str(caught.value)
    assert "model.weights_path=" in message and "model.allow_random_init=true" in message


# ---------------------------------------------------------------------------------- unknown, spec


@pytest.mark.parametrize(
    ("arch", "suggestion"), [("Xception71", "xception71"), ("repvgg_b3g5", "repvgg_b3g4")]
)
def test_unknown_arch_lists_close_matches(arch: str, suggestion: str) -> None:
    with pytest.raises(SmearnetError, match="Close matches") as caught:
        build_model(cfg(arch), num_classes=3)
    assert suggestion in str(caught.value) and "model.arch" in str(caught.value)
    with pytest.raises(SmearnetError, match="Unknown model architecture"):
        model_input_spec(cfg(arch))


def test_model_input_spec() -> None:
    xception = model_input_spec(cfg("xception71"))
    assert xception["input_size"] == (299, 299) and xception["mean"] == (0.5, 0.5, 0.5)
    repvgg = model_input_spec(cfg("repvgg_b3g4", input_size=[256, 256]))
    assert repvgg["input_size"] == (256, 256)
    assert repvgg["mean"] == pytest.approx(timm.data.IMAGENET_DEFAULT_MEAN)
    assert repvgg["std"] == pytest.approx(timm.data.IMAGENET_DEFAULT_STD)
    assert model_input_spec(cfg("tf_efficientnet_b8"))["input_size"] == (672, 672)
    light = model_input_spec(cfg("lightcnn"))
    assert light["input_size"] == (80, 100) and light["mean"] == (0.5, 0.5, 0.5)
    assert {"interpolation", "crop_pct"} <= light.keys()


# --------------------------------------------------------------------------------- reparameterize


def _calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Non-trivial BatchNorm affine weights and statistics (taken from ``x``), so fusing them is exercised."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.momentum = 1.0  # running statistics := this batch's statistics
        model.train()(x)
    model.eval()


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow  # a large backbone
def test_reparameterize_repvgg_b3g4_keeps_outputs() -> None:
    torch.manual_seed(0)
    model = build_model(cfg("repvgg_b3g4"), num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    _calibrate_batchnorm(model, torch.randn(4, 3, 64, 64))
    with torch.no_grad():
        before = model(x)
        fused = reparameterize_for_inference(model)
        after = fused(x)
    assert fused is not model and not fused.training
    assert _count_params(fused) < _count_params(model)  # branches folded into one 3x3 conv each
    assert before.abs().max().item() > 1e-2  # a real signal, not an all-zero output
    assert (after - before).abs().max().item() < 1e-4


def test_reparameterize_is_a_no_op_without_branches() -> None:
    model = LightCNN(num_classes=4).train()
    assert reparameterize_for_inference(model) is model and not model.training
