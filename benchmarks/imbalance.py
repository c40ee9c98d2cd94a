"""Rare positive cells and a new site: upsampled copies vs a class-balanced sampler vs a class-balanced loss, and
stain augmentation on cells of a differently stained "site", measured on PBC cells playing a hospital's data.

    .venv/bin/python benchmarks/imbalance.py [--root ../shared/data/pbc] [--negative lymphocyte]
        [--positive monocyte] [--train 400 40] [--seeds 42 43] [--pretrained reports/transfer/work/pretrained]
        [--out reports/imbalance]

The two held-out PBC classes play a hospital's two cell classes, the positive one rare: per class, cells ordered by
content digest, the first `--train` (negatives, positives) train (about 9% positive, as the hidden real-patient
set's 12%), the next 150 negatives and 15 positives validate (checkpoint choice), and the rest are test cells seen
once. Every arm is the `experiment=finetune` recipe from the pretrain stage's weights (`--pretrained`, trained on
the other six classes, e.g. by benchmarks/transfer.py; without it: random weights), changing one knob:

- `shuffle`: each training cell once an epoch, no balancing;
- `copies`: the upsample stage's augmented copies of the positive cells, up to as many as the negatives
  (`augment.per_class`), then shuffled (the paper's way);
- `sampler`: `train.sampler=balanced` (the recipe's default);
- `loss`: `train.class_weights=balanced`, cells shuffled;
- `sampler, no stain`: the sampler arm without `train.stain_augment`.

The test cells are scored as they are and as a "new site": a fixed colour change (redder, paler stain, a warmer
white: per-channel gains and gamma, about the size of the stain augmentation's largest draws), written once. It prints
and writes (`<out>/imbalance.md`) positive-class AUC, sensitivity and specificity at the arg-max call, with 95%
Wilson intervals, per arm and seed. Nothing is chosen on the test cells. Time it alone (two cores).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from smearnet.config import compose_config
from smearnet.data.decode import load_rgb
from smearnet.data.upsample import materialise, plan_upsampling
from smearnet.evaluation.benchmark import device_name, markdown_table
from smearnet.evaluation.metrics import binary_counts, binary_summary
from smearnet.evaluation.report import interval_text
from smearnet.io import write_text
from smearnet.models.inference import load_trained, predict_probabilities
from smearnet.models.pretraining import pretraining_cells
from smearnet.models.settings import TrainSettings
from smearnet.models.training import train_backbone

VAL = {"negative": 150, "positive": 15}
ARMS = {
    "shuffle": ["train.sampler=shuffle"],
    "copies": ["train.sampler=shuffle"],  # plus the upsampled copies
    "sampler": ["train.sampler=balanced"],
    "loss": ["train.sampler=shuffle", "train.class_weights=balanced"],
    "sampler, no stain": ["train.sampler=balanced", "train.stain_augment.enabled=false"],
}


def hospital_splits(cells: pd.DataFrame, negative: str, positive: str, n_train: tuple[int, int]):
    """Train, validation and test cells of the two classes, each class ordered by content digest."""
    parts = {"train": [], "val": [], "test": []}
    for label, n, n_val in ((negative, n_train[0], VAL["negative"]), (positive, n_train[1], VAL["positive"])):
        ordered = cells[cells["label"] == label].sort_values("sha256")
        parts["train"].append(ordered.iloc[:n])
        parts["val"].append(ordered.iloc[n:n + n_val])
        parts["test"].append(ordered.iloc[n + n_val:])
    return tuple(pd.concat(parts[name], ignore_index=True) for name in ("train", "val", "test"))


def new_site(image: Image.Image) -> Image.Image:
    """A fixed stain and scanner change: per-channel gains and gamma (redder, paler violet, warmer white)."""
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    gains, gamma = np.array([1.04, 0.93, 0.88]), np.array([0.85, 1.0, 1.15])
    shifted = np.clip(gains * pixels ** gamma, 0.0, 1.0)
    return Image.fromarray((shifted * 255.0 + 0.5).astype(np.uint8))


def write_new_site(test: pd.DataFrame, out_dir: Path) -> pd.DataFrame:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for row in tqdm(test.itertuples(), total=len(test), desc="new site", unit="img"):
        target = out_dir / f"{row.label}-{row.sha256[:16]}.png"
        if not target.is_file():
            new_site(load_rgb(Path(row.path))).save(target)
        paths.append(str(target))
    return test.assign(path=paths)


def scores(model, cells: pd.DataFrame, positive: str) -> dict:
    """Positive-class AUC and, at the arg-max call, sensitivity and specificity with Wilson intervals."""
    probabilities = predict_probabilities(model, cells, batch_size=64, progress=False)
    truth = (cells["label"] == positive).to_numpy()
    called = np.array(model.classes)[probabilities.argmax(1)] == positive
    summary = binary_summary(binary_counts(truth, called))
    return {"auc": float(roc_auc_score(truth, probabilities[:, model.classes.index(positive)])),
            "sensitivity": interval_text(summary["sensitivity"]), "specificity": interval_text(summary["specificity"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/data/pbc"))
    parser.add_argument("--negative", default="lymphocyte")
    parser.add_argument("--positive", default="monocyte")
    parser.add_argument("--train", nargs=2, type=int, default=[400, 40], metavar=("NEGATIVES", "POSITIVES"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43])
    parser.add_argument("--cycles", type=int, default=15)
    parser.add_argument("--pretrained", type=Path, default=Path("reports/transfer/work/pretrained"))
    parser.add_argument("--out", type=Path, default=Path("reports/imbalance"))
    args = parser.parse_args()
    work = args.out / "work"
    weights = args.pretrained / "weights.safetensors"
    classes = [args.negative, args.positive]

    cells, _ = pretraining_cells(args.root, classes, [], progress=False)
    train, val, test = hospital_splits(cells, args.negative, args.positive, tuple(args.train))
    shifted = write_new_site(test, work / "new-site")
    rows = []
    for seed in args.seeds:
        base = ["experiment=finetune", "mlflow.experiment=imbalance", f"data.classes=[{','.join(classes)}]",
                f"data.positive_class={args.positive}", f"seed={seed}", f"train.cycles={args.cycles}",
                f"model.resnet18.cell_weights={weights if weights.is_file() else 'null'}"]
        cfg = compose_config(base)
        plan = plan_upsampling(train, classes, per_class=args.train[0], seed=seed)
        copies = materialise(plan, work / f"copies-{seed}", cfg["augment"], progress=False)
        for arm, overrides in ARMS.items():
            name = f"{arm.replace(', ', '-').replace(' ', '-')}-{seed}"
            settings = TrainSettings.from_params(compose_config([*base, *overrides]), "resnet18")
            arm_train = pd.concat([train, copies], ignore_index=True) if arm == "copies" else train
            started = time.perf_counter()
            train_backbone(settings, arm_train, val, work / name / "model", work / name / "ckpt", progress=False,
                           stage="imbalance", sources={"train": "PBC hospital play", "val": "PBC hospital play"})
            seconds = time.perf_counter() - started
            model = load_trained(work / name / "model")
            same, other = scores(model, test, args.positive), scores(model, shifted, args.positive)
            row = {"arm": arm, "seed": seed, "training cells": len(arm_train), "AUC": f"{same['auc']:.4f}",
                   "sensitivity": same["sensitivity"], "specificity": same["specificity"],
                   "new site: AUC": f"{other['auc']:.4f}", "new site: sensitivity": other["sensitivity"],
                   "new site: specificity": other["specificity"], "seconds": f"{seconds:.0f}"}
            rows.append(row)
            print("; ".join(f"{key} {value}" for key, value in row.items()), flush=True)
    n_neg, n_pos = int((test["label"] == args.negative).sum()), int((test["label"] == args.positive).sum())
    lines = [f"Rare positive cells and a new site ({device_name()}; {time.strftime('%Y-%m-%d')}): PBC {args.negative} "
             f"(negative) vs {args.positive} (positive); {len(train)} training cells ({args.train[1]} positive), "
             f"{len(val)} validation, test {n_neg} negatives + {n_pos} positives, each also re-stained as a new site. "
             f"experiment=finetune recipe, {args.cycles} passes, from "
             f"{'the pretrained weights ' + str(weights) if weights.is_file() else 'random weights'}.", "",
             markdown_table(rows, list(rows[0]))]
    text = "\n".join(lines)
    write_text(text, args.out / "imbalance.md")
    print(text)


if __name__ == "__main__":
    main()
