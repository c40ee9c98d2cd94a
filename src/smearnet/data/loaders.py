"""Torch datasets and loaders over manifests: decode, resize to the model's input, (training only) colour-jitter,
normalise."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from smearnet.data.decode import load_rgb
from smearnet.errors import SmearnetError


@dataclass(frozen=True)
class StainAugment:
    """`train.stain_augment`: colour jitter of training cells that mimics another site's stain and scanner.

    albumentations transforms on the resized uint8 pixels, before normalisation, each applied with probability
    `p` independently of the others; the limits are albumentations' (pixel levels of 255 for the shifts,
    fractions for brightness, contrast and gamma). A.HEStain is left out on purpose: it re-composes every pixel
    from two H&E stain vectors and drops the rest, so on Romanowsky-stained (Giemsa, Wright) smears even its
    identity draw shifts the colours of every cell, a bias rather than a variation.
    """

    enabled: bool = False
    p: float = 0.5
    hue: float = 8.0          # HueSaturationValue hue_shift_limit
    saturation: float = 20.0  # sat_shift_limit
    value: float = 10.0       # val_shift_limit
    rgb_shift: float = 10.0   # RGBShift, each channel
    brightness: float = 0.15  # RandomBrightnessContrast brightness_limit
    contrast: float = 0.15    # contrast_limit
    gamma: float = 0.15       # RandomGamma: gamma in [1 - gamma, 1 + gamma]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | bool | StainAugment | None) -> StainAugment:
        """From `train.stain_augment`: a mapping of these fields (the others keep their defaults); `true` or
        `false` alone switch the default strengths on or off."""
        if isinstance(values, cls):
            return values
        if isinstance(values, bool):
            return cls(enabled=values)
        values = dict(values or {})
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SmearnetError(f"train.stain_augment has no key {', '.join(unknown)}.",
                                f"use {', '.join(field.name for field in fields(cls))}.")
        return cls(**{key: bool(value) if key == "enabled" else float(value) for key, value in values.items()})

    def transform(self):
        """The albumentations pipeline (an A.Compose), or None when off. albumentations is imported only here."""
        if not self.enabled:
            return None
        import albumentations as A

        return A.Compose([
            A.HueSaturationValue(hue_shift_limit=self.hue, sat_shift_limit=self.saturation,
                                 val_shift_limit=self.value, p=self.p),
            A.RGBShift(r_shift_limit=self.rgb_shift, g_shift_limit=self.rgb_shift, b_shift_limit=self.rgb_shift,
                       p=self.p),
            A.RandomBrightnessContrast(brightness_limit=self.brightness, contrast_limit=self.contrast, p=self.p),
            A.RandomGamma(gamma_limit=(100 * (1 - self.gamma), 100 * (1 + self.gamma)), p=self.p),
        ])


def jitter_colours(transform, pixels: np.ndarray, seed: int) -> np.ndarray:
    """`pixels` (uint8 HxWx3) through the albumentations `transform`, drawing from `seed` alone.

    Its transforms share one generator: ``A.Compose(seed=...)`` (and ``set_random_seed``) in albumentations 2.0
    gives each transform its own generator with the same seed, so with equal probabilities they would all apply
    or all skip together.
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return transform(image=pixels)["image"]


class CellImages(Dataset):
    """Cells of a manifest as (image tensor CxHxW, class index).

    Per access: the cell's pixels (`cell_pixels`, kept in memory with `cache`) -> `stain` colour jitter ->
    `normalise` -> `dihedral` flips and rotations. The cache holds pixels, not tensors, so augmented cells differ
    on every access; without augmentation an item is exactly `cell_tensor` of its image.
    """

    def __init__(self, manifest: pd.DataFrame, classes: Sequence[str], input_spec: Mapping, *,
                 cache: bool = False, dihedral: bool = False, stain: StainAugment | None = None):
        self.paths = list(manifest["path"])
        self.dihedral = dihedral
        self.colour = stain.transform() if stain is not None else None
        self.cache: dict[int, np.ndarray] | None = {} if cache else None
        index = {name: i for i, name in enumerate(classes)}
        self.targets = [index.get(label, -1) for label in manifest["label"]] if "label" in manifest else [-1] * len(self.paths)
        self.input_spec = input_spec

    def __len__(self) -> int:
        return len(self.paths)

    def pixels(self, i: int) -> np.ndarray:
        """Cell `i` cropped and resized (uint8 HxWx3), decoded once when caching."""
        pixels = self.cache.get(i) if self.cache is not None else None
        if pixels is None:
            pixels = cell_pixels(load_rgb(Path(self.paths[i])), self.input_spec)
            if self.cache is not None:
                self.cache[i] = pixels
        return pixels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        pixels = self.pixels(i)
        if self.colour is not None:
            # From torch's RNG, as random_dihedral: seeded by Lightning, and per worker by the DataLoader.
            pixels = jitter_colours(self.colour, pixels, int(torch.randint(0, 2**31 - 1, ())))
        tensor = normalise(pixels, self.input_spec)
        if self.dihedral:
            tensor = random_dihedral(tensor)
        return tensor, self.targets[i]


def cell_pixels(image: Image.Image, input_spec: Mapping) -> np.ndarray:
    """Centre-crop (``input_spec["center_crop"]``, a fraction of the shorter side; 1 keeps the whole image) and
    resize (bilinear) one RGB image to the model's input size: uint8 HxWx3."""
    height, width = (int(v) for v in input_spec["input_size"])
    fraction = float(input_spec.get("center_crop", 1.0))
    if fraction < 1.0:
        side = min(image.size) * fraction
        left, top = (image.size[0] - side) / 2, (image.size[1] - side) / 2
        image = image.resize((width, height), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    else:
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.array(image, dtype=np.uint8)


def normalise(pixels: np.ndarray, input_spec: Mapping) -> torch.Tensor:
    """uint8 HxWx3 pixels to the model's float CxHxW input: scaled to [0, 1], less ``mean``, over ``std``."""
    array = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(input_spec["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(input_spec["std"], dtype=torch.float32).view(3, 1, 1)
    return (array - mean) / std


def cell_tensor(image: Image.Image, input_spec: Mapping) -> torch.Tensor:
    """One RGB image as the model's input (`cell_pixels`, then `normalise`): the one preprocessing route shared by
    training, evaluation, prediction and serving, so a served model sees what it was trained on."""
    return normalise(cell_pixels(image, input_spec), input_spec)


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

    `cache` keeps decoded, resized pixels in memory after the first epoch (decoding a 363 px JPEG costs
    about as much as a small backbone's forward pass at 64 px); it only pays with `num_workers=0`.
    """
    generator = torch.Generator().manual_seed(seed)
    dataset = CellImages(manifest, classes, input_spec, cache=cache and num_workers == 0, dihedral=dihedral)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      num_workers=num_workers, generator=generator, drop_last=drop_last,
                      persistent_workers=num_workers > 0)
