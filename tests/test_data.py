import numpy as np
import torch

from conftest import colour_cells
from smearnet.data.loaders import CellImages, make_loader, random_dihedral

SPEC = {"input_size": [16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def test_images_are_resized_normalised_and_labelled(tmp_path):
    manifest = colour_cells(tmp_path, ["a", "b"], ["p1", "p2"], size=40)
    dataset = CellImages(manifest, ["a", "b"], SPEC)
    image, target = dataset[1]
    assert image.shape == (3, 16, 16) and target == 1 and -1.0 <= image.min() and image.max() <= 1.0


def test_center_crop_keeps_the_middle_of_the_frame():
    from PIL import Image

    from smearnet.data.loaders import cell_tensor

    pixels = np.zeros((90, 120, 3), dtype=np.uint8)
    pixels[30:60, 45:75] = 255  # a white 30x30 "cell" in the middle of a black frame
    image = Image.fromarray(pixels)
    whole = cell_tensor(image, SPEC)
    cropped = cell_tensor(image, {**SPEC, "center_crop": 0.25})  # 22 px of the 90 px shorter side
    assert whole.min() == -1.0 and whole.max() == 1.0
    assert cropped.shape == (3, 16, 16) and torch.allclose(cropped, torch.ones_like(cropped))


def test_cache_returns_the_same_tensor_without_decoding_again(tmp_path):
    manifest = colour_cells(tmp_path, ["a"], ["p1"], size=40)
    dataset = CellImages(manifest, ["a"], SPEC, cache=True)
    first, _ = dataset[0]
    (tmp_path / "cell_0000.png").unlink()  # a second read would fail
    assert torch.equal(dataset[0][0], first)


def test_dihedral_keeps_pixels_and_varies():
    image = torch.arange(3 * 4 * 4, dtype=torch.float32).view(3, 4, 4)
    torch.manual_seed(0)
    outs = {tuple(random_dihedral(image).flatten().tolist()) for _ in range(64)}
    assert len(outs) == 8  # all eight symmetries occur
    assert all(sorted(o) == sorted(image.flatten().tolist()) for o in outs)


def test_loader_shuffles_deterministically(tmp_path):
    manifest = colour_cells(tmp_path, ["a", "b"] * 4, [f"p{i}" for i in range(8)], size=20)
    order = lambda: [t.tolist() for _, t in make_loader(manifest, ["a", "b"], SPEC, batch_size=3, shuffle=True, seed=1)]
    assert order() == order()
