"""DVC stage `register`: log the selected model as a pyfunc version (alias challenger), run the promotion gate."""

import json
from pathlib import Path

from smearnet.config import load_params, registered_model_name
from smearnet.errors import run_cli
from smearnet.io import read_table, write_json, write_text
from smearnet.io import json_safe
from smearnet.registry.gate import (GATE_METRICS, PromotionCriteria, RegisterInputs, decision_markdown, dvc_revision_tags,
                               register_and_gate)
from smearnet.tracking.runs import revision_tags, setup_mlflow

OUT = Path("reports/register")
RULE = Path("reports/smear")  # the rule the smear stage measured: packaged with the version


def main() -> None:
    cfg = load_params()
    selected = json.loads(Path("reports/benchmark/selection.json").read_text())["selected"]
    registry = cfg.registry
    model_name = registered_model_name(registry, cfg.data)
    setup_mlflow(cfg.mlflow)
    tags = {**revision_tags(experiment=str(cfg.mlflow.experiment)), **dvc_revision_tags(Path("dvc.lock"), selected)}
    blind = json.loads((RULE / "blind_smears.json").read_text())["blind_smear_ids"] \
        if str(registry.sensitivity_smears) == "blind" else None
    decision = register_and_gate(RegisterInputs(
        model_dir=Path("models") / selected, backbone=selected, model_name=model_name,
        experiment=str(cfg.mlflow.experiment), rule_dir=RULE, criteria=PromotionCriteria.from_config(registry.promote_if),
        split_manifest=read_table(Path("data/split/manifest.csv")), compose=cfg.smear.compose, blind_smear_ids=blind,
        batch_size=int(cfg.evaluation.batch_size), confidence=float(cfg.evaluation.confidence),
        n_resamples=int(cfg.smear.bootstrap_resamples), seed=int(cfg.seed), extra_tags=tags,
        inference=cfg.inference))
    write_json(json_safe(decision), OUT / "decision.json")
    write_text(decision_markdown(decision), OUT / "decision.md")
    write_json(json_safe({"version": int(decision["version"]), "promoted": decision["promoted"],
                          **{role: {k: decision[role][k] for k in (*GATE_METRICS, "threshold")}
                             for role in ("challenger", "champion") if decision.get(role)}}),
               Path("metrics/register.json"))
    verdict = "promoted to champion" if decision["promoted"] else "not promoted"
    print(f"register: {model_name} version {decision['version']} {verdict}; "
          f"champion is version {decision['champion_after']} (report: {OUT / 'decision.md'})")


if __name__ == "__main__":
    run_cli(main)
