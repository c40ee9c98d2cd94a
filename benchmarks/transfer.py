"""How much cell-domain pretraining helps a small dataset: pretrain on some PBC classes, fine-tune on the others.

    .venv/bin/python benchmarks/transfer.py [--root ../shared/data/pbc] [--held-out lymphocyte monocyte]
        [--shots 20 50 200] [--objectives supervised contrastive] [--pretrain-cycles 10] [--finetune-cycles 30]
        [--pretrain-stain] [--out reports/transfer]

The pretrain stage's own code (`smearnet.models.pretraining`, the `experiment=finetune` recipe and geometry) trains
resnet18 on every PBC class but the held-out ones, once per pretraining objective (`pretrain.train.objective`:
supervised on the labels, contrastive = SimCLR without them, or both). The held-out classes then play a hospital's
small dataset: for each class the cells are ordered by content digest; the first 200 are the pool the `shots`
training cells per class come from, the next 100 validate, and the rest (about 700 a class) are the test cells.
Each shot count is trained with the train stage's code (`train_backbone`) from random weights and from each
pretrained start, with one fixed recipe chosen before any run (no choice is made on the test cells, which each
model sees once). It prints a table of test accuracy with 95% Wilson intervals, each pretrained start's paired
difference from scratch on the same test cells (a bootstrap over the cells: the arms are judged on the same draws, so
a one-point difference that the separate intervals hide can show) and the times, and writes it to
`<out>/transfer.md`.
Runs log to MLflow (experiment `transfer`). Time it alone: two jobs on two cores slow each other far more than 2x.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from smearnet.config import compose_config
from smearnet.evaluation.benchmark import device_name
from smearnet.evaluation.metrics import paired_difference, wilson_interval
from smearnet.evaluation.report import difference_text
from smearnet.io import write_text
from smearnet.models.inference import load_trained, predict_probabilities
from smearnet.models.pretraining import PretrainSettings, pretrain_backbone, pretraining_cells
from smearnet.models.settings import TrainSettings
from smearnet.models.training import train_backbone

POOL, VAL = 200, 100


def held_out_splits(cells: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per class, by content digest: the shot pool, the validation cells and the test cells."""
    ordered = cells.sort_values(["label", "sha256"])
    rank = ordered.groupby("label").cumcount()
    return ordered[rank < POOL], ordered[(rank >= POOL) & (rank < POOL + VAL)], ordered[rank >= POOL + VAL]


def fine_tune(base: list[str], shots: int, pool: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame,
              start: str, cell_weights: Path | None, work: Path) -> dict:
    train = pool.groupby("label").head(shots)
    name = f"{start.replace(' ', '-')}-{shots}"
    cfg = compose_config([*base, f"model.resnet18.cell_weights={cell_weights or 'null'}"])
    settings = TrainSettings.from_params(cfg, "resnet18")
    started = time.perf_counter()
    metrics = train_backbone(settings, train, val, work / name / "model", work / name / "ckpt", progress=False,
                             stage="transfer", sources={"train": "PBC held-out pool", "val": "PBC held-out val"})
    model = load_trained(work / name / "model")
    probabilities = predict_probabilities(model, test, batch_size=64, progress=False)
    correct = (np.array(model.classes)[probabilities.argmax(1)] == test["label"].to_numpy()).astype(float)
    low, high = wilson_interval(int(correct.sum()), len(test))
    return {"start": start, "shots": shots, "val_accuracy": metrics["val_accuracy"],
            "test_accuracy": float(correct.mean()), "low": low, "high": high, "test_cells": len(test),
            "correct": correct, "seconds": round(time.perf_counter() - started, 1)}


