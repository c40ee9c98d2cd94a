"""DVC stage `register`: log the selected model as a pyfunc version (alias challenger), run the promotion gate."""

import json
from pathlib import Path

from smearnet.config import plain, registered_model_name, stage_params
from smearnet.errors import run_cli
from smearnet.io import json_safe, read_table, write_json, write_text
from smearnet.registry.gate import GATE_METRICS, PromotionCriteria, decision_markdown
from smearnet.serving.requests import ServingLimits
from smearnet.registry.provenance import dvc_revision_tags
from smearnet.models.inference import selected_model
from smearnet.registry.register import RegisterInputs, register_and_gate
from smearnet.pseudonyms import id_key
from smearnet.tracking.runs import extend_parent_run, setup_mlflow, stage_tags

OUT = Path("reports/register")
RULE = Path("reports/smear")  # the rule the smear stage measured: packaged with the version


def main() -> None:
    params = stage_params("register")
    selected, inference = selected_model(plain(params.inference), Path("reports/benchmark/selection.json"))
    registry = params.registry
    model_name = registered_model_name(registry, params.data)
    id_key()  # a missing pseudonym key stops the stage before any work
    setup_mlflow(params.mlflow)
    # The register run nests under the pipeline execution's parent run (stage_tags carries mlflow.parentRunId).
    tags = {**stage_tags(params.mlflow, "register"), **dvc_revision_tags(Path("dvc.lock"), selected)}
    measured = json.loads((RULE / "blind_smears.json").read_text())
    blind = measured["blind_smear_ids"] if str(registry.sensitivity_smears) == "blind" else None
    decision = register_and_gate(RegisterInputs(
        model_dir=Path("models") / selected, backbone=selected, model_name=model_name,
        experiment=str(params.mlflow.experiment), rule_dir=RULE,
        criteria=PromotionCriteria.from_config(plain(registry.promote_if)),
        split_manifest=read_table(Path("data/split/manifest.csv")), compose=plain(params.smear.compose),
        blind_smear_ids=blind, threshold_on_blind=bool(measured["threshold_on_blind"]),
        threshold_on_evaluation=bool(measured["threshold_on_evaluation"]),
        batch_size=int(params.evaluation.batch_size),
        confidence=float(params.evaluation.confidence), n_resamples=int(params.smear.bootstrap_resamples),
        seed=int(params.seed), extra_tags=tags, inference=inference,
        serving_limits=ServingLimits.from_config(plain(params.serving))))
    extend_parent_run(tags["mlflow.parentRunId"])
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
