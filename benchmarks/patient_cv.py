"""Recipe variants compared by patient-grouped cross-validation over the development patients (never test cells).

    .venv/bin/python benchmarks/patient_cv.py [--manifest data/split/manifest.csv] [--experiment demo]
        [--folds 5] [--arm 'no_stain=train.stain_augment.enabled=false' ...] [--set OVERRIDE ...] [--seed 42]
        [--out reports/patient_cv]

The split stage's train and validation patients (the development patients the pipeline may choose on) are dealt
into `--folds` folds, whole patients, stratified by class (scikit-learn's StratifiedGroupKFold). Each fold is held out
once: the next fold validates (the train stage's best-validation-loss checkpoint), the rest train, upsampled as the
upsample stage does (`augment.per_class` augmented copies, training patients only). Every arm (`--arm NAME=OVERRIDE
[,OVERRIDE...]`; the recipe as configured is always the arm `recipe`) is trained on the same folds, so arms are
compared patient by patient. Test and assessment cells are never read.

It prints and writes (`<out>/patient_cv.md`): out-of-fold cell accuracy and macro-F1 over all development cells,
with a 95% percentile bootstrap interval over patients (a patient's cells are not independent), per-class recall,
the worst patient's accuracy and, for each arm against `recipe`, the paired accuracy difference with its patient
bootstrap interval. Patient ids are not printed. Time it alone (two cores).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from smearnet.config import compose_config
from smearnet.data.upsample import materialise, plan_upsampling
from smearnet.evaluation.benchmark import device_name, markdown_table
from smearnet.evaluation.cells import class_indices, patient_intervals
from smearnet.evaluation.metrics import paired_difference
from smearnet.evaluation.report import difference_text, interval_text
from smearnet.io import read_table, write_text
from smearnet.models.inference import load_trained, predict_probabilities
from smearnet.models.settings import TrainSettings
from smearnet.models.training import train_backbone

DEVELOPMENT = ("train", "val")


def parse_arm(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    if not name or not overrides:
        raise SystemExit(f"--arm {text!r}: expected NAME=OVERRIDE[,OVERRIDE...], e.g. "
                         "no_stain=train.stain_augment.enabled=false")
    return name, overrides.split(",")


def patient_folds(cells: pd.DataFrame, folds: int, seed: int) -> np.ndarray:
    """Fold number of every cell: whole patients per fold, class shares kept as far as patients allow."""
    fold_of = np.empty(len(cells), dtype=int)
    dealer = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(dealer.split(cells, cells["label"], cells["patient_id"])):
        fold_of[held_out] = fold
    return fold_of


def summary_row(arm: str, cells: pd.DataFrame, called: np.ndarray, classes: list[str], seconds: float) -> dict:
    truth = cells["label"].to_numpy()
    correct = (called == truth).astype(float)
    patients = cells["patient_id"].to_numpy()
    intervals = patient_intervals(class_indices(truth, classes), class_indices(called, classes), patients,
                                  len(classes), confidence=0.95, n_resamples=2000)
    by_patient = pd.Series(correct).groupby(patients).mean()
    row = {"arm": arm, "accuracy": interval_text(intervals["accuracy_by_patient"]),
           "macro-F1": interval_text(intervals["macro_f1_by_patient"])}
    for name in classes:
        mask = truth == name
        row[f"recall {name}"] = f"{correct[mask].mean():.3f}" if mask.any() else "n/a"
    row["worst patient"] = f"{by_patient.min():.3f}"
    row["patients < 0.8"] = int((by_patient < 0.8).sum())
    row["training s"] = f"{seconds:.0f}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=Path("data/split/manifest.csv"))
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--arm", action="append", type=parse_arm, default=[],
                        help="NAME=OVERRIDE[,OVERRIDE...]; repeat for more arms")
    parser.add_argument("--set", nargs="*", default=[], metavar="OVERRIDE",
                        help="Hydra overrides for every arm, e.g. train.cycles=3")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=Path("reports/patient_cv"))
    args = parser.parse_args()
    arms = [("recipe", []), *(args.arm or [("no_stain", ["train.stain_augment.enabled=false"])])]
    base = [f"experiment={args.experiment}", "mlflow.experiment=patient-cv", f"seed={args.seed}", *args.set]
    cfg = compose_config(base)
    classes = list(cfg["data"]["classes"])

    split = read_table(args.manifest)
    cells = split[split["split"].isin(DEVELOPMENT)].reset_index(drop=True)
    fold_of = patient_folds(cells, args.folds, args.seed)
    work = args.out / "work"
    settings = {arm: TrainSettings.from_params(compose_config([*base, *overrides]), args.backbone)
                for arm, overrides in arms}
    called = {arm: np.empty(len(cells), dtype=object) for arm, _ in arms}
    seconds = dict.fromkeys(called, 0.0)
    for fold in range(args.folds):
        held_out, val_fold = fold_of == fold, fold_of == (fold + 1) % args.folds
        train, val = cells[~held_out & ~val_fold], cells[val_fold]
        plan = plan_upsampling(train, classes, int(cfg["augment"]["per_class"]), seed=args.seed)
        copies = materialise(plan, work / f"copies-{fold}", cfg["augment"], progress=False)
        fold_train = pd.concat([train.assign(augmented_from=""), copies], ignore_index=True)
        for arm, _ in arms:
            run_dir = work / f"{arm}-fold{fold}"
            started = time.perf_counter()
            train_backbone(settings[arm], fold_train, val, run_dir / "model", run_dir / "ckpt", progress=False,
                           stage="patient-cv", sources={"train": f"development patients, fold {fold} out",
                                                        "val": f"development patients, fold {(fold + 1) % args.folds}"})
            seconds[arm] += time.perf_counter() - started
            model = load_trained(run_dir / "model")
            probabilities = predict_probabilities(model, cells[held_out], batch_size=64, progress=False)
            called[arm][held_out] = np.array(model.classes)[probabilities.argmax(1)]
            accuracy = float(np.mean(called[arm][held_out] == cells.loc[held_out, "label"].to_numpy()))
            print(f"fold {fold + 1}/{args.folds} ({held_out.sum()} cells, "
                  f"{cells.loc[held_out, 'patient_id'].nunique()} patients): {arm} accuracy {accuracy:.3f}", flush=True)

    truth, patients = cells["label"].to_numpy(), cells["patient_id"].to_numpy()
    rows = [summary_row(arm, cells, called[arm], classes, seconds[arm]) for arm, _ in arms]
    reference = (called["recipe"] == truth).astype(float)
    for row, (arm, _) in zip(rows, arms):
        row["vs recipe"] = "" if arm == "recipe" else difference_text(
            paired_difference(reference, (called[arm] == truth).astype(float), clusters=patients))
    overrides = "; ".join(f"{arm}: {' '.join(o) or '(as configured)'}" for arm, o in arms)
    lines = [f"Patient-grouped {args.folds}-fold cross-validation of experiment={args.experiment} ({device_name()}; "
             f"{time.strftime('%Y-%m-%d')}): {len(cells)} development cells of {cells['patient_id'].nunique()} "
             f"patients (the split's train and val), each held out once; the next fold validates. Arms: {overrides}. "
             "Intervals: 95% percentile bootstrap over patients. Test and assessment cells were not read.", "",
             markdown_table(rows, list(rows[0]))]
    text = "\n".join(lines)
    write_text(text, args.out / "patient_cv.md")
    print(text)


if __name__ == "__main__":
    main()
