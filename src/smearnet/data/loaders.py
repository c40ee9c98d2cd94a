"""Torch datasets and loaders over manifests: decode, resize to the model's input, normalise."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from smearnet.data.decode import load_rgb


class CellImages(Dataset):
    """Cells of a manifest as (image tensor CxHxW, class index)."""

    def __init__(self, manifest: pd.DataFrame, classes: Sequence[str], input_spec: Mapping, *,
                 cache: bool = False, dihedral: bool = False):
        self.paths = list(manifest["path"])
        self.dihedral = dihedral
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None
        index = {name: i for i, name in enumerate(classes)}
        self.targets = [index.get(label, -1) for label in manifest["label"]] if "label" in manifest else [-1] * len(self.paths)
        self.input_spec = input_spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        tensor = self.cache.get(i) if self.cache is not None else None
        if tensor is None:
            tensor = cell_tensor(load_rgb(Path(self.paths[i])), self.input_spec)
            if self.cache is not None:
                self.cache[i] = tensor
        if self.dihedral:
            tensor = random_dihedral(tensor)
        return tensor, self.targets[i]


def cell_tensor(image: Image.Image, input_spec: Mapping) -> torch.Tensor:
    """Centre-crop (``input_spec["center_crop"]``, a fraction of the shorter side; 1 keeps the whole image),
    resize (bilinear) and normalise one RGB image to the model's input: the one preprocessing route shared by
    training, evaluation, prediction and serving, so a served model sees what it was trained on."""
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


def random_dihedral(image: torch.Tensor) -> torch.Tensor:
    """One of the 8 flips/right-angle rotations, drawn from torch's global RNG (seeded by Lightning).

    A cell on a slide has no up or left, so these are label-preserving; square inputs keep their shape,
    non-square ones (lightcnn's 80x100) only get flips.
    """
    if torch.rand(()) < 0.5:
        image = image.flip(-1)
    if torch.rand(()) < 0.5:
        image = image.flip(-2)
    if image.shape[-1] == image.shape[-2]:
        image = torch.rot90(image, int(torch.randint(0, 4, ())), dims=(-2, -1))
    return image


def make_loader(manifest: pd.DataFrame, classes: Sequence[str], input_spec: Mapping, *, batch_size: int,
                shuffle: bool, num_workers: int = 0, seed: int = 0, drop_last: bool = False,
                cache: bool = False, dihedral: bool = False) -> DataLoader:
    """A deterministic loader (seeded shuffling) over one manifest.

    `cache` keeps decoded, resized tensors in memory after the first epoch (decoding a 363 px JPEG costs
    about as much as a small backbone's forward pass at 64 px); it only pays with `num_workers=0`.
    """
    generator = torch.Generator().manual_seed(seed)
    dataset = CellImages(manifest, classes, input_spec, cache=cache and num_workers == 0, dihedral=dihedral)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      num_workers=num_workers, generator=generator, drop_last=drop_last,
                      persistent_workers=num_workers > 0)
