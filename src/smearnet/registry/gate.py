"""The champion/challenger promotion rule and the record of a gate decision: pure functions, no MLflow.

`promotion_decision` compares two models measured on the same frozen evaluation set (`smearnet.registry.frozen`)
against `registry.promote_if`; `register_and_gate` (`smearnet.registry.register`) applies it and records the
decision with the model version (`decision_record`, `gate_tags`) so a re-run can reuse it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from smearnet.errors import SmearnetError
from smearnet.io import json_safe

GATE_METRICS = ("cell_accuracy", "smear_auc", "sensitivity")
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class PromotionCriteria:
    """`registry.promote_if`: the challenger must gain at least / lose at most this much over the champion."""

    min_cell_accuracy_gain: float = 0.0
    min_smear_auc_gain: float = 0.0
    max_sensitivity_drop: float = 0.0

    @classmethod
    def from_config(cls, promote_if: Mapping[str, Any]) -> PromotionCriteria:
        """Criteria from the `registry.promote_if` mapping; unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = set(promote_if) - known
        if unknown:
            raise SmearnetError(f"Unknown promotion criteria {sorted(unknown)} under registry.promote_if.",
                                f"use only {sorted(known)}.")
        return cls(**{key: float(value) for key, value in promote_if.items()})


def promotion_decision(challenger: Mapping[str, float], champion: Mapping[str, float] | None,
                       criteria: PromotionCriteria | Mapping[str, Any]) -> tuple[bool, list[str]]:
    """Whether the challenger replaces the champion, and one reason per criterion checked.

    Both mappings hold `cell_accuracy`, `smear_auc` and `sensitivity` measured on the same evaluation set.
    Without a champion the challenger is promoted. A NaN on either side fails its criterion (it cannot be
    shown to hold). Gains are compared with a 1e-9 tolerance, so identical models pass zero-gain criteria.
    """
    if not isinstance(criteria, PromotionCriteria):
        criteria = PromotionCriteria.from_config(criteria)
    if champion is None:
        return True, ["no champion yet: the first registered model becomes the champion"]
    checks = (
        ("cell accuracy", "cell_accuracy", "gain", criteria.min_cell_accuracy_gain),
        ("smear AUC", "smear_auc", "gain", criteria.min_smear_auc_gain),
        ("smear sensitivity at each model's threshold", "sensitivity", "drop", criteria.max_sensitivity_drop),
    )
    promoted, reasons = True, []
    for label, key, kind, limit in checks:
        new, old = float(challenger[key]), float(champion[key])
        if math.isnan(new) or math.isnan(old):
            promoted = False
            reasons.append(f"{label}: challenger {new:.4f} vs champion {old:.4f} is undefined: fail")
            continue
        if kind == "gain":
            delta, ok = new - old, new - old >= limit - _TOLERANCE
            rule = f"gain {delta:+.4f}, required >= {limit:+.4f}"
        else:
            delta, ok = old - new, old - new <= limit + _TOLERANCE
            rule = f"drop {delta:+.4f}, allowed <= {limit:.4f}"
        promoted = promoted and ok
        reasons.append(f"{label}: challenger {new:.4f} vs champion {old:.4f} ({rule}): {'pass' if ok else 'fail'}")
    return promoted, reasons


def decision_record(decision: Mapping[str, Any]) -> str:
    """A decision as the JSON recorded on its model version (NaN as null), read back by `decision_from_record`."""
    return json.dumps(json_safe(decision), sort_keys=True)


def decision_from_record(record: str) -> dict[str, Any]:
    """A decision recorded by `decision_record`, with the metrics JSON turned to null back to NaN."""
    return _nan_restored(json.loads(record))


def gate_tags(decision: Mapping[str, Any]) -> dict[str, str]:
    """The decision as flat model-version tags (searchable in the MLflow UI)."""
    tags = {"gate.promoted": str(decision["promoted"]).lower(),
            "gate.evaluation_set": decision["evaluation_set"]["fingerprint"],
            "gate.champion_before": str(decision["champion_before"] or "none")}
    for role in ("challenger", "champion"):
        for key in (*GATE_METRICS, "threshold"):
            if decision.get(role):
                tags[f"gate.{role}.{key}"] = f"{float(decision[role][key]):.4f}"
    return tags


def decision_markdown(decision: Mapping[str, Any]) -> str:
    """The gate decision as a short Markdown report."""
    verdict = "PROMOTED to champion" if decision["promoted"] else "not promoted (champion unchanged)"
    lines = [f"# Registry gate: {decision['model_name']} version {decision['version']}", "",
             f"**{verdict}**; champion is now version {decision.get('champion_after', '?')}.", "",
             f"- Backbone: {decision['backbone']}; model `{decision['model_uri']}`",
             f"- Previous champion: {decision['champion_before'] or 'none'}",
             f"- Evaluation set `{decision['evaluation_set']['fingerprint']}`: "
             f"{decision['evaluation_set']['test_cells']} test cells, {decision['evaluation_set']['smear_cells']} "
             f"smear cells ({decision['evaluation_set']['smear_cells_from']}); sensitivity on "
             f"{decision['evaluation_set']['sensitivity_on']}; {decision['evaluation_set']['excluded_test_cells']} "
             f"test cells of the champion's training patients left out "
             f"(champion's training patients: {decision['evaluation_set']['champion_training_patients']})",
             f"- Criteria: {', '.join(f'{k}={v}' for k, v in decision['criteria'].items())}", "",
             "| metric | challenger | champion |", "|---|---|---|"]
    for key in (*GATE_METRICS, "threshold", "specificity", "n_test_cells", "n_smears"):
        values = [decision[role][key] if decision.get(role) else None for role in ("challenger", "champion")]
        lines.append(f"| {key} | " + " | ".join("-" if v is None else f"{v:.4f}" if isinstance(v, float)
                                                else str(v) for v in values) + " |")
    lines += ["", "Reasons:", "", *(f"- {reason}" for reason in decision["reasons"])]
    lines += [*(f"- Note: {note}" for note in decision.get("notes", [])), ""]
    return "\n".join(lines)


def _nan_restored(value: Any) -> Any:
    """None -> NaN for the metric fields of a decision read back from JSON."""
    if isinstance(value, dict):
        return {k: (float("nan") if v is None and k in (*GATE_METRICS, "specificity") else _nan_restored(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_restored(v) for v in value]
    return value


__all__ = ["GATE_METRICS", "PromotionCriteria", "decision_from_record", "decision_markdown", "decision_record",
           "gate_tags", "promotion_decision"]