def versus_scratch(rows: list[dict]) -> list[str]:
    """Each row's paired test-accuracy difference from the scratch row of its shot count ("" for scratch)."""
    scratch = {r["shots"]: r["correct"] for r in rows if r["start"] == "scratch"}
    return ["" if r["start"] == "scratch" else difference_text(paired_difference(scratch[r["shots"]], r["correct"]))
            for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/data/pbc"))
    parser.add_argument("--held-out", nargs="+", default=["lymphocyte", "monocyte"])
    parser.add_argument("--shots", nargs="+", type=int, default=[20, 50, 200])
    parser.add_argument("--objectives", nargs="+", default=["supervised", "contrastive"],
                        choices=["supervised", "contrastive", "both"])
    parser.add_argument("--pretrain-cycles", type=int, default=10)
    parser.add_argument("--pretrain-stain", action="store_true",
                        help="colour-jitter the pretraining cells (every objective alike); SimCLR relies on it")
    parser.add_argument("--finetune-cycles", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("reports/transfer"))
    args = parser.parse_args()
    work = args.out / "work"
    held = ",".join(args.held_out)
    common = ["experiment=finetune", "mlflow.experiment=transfer", f"pretrain.root={args.root}"]

    cards, seconds = {}, {}
    for objective in args.objectives:
        started = time.perf_counter()
        pretrain = PretrainSettings.from_params(compose_config([
            *common, f"pretrain.exclude_classes=[{held}]", f"pretrain.train.cycles={args.pretrain_cycles}",
            f"pretrain.train.objective={objective}", f"pretrain.train.stain_augment={args.pretrain_stain}"]),
            "resnet18")
        cards[objective] = pretrain_backbone(pretrain, work / f"pretrained-{objective}",
                                             work / f"pretrain-ckpt-{objective}")
        seconds[objective] = time.perf_counter() - started
        print(f"pretrained ({objective}) on {cards[objective]['data']['classes']}: features' k-NN val accuracy "
              f"{cards[objective]['knn_val_accuracy']:.4f}, {seconds[objective]:.0f} s")

    cells, _ = pretraining_cells(args.root, args.held_out, [], progress=False)
    pool, val, test = held_out_splits(cells)
    base = [*common, f"data.classes=[{held}]", "train.batch_size=16", f"train.cycles={args.finetune_cycles}"]
    starts = [("scratch", None), *((f"{o} pretrained", work / f"pretrained-{o}" / "weights.safetensors")
                                   for o in args.objectives)]
    rows = [fine_tune(base, shots, pool, val, test, start, weights, work)
            for shots in args.shots for start, weights in starts]
    card = next(iter(cards.values()))
    lines = [f"Transfer to held-out PBC classes {args.held_out} ({device_name()}; {time.strftime('%Y-%m-%d')}).",
             f"Pretraining: resnet18 112 px on {', '.join(card['data']['classes'])} ({card['data']['train_cells']} "
             f"cells, {args.pretrain_cycles} passes, colour jitter {args.pretrain_stain}, "
             f"{card['data']['val_cells']} validation cells):"]
    for objective, card in cards.items():
        head = "" if card["val_accuracy"] is None else f"classifier val accuracy {card['val_accuracy']:.4f}, "
        low, high = card["knn_val_accuracy_interval"]
        lines.append(f"- {objective}: {head}features' 20-NN val accuracy {card['knn_val_accuracy']:.4f} "
                     f"({low:.4f}-{high:.4f}); {card['train_seconds']:.0f} s of training ({seconds[objective]:.0f} s "
                     "with checks).")
    lines += [f"Fine-tuning: {args.finetune_cycles} passes, batch 16, the experiment=finetune recipe otherwise; "
              f"test: {len(test)} held-out cells never used to choose anything.", "",
              "| cells per class | start | test accuracy (95% CI) | vs scratch, paired (95% CI) | val accuracy | "
              "seconds |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['shots']} | {r['start']} | {r['test_accuracy']:.3f} ({r['low']:.3f}-{r['high']:.3f}) | {versus} | "
              f"{r['val_accuracy']:.3f} | {r['seconds']:.0f} |" for r, versus in zip(rows, versus_scratch(rows))]
    text = "\n".join(lines) + "\n"
    write_text(text, args.out / "transfer.md")
    print(text)


if __name__ == "__main__":
    main()
