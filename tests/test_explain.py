"""Tests for smearnet.explain: Grad-CAM maps that leave the model alone, and a safe, self-contained HTML page."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from smearnet.errors import SmearnetError
from smearnet.explain import (CellExplanation, SmearExplanation, feature_layer, grad_cam, overlay, png_bytes,
                              smear_report_html)
from smearnet.models.factory import build_model

TINY_LIGHTCNN = {"channels": [4, 8], "fc_units": 16}


def tiny_net(arch: str = "resnet18", size: tuple[int, int] = (64, 64), seed: int = 0) -> nn.Module:
    """A random-init backbone as the train stage builds it (no weights, no hub)."""
    torch.manual_seed(seed)
    extra = TINY_LIGHTCNN if arch == "lightcnn" else {}
    return build_model({"name": arch, "arch": arch, "input_size": list(size), "pretrained": False, **extra},
                       num_classes=3)


def snapshot(net: nn.Module) -> dict[str, object]:
    """Everything grad_cam must leave as it was: weights, buffers, dtypes, modes, requires_grad, grads."""
    return {"state": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "training": [m.training for m in net.modules()],
            "requires_grad": [p.requires_grad for p in net.parameters()],
            "grads": [p.grad is None for p in net.parameters()]}


def assert_unchanged(net: nn.Module, before: dict[str, object]) -> None:
    after = snapshot(net)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["grads"] == before["grads"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert after["state"][key].dtype == value.dtype, key
        assert torch.equal(after["state"][key], value), key


# ------------------------------------------------------------------------------------------ Grad-CAM


@pytest.mark.parametrize(("arch", "size", "layer"), [("resnet18", (64, 64), "layer4"),
                                                     ("resnet18", (32, 32), "layer3"),
                                                     ("lightcnn", (80, 100), "features")])
def test_grad_cam_maps_in_unit_range_at_input_size(arch: str, size: tuple[int, int], layer: str) -> None:
    net = tiny_net(arch, size)
    images = torch.randn(3, 3, *size)
    assert feature_layer(net.eval(), images[:1])[0] == layer  # at 32 px layer4 is 1x1: no place to point at
    maps = grad_cam(net, images, class_index=2)
    assert maps.shape == (3, *size) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0


def test_grad_cam_leaves_the_network_as_it_was() -> None:
    net = tiny_net().train()  # train mode: BatchNorm statistics would move if grad_cam ran it in train mode
    for param in net.fc.parameters():
        param.requires_grad_(False)  # a frozen head stays frozen, a trainable backbone stays trainable
    before = snapshot(net)
    grad_cam(net, torch.randn(2, 3, 64, 64), class_index=1)
    assert_unchanged(net, before)


def test_grad_cam_inside_inference_mode_and_on_bf16_networks() -> None:
    net = tiny_net().to(torch.bfloat16).eval()
    before = snapshot(net)
    with torch.inference_mode():
        images = torch.randn(2, 3, 64, 64)  # inference tensors: autograd refuses them as they are
        maps = grad_cam(net, images, class_index=0)
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all()
    assert_unchanged(net, before)  # explained in an fp32 copy; the served bf16 network is untouched


def darkness_net() -> nn.Module:
    """A network whose class 1 is how dark the image is (pixels in [0, 1]): stained cells on pale background."""
    conv = nn.Conv2d(3, 1, 1)
    head = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(-1.0 / 3)
        conv.bias.fill_(1.0)
        head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def test_grad_cam_points_at_the_evidence() -> None:
    image = torch.ones(1, 3, 32, 32)
    image[:, :, 4:12, 20:28] = 0.0  # one dark patch: the only evidence for class 1
    heat = grad_cam(darkness_net(), image, class_index=1)[0]
    assert heat[4:12, 20:28].min() > 0.9 and heat[16:, :16].max() < 0.1


def test_grad_cam_refuses_bad_inputs_with_a_fix() -> None:
    net = tiny_net()
    with pytest.raises(SmearnetError, match="outside the model's 3 classes"):
        grad_cam(net, torch.randn(1, 3, 64, 64), class_index=3)
    with pytest.raises(SmearnetError, match=r"\(n, C, H, W\)"):
        grad_cam(net, torch.randn(3, 64, 64), class_index=0)
    assert grad_cam(net, torch.empty(0, 3, 64, 64), class_index=0).shape == (0, 64, 64)


def test_overlay_resizes_the_heat_map_onto_the_cell() -> None:
    image = np.full((90, 120, 3), 200, dtype=np.uint8)
    heat = np.zeros((30, 40), dtype=np.float32)
    heat[:, 20:] = 1.0  # right half hot
    blended = overlay(image, heat)
    assert blended.shape == image.shape and blended.dtype == np.uint8
    assert not np.array_equal(blended[:, :50], blended[:, 70:])  # cold and hot halves coloured differently
    with pytest.raises(SmearnetError, match="uint8"):
        overlay(image.astype(np.float32), heat)


# ------------------------------------------------------------------------------------------ HTML page


class PageParser(HTMLParser):
    """Collects what the tests look at: smear sections, their galleries and figures, images, scripts, links."""

    def __init__(self) -> None:
        super().__init__()
        self.smears: list[dict[str, object]] = []
        self.img_srcs: list[str] = []
        self.links: list[str] = []
        self.scripts = 0
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if tag == "section" and "smear" in classes:
            self.smears.append({"id": attributes.get("data-smear-id"), "galleries": 0, "figures": 0})
        elif tag == "div" and "gallery" in classes:
            self.smears[-1]["galleries"] += 1
        elif tag == "figure" and "cell" in classes:
            self.smears[-1]["figures"] += 1
        elif tag == "img":
            self.img_srcs.append(attributes.get("src") or "")
        elif tag == "script":
            self.scripts += 1
        self.links += [value or "" for name, value in attrs if name in ("href", "src") and tag != "img"]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    return parser


def cell_png(colour: tuple[int, int, int], size: int = 64) -> np.ndarray:
    """A round 'cell' of one colour on a pale background."""
    rows, cols = np.mgrid[:size, :size]
    inside = (rows - size / 2) ** 2 + (cols - size / 2) ** 2 < (size / 3) ** 2
    image = np.full((size, size, 3), 235, dtype=np.uint8)
    image[inside] = colour
    return image


def example_smears(smear_id: str = "S-001", *, heat: np.ndarray | None = None) -> list[SmearExplanation]:
    """Two smears: a positive one of three cells with MIL weights and a negative one of two, one without heat map."""
    image = cell_png((150, 80, 170))
    hot = overlay(image, heat if heat is not None else np.linspace(0, 1, 64 * 64).reshape(64, 64))
    cells = [CellExplanation(f"cell_{i:04d}.png", "covid_rl", 0.91 - 0.2 * i, 0.5 - 0.1 * i, png_bytes(image),
                             png_bytes(hot)) for i in range(3)]
    negative = [CellExplanation("7", "lymphocyte", 0.04, None, png_bytes(cell_png((90, 90, 190))), None),
                CellExplanation("8", "lymphocyte", 0.12, None, png_bytes(cell_png((90, 90, 190))),
                                png_bytes(hot))]
    return [SmearExplanation(smear_id, "mil", 0.83, 0.41, "positive", 120, cells),
            SmearExplanation("S-002", "share_positive", 0.05, 0.41, "negative", 80, negative)]


def render(smears: list[SmearExplanation]) -> str:
    return smear_report_html(smears, title="Smear calls", model="resnet18 v3", positive_class="covid_rl")


def test_page_has_one_gallery_per_smear_with_its_cells_inline() -> None:
    smears = example_smears()
    page = parse(render(smears))
    assert [s["id"] for s in page.smears] == ["S-001", "S-002"]
    assert [s["galleries"] for s in page.smears] == [1, 1]
    assert [s["figures"] for s in page.smears] == [len(s.cells) for s in smears]
    assert len(page.img_srcs) == 3 * 2 + 1 + 2  # photo + heat map each, one cell without a heat map
    assert all(src.startswith("data:image/png;base64,") for src in page.img_srcs)
    assert page.scripts == 0
    assert all(link.startswith("#") for link in page.links)  # in-page anchors only, nothing fetched


def test_text_from_outside_is_escaped() -> None:
    hostile = '<script>alert("x")</script>&"\'>'
    page_text = render(example_smears(hostile))
    assert "<script>" not in page_text and "&lt;script&gt;" in page_text
    page = parse(page_text)
    assert page.scripts == 0
    assert page.smears[0]["id"] == hostile  # the attribute round-trips exactly
    assert any(hostile in chunk for chunk in page.text)


def test_png_bytes_round_trips_arrays_and_images() -> None:
    image = cell_png((200, 10, 10))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(image)))), image)
    grey = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(4, 4)
    decoded = np.asarray(Image.open(io.BytesIO(png_bytes(grey))))
    assert decoded.shape == (4, 4) and decoded[0, 0] == 0 and decoded[-1, -1] == 255
    assert png_bytes(Image.fromarray(image)) == png_bytes(image)


def test_unknown_call_is_refused() -> None:
    with pytest.raises(SmearnetError, match="undetermined"):
        SmearExplanation("S", "mil", 0.5, 0.5, "maybe", 1, [])


def system_chromium() -> str:
    """Debian's chromium, never a browser from PyPI (a venv's bin/ is not a system browser)."""
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium) - no headless render")
    if Path(sys.prefix).resolve() in Path(path).resolve().parents:
        pytest.skip(f"chromium at {path} comes from the Python environment, not from Debian")
    return path


def test_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    chromium = system_chromium()
    cell = torch.from_numpy(cell_png((150, 80, 170))).permute(2, 0, 1)[None].float() / 255
    heat = grad_cam(darkness_net(), cell, class_index=1)[0]
    page = tmp_path / "smears.html"
    page.write_text(render(example_smears(heat=heat)), encoding="utf-8")
    screenshot = tmp_path / "smears.png"
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}", "--window-size=1200,900",
               page.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert screenshot.is_file(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    with Image.open(screenshot) as shot:
        assert shot.size == (1200, 900)
        pixels = np.asarray(shot.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, badges and cell images, not a blank page
