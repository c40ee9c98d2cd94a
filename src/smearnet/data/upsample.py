"""Materialised augmentation upsampling of the training split (paper 1, Section 3.1 and Table 4)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from smearnet.data.decode import load_rgb  # noqa: E402
from smearnet.errors import SmearnetError  # noqa: E402


def paper_augmentation(augment_cfg: Mapping, seed: int | None = None) -> A.Compose:
    """Rotation 0..rotate_max degrees, horizontal/vertical flips, brightness up to `brightness`, zoom up to `zoom_max`."""
    transforms = [
        A.Affine(rotate=(0.0, float(augment_cfg["rotate_max"])), scale=(1.0, float(augment_cfg["zoom_max"])),
                 border_mode=cv2.BORDER_REFLECT_101, p=1.0),
    ]
    if augment_cfg.get("horizontal_flip", True):
        transforms.append(A.HorizontalFlip(p=0.5))
    if augment_cfg.get("vertical_flip", True):
        transforms.append(A.VerticalFlip(p=0.5))
    brightness = float(augment_cfg["brightness"])
    if brightness > 0:
        transforms.append(A.RandomBrightnessContrast(brightness_limit=brightness, contrast_limit=0.0, p=1.0))
    return A.Compose(transforms, seed=seed)


def plan_upsampling(train: pd.DataFrame, classes: Sequence[str], per_class: int, seed: int) -> pd.DataFrame:
    """Decide which original each new image is drawn from: one row per image to create.

    Sources are used round-robin over a seeded permutation, so every original is augmented about as
    often as every other. Classes already at or above `per_class` get no new images (originals are
    never dropped); the report says so. `per_class` 0 creates none at all (training then balances the classes
    by sampling: `train.sampler: balanced`).
    """
    if per_class < 0:
        raise SmearnetError(f"`augment.per_class` is {per_class}; it must be 0 (no copies) or more.",
                            "set augment.per_class.")
    rng = np.random.default_rng(seed)
    plan = []
    for class_index, label in enumerate(classes):
        originals = train[train["label"] == label].sort_values("path")
        if originals.empty:
            raise SmearnetError(
                f"Class `{label}` has no training images after the patient split, so it cannot be upsampled "
                "or learned.",
                "add images of that class (from more than one patient, so train gets some), "
                "or remove it from `data.classes`.",
            )
        missing = per_class - len(originals)
        if missing <= 0:
            continue
        order = rng.permutation(len(originals))
        for number in range(missing):
            source = originals.iloc[order[number % len(originals)]]
            plan.append({"source": source["path"], "label": label, "patient_id": source["patient_id"],
                         "smear_id": source["smear_id"], "site": source["site"], "cohort": source["cohort"],
                         "file": f"images/{label}/{number:06d}.jpg",
                         "seed": int(rng.integers(0, 2**31 - 1)), "class_index": class_index})
    return pd.DataFrame(plan)


def _augment_one(job: tuple[str, str, int, dict, int]) -> None:
    source, target, seed, augment_cfg, quality = job
    image = np.asarray(load_rgb(Path(source)))
    augmented = paper_augmentation(augment_cfg, seed=seed)(image=image)["image"]
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(augmented).save(target, format="JPEG", quality=quality)


def materialise(plan: pd.DataFrame, out_dir: Path, augment_cfg: Mapping, *, workers: int = 2,
                progress: bool = True) -> pd.DataFrame:
    """Write every planned image under `out_dir` and return their manifest rows (paths absolute)."""
    cfg = {k: augment_cfg[k] for k in ("rotate_max", "zoom_max", "horizontal_flip", "vertical_flip", "brightness")}
    quality = int(augment_cfg.get("jpeg_quality", 95))
    jobs = [(row.source, str(out_dir / row.file), row.seed, cfg, quality) for row in plan.itertuples()]
    bar = tqdm(total=len(jobs), desc="upsample", unit="img", disable=not progress)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(_augment_one, jobs, chunksize=16):
                bar.update()
    else:
        for job in jobs:
            _augment_one(job)
            bar.update()
    bar.close()
    if plan.empty:
        return pd.DataFrame(columns=["path", "label", "patient_id", "smear_id", "site", "cohort", "augmented_from"])
    rows = plan.assign(path=[str(out_dir / f) for f in plan["file"]], augmented_from=plan["source"])
    return rows[["path", "label", "patient_id", "smear_id", "site", "cohort", "augmented_from"]]


def upsample_summary(train: pd.DataFrame, upsampled: pd.DataFrame, classes: Sequence[str], per_class: int) -> dict:
    """Originals, created and total images per class; classes already above target are named."""
    summary = {"per_class_target": int(per_class), "classes": {}}
    for label in classes:
        originals = int((train["label"] == label).sum())
        total = int((upsampled["label"] == label).sum())
        summary["classes"][label] = {"originals": originals, "created": total - originals, "total": total}
    summary["above_target"] = [c for c, v in summary["classes"].items() if per_class and v["originals"] > per_class]
    return summary
