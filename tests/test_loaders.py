"""Cell preprocessing (smearnet.data.loaders): one route for every stage, and colour jitter for training cells only."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import colour_cells
from smearnet.data.decode import load_rgb
from smearnet.data.loaders import CellImages, StainAugment, cell_pixels, cell_tensor, jitter_colours, normalise
from smearnet.errors import SmearnetError

SPEC = {"input_size": [16, 16], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
STRONG = StainAugment(enabled=True, p=1.0)  # every transform, every time


def cell_tensor_before_the_split(image: Image.Image, input_spec) -> torch.Tensor:
    """cell_tensor as it was written before cell_pixels and normalise were split out of it."""
    height, width = (int(v) for v in input_spec["input_size"])
    fraction = float(input_spec.get("center_crop", 1.0))
    if fraction < 1.0:
        side = min(image.size) * fraction
        left, top = (image.size[0] - side) / 2, (image.size[1] - side) / 2
        image = image.resize((width, height), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    else:
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(input_spec["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(input_spec["std"], dtype=torch.float32).view(3, 1, 1)
    return (array - mean) / std


@pytest.fixture
def cells(tmp_path):
    return colour_cells(tmp_path, ["a", "b", "c"], ["p1", "p2", "p3"], size=40)


@pytest.mark.parametrize("spec", [SPEC, {**SPEC, "center_crop": 0.6}, {**SPEC, "input_size": [20, 12]}])
def test_the_evaluation_route_is_unchanged_and_splits_into_pixels_then_normalise(spec):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 60, 3), dtype=np.uint8))
    pixels = cell_pixels(image, spec)
    height, width = spec["input_size"]
    assert pixels.dtype == np.uint8 and pixels.shape == (height, width, 3)
    assert torch.equal(cell_tensor(image, spec), normalise(pixels, spec))
    assert torch.equal(cell_tensor(image, spec), cell_tensor_before_the_split(image, spec))  # bit for bit


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("stain", [None, StainAugment()])  # absent, or configured but off
def test_without_stain_augmentation_an_item_is_exactly_cell_tensor_of_its_image(cells, cache, stain):
    dataset = CellImages(cells, ["a", "b", "c"], SPEC, cache=cache, stain=stain)
    for i, path in enumerate(cells["path"]):
        for _ in range(2):  # the second read comes from the cache when caching
            image, target = dataset[i]
            assert torch.equal(image, cell_tensor(load_rgb(Path(path)), SPEC)) and target == i


def test_stain_augmentation_changes_a_cells_colours_but_not_its_shape_or_label(cells):
    plain = CellImages(cells, ["a", "b", "c"], SPEC)
    augmented = CellImages(cells, ["a", "b", "c"], SPEC, stain=STRONG)
    torch.manual_seed(0)
    for i in range(len(cells)):
        (before, label), (after, augmented_label) = plain[i], augmented[i]
        assert after.shape == before.shape == (3, 16, 16) and augmented_label == label == i
        assert not torch.equal(after, before)
        assert after.dtype == torch.float32 and torch.isfinite(after).all()


def test_stain_augmentation_keeps_where_things_are():
    """Colour transforms only: a bright square on a dark frame stays where it was."""
    pixels = np.full((16, 16, 3), 30, dtype=np.uint8)
    pixels[4:12, 4:12] = (200, 120, 160)
    transform = STRONG.transform()
    for seed in range(10):
        jittered = jitter_colours(transform, pixels, seed)
        assert jittered.dtype == np.uint8 and jittered.shape == pixels.shape
        brightness = jittered.astype(int).sum(-1)
        assert brightness[4:12, 4:12].min() > brightness[:4].max()


def test_a_cached_cell_is_jittered_anew_on_every_access(cells):
    dataset = CellImages(cells, ["a", "b", "c"], SPEC, cache=True, stain=STRONG)
    decoded = cell_pixels(load_rgb(Path(cells["path"][0])), SPEC)
    first, _ = dataset[0]
    Path(cells["path"][0]).unlink()  # a second decode would fail: the cache serves the pixels
    second, _ = dataset[0]
    assert not torch.equal(first, second)
    for _ in range(20):
        dataset[0]
    assert np.array_equal(dataset.cache[0], decoded)  # pixels, not tensors, and never jittered in place


def test_stain_augmentation_follows_torchs_seed(cells):
    dataset = CellImages(cells, ["a", "b", "c"], SPEC, cache=True, stain=STRONG, dihedral=True)
    torch.manual_seed(5)
    first = [dataset[i][0] for i in range(3)]
    torch.manual_seed(5)
    assert all(torch.equal(a, dataset[i][0]) for i, a in enumerate(first))


def test_each_colour_transform_applies_on_its_own_draw():
    """albumentations 2.0's Compose(seed=...) gives every transform the same seed: all or none would apply."""
    pixels = np.random.default_rng(0).integers(40, 216, (16, 16, 3), dtype=np.uint8)
    transform = StainAugment(enabled=True, p=0.5).transform()
    untouched = np.mean([np.array_equal(jitter_colours(transform, pixels, seed), pixels) for seed in range(200)])
    assert untouched < 0.2  # about 1/16 with four independent transforms, 1/2 if they moved together
    assert np.array_equal(jitter_colours(transform, pixels, 3), jitter_colours(transform, pixels, 3))


def test_stain_augment_settings_parse_from_a_mapping_or_a_switch():
    assert StainAugment.from_mapping(None) == StainAugment() and not StainAugment().enabled
    assert StainAugment().transform() is None
    assert StainAugment.from_mapping(True) == StainAugment(enabled=True)
    assert StainAugment.from_mapping({"enabled": True, "hue": 4}) == StainAugment(enabled=True, hue=4.0)
    with pytest.raises(SmearnetError, match="no key hue_shift"):
        StainAugment.from_mapping({"hue_shift": 4})


def test_albumentations_is_not_asked_to_check_pypi_for_updates_by_either_importer():
    """The guard sits in smearnet.data, so the loaders' stain augmentation is covered as well as upsample."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "NO_ALBUMENTATIONS_UPDATE"}
    probe = ("import os; from smearnet.data.loaders import StainAugment; StainAugment(enabled=True).transform(); "
             "print(os.environ.get('NO_ALBUMENTATIONS_UPDATE'))")
    shown = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == "1"
