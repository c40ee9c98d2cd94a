"""The aggregate stage's Markdown report: every smear score's AUC, the choice and why, the blind result."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from smearnet.smear.scores import SCORE_DESCRIPTIONS, SCORES
from smearnet.smear.selection import AggregationResult

def _auc_text(entry: Mapping[str, Any] | None) -> str:
    if not entry or not math.isfinite(entry["value"]):
        return "n/a (one class)"
    return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def _sizes_text(table: pd.DataFrame) -> str:
    """Mean (min-max) cells per smear of each class, in words."""
    parts = []
    for truth, name in ((True, "positive"), (False, "negative")):
        sizes = table.loc[table["truth_positive"] == truth, "n_cells"]
        if len(sizes):
            parts.append(f"{name} smears hold {sizes.mean():.1f} cells on average ({sizes.min()}-{sizes.max()})")
    return "; ".join(parts) if parts else "no smears"


def roc_curves(aucs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{score: {"fpr", "tpr", "auc"}}`` for ``smearnet.evaluation.plots.roc_png`` (scores without a ROC left out)."""
    return {score: {"fpr": entry["roc"]["fpr"], "tpr": entry["roc"]["tpr"], "auc": entry["value"]}
            for score, entry in aucs.items() if entry.get("roc")}


def scores_markdown(result: AggregationResult, *, model_name: str, positive_class: str,
                    calibration: Mapping[str, Any] | None = None) -> str:
    """The Markdown report: every score's AUC with its interval, the choice and why, the blind result."""
    params, development = result.params, result.development
    level = f"{params.confidence:.0%}"
    lines = [
        "# Smear scores side by side",
        "",
        f"Model **{model_name}**, positive class `{positive_class}`.",
    ]
    if calibration is not None:
        bound = " (at a search bound)" if calibration.get("at_bound") else ""
        lines.append(
            f"Cell probabilities are temperature-scaled: T = {calibration['temperature']:.3f}{bound}, "
            f"validation NLL {calibration['val_nll_before']:.4f} -> {calibration['val_nll_after']:.4f} nats/cell "
            f"over {calibration['n_cells']} validation cells."
        )
    if result.cell_threshold is not None:
        lines.append(f"A cell counts as a `{positive_class}` call when its calibrated probability is >= "
                     f"**{result.cell_threshold:.4g}** (smear.cell_threshold; fixed, on validation cells when chosen, "
                     "before any smear was scored), not when it is the arg-max: the share scores count these calls.")
    lines += [
        "",
        "## Choice (development smears only)",
        "",
        f"Chosen: **{result.choice.chosen}** ({SCORE_DESCRIPTIONS.get(result.choice.chosen, '')}), smear positive "
        f"when the score >= **{result.threshold:.4g}** ({params.threshold_rule} on the development smears).",
        "",
        f"Why: {result.choice.reason}",
        "",
        "## Every score",
        "",
        f"AUC [{level} stratified bootstrap interval].",
        "",
        "| score | what it is | development, composed (out-of-fold; chooses) | development, natural smears "
        "| assessment, blind (reported only) |",
        "|---|---|---|---|---|",
    ]
    for score in SCORES:
        assessment_auc = result.assessment.aucs.get(score) if result.assessment else None
        marker = " **(chosen)**" if score == result.choice.chosen else ""
        lines.append(f"| `{score}`{marker} | {SCORE_DESCRIPTIONS[score]} | {_auc_text(result.choice.aucs.get(score))} "
                     f"| {_auc_text(result.natural_aucs.get(score))} | "
                     f"{_auc_text(assessment_auc) if result.assessment else 'no assessment cohort'} |")
    composed = development.composed
    lines += [
        "",
        f"Development, composed: {len(composed)} smears ({int(composed['truth_positive'].sum())} positive) re-drawn "
        f"from the validation and test cells of development patients, {development.n_folds} folds grouped by "
        f"{development.fold_unit}: each smear holds {params.design.cells_per_smear[0]}-"
        f"{params.design.cells_per_smear[1]} cells, positive smears {params.design.target_cells[0]}-"
        f"{params.design.target_cells[1]} `{positive_class}` cells, and {params.design.lookalike_smears:.0%} of "
        f"smears of both classes {params.design.lookalike_cells[0]}-{params.design.lookalike_cells[1]} look-alike "
        f"cells ({', '.join(params.lookalike_classes)}). The MIL aggregator scoring a fold was trained on smears "
        "composed from the other folds' cells only. Both classes draw their size from the same range, so no score "
        "can win by tracking smear size.",
        "",
        f"Development, natural: the {len(development.natural)} validation and test smears themselves, each "
        "all-positive or all-negative (one class per development patient); "
        + (_sizes_text(development.natural) if len(development.natural) else "none (cells were folded, not patients)")
        + ". Too few and too unlike assessment smears to choose by; shown for completeness.",
    ]
    if result.assessment is not None:
        blind = result.assessment
        counts = blind.confusion
        lines += [
            "",
            "## Blind classification of the assessment smears",
            "",
            f"`{result.choice.chosen}` >= {result.threshold:.4g}, fixed before the assessment cells were read: "
            f"TP {counts['tp']}, FP {counts['fp']}, TN {counts['tn']}, FN {counts['fn']}"
            + (f" ({blind.n_empty_smears_excluded} smears without cells excluded)."
               if blind.n_empty_smears_excluded else "."),
            "",
            f"Assessment: {_sizes_text(blind.table[blind.table['n_cells'] > 0])}. Scores that grow with a smear's "
            "size (sum p, noisy-OR) gain from any size difference between the classes there, which says nothing "
            "about the cell evidence.",
            "",
            f"| rate | value [{level} Wilson interval] |",
            "|---|---|",
        ]
        for name, rate in blind.summary.items():
            value = "n/a" if not math.isfinite(rate["value"]) else \
                f"{rate['value']:.3f} [{rate['low']:.3f}, {rate['high']:.3f}]"
            lines.append(f"| {name} | {value} |")
    lines += [
        "",
        "## Caveats",
        "",
        "- Composed smears reuse development cells (few positive patients), so their bootstrap intervals, which "
        "resample smears, are narrower than the patient-level uncertainty.",
        "- The temperature is fitted on the validation cells, which also feed the development smears; it cannot "
        "change argmax-based shares and changes the other scores only mildly.",
        "- The threshold of the MIL score comes from the fold aggregators' out-of-fold scores; the assessment is "
        "scored by the aggregator trained on all development cells.",
        "- Assessment AUCs of the scores not chosen are reported for comparison only; choosing among them after "
        "seeing them would no longer be blind.",
    ]
    return "\n".join(lines) + "\n"
