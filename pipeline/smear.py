"""DVC stage `smear`: share of cells called positive per smear, ROC, threshold, blind classification."""

from pathlib import Path

import pandas as pd

from smearnet.config import load_params
from smearnet.errors import run_cli
from smearnet.io import write_json, write_text
from smearnet.plots import roc_png, roc_records
from smearnet.smear import smear_evaluation, smear_table
from smearnet.tracking import flatten_metrics, revision_tags, setup_mlflow

OUT = Path("reports/smear")


def main() -> None:
    import mlflow

    cfg = load_params()
    setup_mlflow(cfg.mlflow)  # fail fast, before any work, when the tracking server is unreachable
    cells = pd.read_csv("reports/evaluate/smear_cells.csv", dtype={"smear_id": str, "label": str, "predicted": str})
    table = smear_table(cells, str(cfg.evaluation.positive_class))
    s = cfg.smear
    result = smear_evaluation(table, str(s.score), rule=str(s.rule), fixed=float(s.fixed_threshold),
                              threshold_selection=str(s.threshold_selection),
                              selection_fraction=float(s.selection_fraction), folds=int(s.folds), seed=int(cfg.seed),
                              confidence=float(cfg.evaluation.confidence), n_resamples=int(s.bootstrap_resamples))
    roc = result["roc"]
    write_text(pd.DataFrame(roc_records(roc["fpr"], roc["tpr"], roc["thresholds"])).to_csv(index=False),
               OUT / "roc.csv")
    write_text(table.to_csv(index=False), OUT / "smears.csv")
    roc_png({str(s.score): {"fpr": roc["fpr"], "tpr": roc["tpr"], "auc": result["auc"]["value"]}},
            OUT / "roc.png", title=f"Smear-level ROC ({len(table)} smears)")
    write_json({k: v for k, v in result.items() if k != "roc"}, Path("metrics/smear.json"))
    print(f"smear: AUC {result['auc']['value']:.3f}, threshold {result['threshold']:.4f} "
          f"({s.threshold_selection}, {s.rule})")

    with mlflow.start_run(run_name="smear", tags={**revision_tags(experiment=str(cfg.mlflow.experiment)),
                                                  "stage": "smear"}):
        mlflow.log_params({k: str(v) for k, v in s.items()})
        mlflow.log_metrics(flatten_metrics({k: v for k, v in result.items() if k != "roc"}, "smear"))
        mlflow.log_artifacts(str(OUT), artifact_path="smear")


if __name__ == "__main__":
    run_cli(main)
