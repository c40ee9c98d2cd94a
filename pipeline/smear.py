"""DVC stage `smear`: the proposed smear rule's threshold fixed, the rule measured on the evaluation smears.

The rule written here (`reports/smear/smear_rule.json`, with `mil/` for a MIL score) is the one the register
stage packages with the model and that predict, serving and the gate apply through `SmearRule.classify`.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd

from smearnet.config import stage_params
from smearnet.errors import run_cli
from smearnet.io import write_json, write_text
from smearnet.evaluation.plots import roc_png, roc_records
from smearnet.smear import load_rule, measure_rule, save_rule
from smearnet.tracking.runs import flatten_metrics, log_stage_outputs, stage_run

AGGREGATE = Path("reports/aggregate")
OUT = Path("reports/smear")


def main() -> None:
    import mlflow

    params = stage_params("smear")
    with stage_run(params.mlflow, "smear"):  # opened before the work: the run spans the stage
        proposed, aggregator = load_rule(AGGREGATE)
        proposal = json.loads((AGGREGATE / "selection.json").read_text())
        classes, smears_from = proposal["classes"], proposal["smears_from"]
        cells = pd.read_csv(AGGREGATE / "evaluation_cells.csv",
                            dtype={"smear_id": str, "label": str, "predicted": str, "site": str})
        embeddings = np.load(AGGREGATE / "evaluation_embeddings.npy") if proposed.uses_mil else None
        s = params.smear
        measured = measure_rule(proposed, cells, classes, selection=str(s.threshold_selection), embeddings=embeddings,
                                aggregator=aggregator, selection_fraction=float(s.selection_fraction), folds=int(s.folds),
                                fixed=float(s.fixed_threshold), seed=int(params.seed),
                                confidence=float(params.evaluation.confidence), n_resamples=int(s.bootstrap_resamples))
        result, rule = measured.result, measured.rule
        roc = result["roc"]
        write_text(pd.DataFrame(roc_records(roc["fpr"], roc["tpr"], roc["thresholds"])).to_csv(index=False),
                   OUT / "roc.csv")
        write_text(measured.calls.to_csv(index=False), OUT / "smears.csv")
        save_rule(rule, OUT, aggregator)
        write_json({"blind_smear_ids": measured.blind_smear_ids,
                    "threshold_on_blind": measured.threshold_on_blind,
                    "threshold_on_evaluation": measured.threshold_on_evaluation},
                   OUT / "blind_smears.json")
        roc_png({rule.score: {"fpr": roc["fpr"], "tpr": roc["tpr"], "auc": result["auc"]["value"]}},
                OUT / "roc.png", title=f"Smear-level ROC ({result['n_smears']} smears, {rule.score})")
        write_json({"smears_from": smears_from, **{k: v for k, v in result.items() if k not in ("roc", "excluded_smear_ids")}},
                   Path("metrics/smear.json"))
        print(f"smear: {rule.describe()}; AUC {result['auc']['value']:.3f} over {result['n_smears']} smears "
              f"(threshold: {rule.threshold_from})"
              + (f"; the number of cells alone: AUC {result['cell_count_auc']['value']:.3f}"
                 if "cell_count_auc" in result else "")
              + (f"; per site in metrics/smear.json ({len(result['per_site'])} sites)" if "per_site" in result else "")
              + (f"; {result['per_site_note']}" if "per_site_note" in result else ""))

        mlflow.log_params({**{k: str(v) for k, v in s.items()}, "deployed_score": rule.score})
        # per-site figures stay in metrics/smear.json: site names are free text, MLflow metric names are not
        logged = {k: v for k, v in result.items() if k not in ("roc", "deployed_rule", "per_site")}
        mlflow.log_metrics(flatten_metrics(logged, "smear"))
        log_stage_outputs(OUT, "smear")


if __name__ == "__main__":
    run_cli(main)
