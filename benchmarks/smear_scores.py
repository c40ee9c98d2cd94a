"""Smear AUC of every smear score under stated cell-classifier confusions, and on the demo cohort.

    .venv/bin/python benchmarks/smear_scores.py [--smears 200] [--resamples 1000] [--seed 0]

Each setting simulates ``--smears`` positive and ``--smears`` negative smears of 20-40 cells
(``smearnet.smear.simulate_smear_probabilities``): positive smears carry 1-3 target
cells, and a share of smears of both classes carries 1-4 look-alike negatives.  The cell
classifier is described by the chance that a cell is called positive at p >= 0.5: target
cells (sensitivity), background cells (false-positive rate) and look-alikes.  The MIL
aggregator sees each cell's logit(p) only (no embeddings in a simulation) and is trained on
a separate simulated set of the same setting.  With ``reports/aggregate/evaluation_cells.csv``
present (``dvc repro aggregate``), the fixed scores are also computed on the demo cohort's
evaluation smears (no MIL here; the aggregate stage reports it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from smearnet.smear.mil import MILConfig, logit_features, train_mil
from smearnet.smear import smear_table
from smearnet.smear import (
    FIXED_SCORES,
    MIL_SCORE,
    SCORES,
    implied_cell_auc,
    score_aucs,
    simulate_smear_probabilities,
)

PAPER_LIKE = {"sensitivity": 0.8, "false_positive_rate": 0.01, "lookalike_false_positive_rate": 0.3}
SETTINGS: dict[str, dict[str, Any]] = {
    "clean classifier": {"sensitivity": 0.95, "false_positive_rate": 0.001, "lookalike_false_positive_rate": 0.05},
    "paper-like": PAPER_LIKE,
    "one target cell": {**PAPER_LIKE, "target_cells": 1},
    "background FP 5%": {**PAPER_LIKE, "false_positive_rate": 0.05},
    "many weak FPs (FP 5%, logit sd 0.7)": {**PAPER_LIKE, "false_positive_rate": 0.05, "spread": 0.7},
    "look-alikes in 80% of smears, FP 60%": {**PAPER_LIKE, "lookalike_false_positive_rate": 0.6,
                                             "lookalike_smears": 0.8},
    "weak classifier": {"sensitivity": 0.6, "false_positive_rate": 0.05, "lookalike_false_positive_rate": 0.5},
}
SHORT = {"share_predicted_positive": "share (paper)", "score_share": "share p>=.5", "score_top3_mean": "top-3 mean",
         "score_mean_prob": "mean p", "score_expected_positive": "sum p", "score_noisy_or": "noisy-OR",
         MIL_SCORE: "MIL"}
MIL_FOR_LOGITS = MILConfig(hidden=16, attention=8, dropout=0.0, epochs=25, batch_size=16, lr=3e-3)


def _cell(entry: dict[str, Any]) -> str:
    if not np.isfinite(entry["value"]):
        return "n/a"
    return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def simulated_row(name: str, setting: dict[str, Any], n_smears: int, resamples: int, seed: int) -> dict[str, str]:
    """AUC with interval of every score for one setting."""
    test = simulate_smear_probabilities(n_smears, n_smears, seed=seed, **setting)
    train = simulate_smear_probabilities(n_smears, n_smears, seed=seed + 10_000, **setting)
    table = smear_table(test.cells(), "covid_rl")  # smear ids sim00000... keep the simulation's order
    aggregator = train_mil(logit_features(train.probabilities), train.truth, MIL_FOR_LOGITS, seed=seed)
    table[MIL_SCORE] = aggregator.score(logit_features(test.probabilities))
    aucs = score_aucs(table, SCORES, confidence=0.95, n_resamples=resamples, seed=seed)
    rates = {key: float(setting.get(key, PAPER_LIKE[key])) for key in PAPER_LIKE}
    cell_auc = implied_cell_auc(rates["sensitivity"], rates["false_positive_rate"])
    return {"setting": name, "cell AUC (target vs background)": f"{cell_auc:.3f}",
            **{SHORT[score]: _cell(aucs[score]) for score in SCORES}}


def demo_row(path: Path, resamples: int, seed: int) -> dict[str, str] | None:
    """Fixed scores on the demo cohort's assessment smears (uncalibrated probabilities of the evaluate stage)."""
    if not path.is_file():
        return None
    cells = pd.read_csv(path, dtype={"smear_id": str, "label": str, "predicted": str})
    table = smear_table(cells, "covid_rl")
    aucs = score_aucs(table, FIXED_SCORES, confidence=0.95, n_resamples=resamples, seed=seed)
    n_positive = int(table["truth_positive"].sum())
    return {"setting": f"demo cohort ({n_positive}+ / {len(table) - n_positive}- smears)",
            "cell AUC (target vs background)": "n/a",
            **{SHORT[score]: _cell(aucs[score]) for score in FIXED_SCORES}, SHORT[MIL_SCORE]: "n/a (no embeddings)"}


PBC_TARGETS = {"erythroblast": ["lymphocyte"], "ig": ["neutrophil", "monocyte"]}  # target: its look-alikes


def pbc_rows(path: Path, smears: int, resamples: int, seed: int) -> tuple[list[dict[str, str]], list[str]]:
    """Fixed scores on smears composed from PBC test cells (`experiment=pbc`'s reports/evaluate/predictions.csv).

    For each target class, positive smears carry 1-3 target cells among 20-40, negatives none; look-alike classes
    (the target's usual confusions) fill 1-4 cells of 30% or of 80% of the smears, both classes alike. The
    false-positive setting is the classifier's own: its measured rates are printed beside the table.
    """
    from sklearn.metrics import roc_auc_score

    from smearnet.smear import CellSet, SmearDesign, compose_bags, plan_smear_mixes, score_smears

    if not path.is_file():
        return [], []
    cells = pd.read_csv(path, dtype={"smear_id": str, "label": str, "predicted": str})
    cells_set = CellSet(cells.assign(patient_id=cells["smear_id"]), np.zeros((len(cells), 1)))  # no embeddings
    rows, notes = [], []
    for target, lookalikes in PBC_TARGETS.items():
        if f"prob_{target}" not in cells or not (cells["label"] == target).any():
            continue
        is_target, is_alike = cells["label"] == target, cells["label"].isin(lookalikes)
        called = cells["predicted"] == target
        background = ~is_target & ~is_alike
        cell_auc = roc_auc_score(is_target[is_target | background], cells.loc[is_target | background, f"prob_{target}"])
        rates = {"sensitivity": called[is_target].mean(), "FP background": called[background].mean(),
                 "FP look-alike": called[is_alike].mean()}
        notes.append(f"- PBC {target} (look-alikes {', '.join(lookalikes)}): cells called {target} at argmax: "
                     + ", ".join(f"{k} {v:.4f}" for k, v in rates.items())
                     + f" ({int(is_target.sum())} target, {int(is_alike.sum())} look-alike, "
                       f"{int(background.sum())} background test cells)")
        for share in (0.3, 0.8):
            rng = np.random.default_rng(seed)
            mixes = plan_smear_mixes(smears, smears, SmearDesign(lookalike_smears=share), rng)
            bags = compose_bags(cells["label"].to_numpy(), mixes, rng, positive_class=target,
                                lookalike_classes=lookalikes)
            ids = [f"pbc{index:05d}" for index in range(len(bags))]
            table = score_smears(cells_set, ids, bags, target, None)
            aucs = score_aucs(table, FIXED_SCORES, confidence=0.95, n_resamples=resamples, seed=seed)
            rows.append({"setting": f"PBC composed, target {target}, look-alikes in {share:.0%} of smears",
                         "cell AUC (target vs background)": f"{cell_auc:.4f}",
                         **{SHORT[score]: _cell(aucs[score]) for score in FIXED_SCORES},
                         SHORT[MIL_SCORE]: "see reports/aggregate (embeddings)"})
    return rows, notes


def markdown(rows: list[dict[str, str]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row.get(column, "") for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smears", type=int, default=200, help="positive and negative smears per setting")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples per AUC interval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cells", type=Path, default=Path("reports/aggregate/evaluation_cells.csv"))
    parser.add_argument("--pbc-predictions", type=Path, default=None,
                        help="reports/evaluate/predictions.csv of an `experiment=pbc` workspace")
    args = parser.parse_args()

    started = time.perf_counter()
    rows = [simulated_row(name, setting, args.smears, args.resamples, args.seed) for name, setting in SETTINGS.items()]
    demo = demo_row(args.cells, args.resamples, args.seed)
    if demo is not None:
        rows.append(demo)
    pbc, pbc_notes = pbc_rows(args.pbc_predictions, args.smears, args.resamples, args.seed) \
        if args.pbc_predictions else ([], [])
    rows += pbc
    print(f"Smear AUC [95% bootstrap interval]; {args.smears} positive + {args.smears} negative simulated smears "
          f"per setting, 20-40 cells, 1-3 target cells, look-alikes (1-4 cells) in 30% of smears unless stated.\n")
    print(markdown(rows))
    print("\nSettings (P(cell called positive at p >= 0.5) by cell kind; logit(p) sd 2 unless `spread`):")
    for name, setting in SETTINGS.items():
        print(f"- {name}: " + ", ".join(f"{key}={value}" for key, value in {**PAPER_LIKE, **setting}.items()))
    if pbc_notes:
        print("\nPBC composed smears: the classifier's measured rates on the test cells they are drawn from:")
        print("\n".join(pbc_notes))
    if demo is None:
        print(f"\n({args.cells} not found: run `dvc repro aggregate` for the demo cohort's row.)")
    print(f"\n{time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
