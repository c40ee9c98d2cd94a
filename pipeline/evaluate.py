"""DVC stage `evaluate`: cell-level metrics of the selected backbone on the test split."""

import json
from pathlib import Path

from smearnet.config import load_params
from smearnet.errors import run_cli
from smearnet.evaluation.cells import evaluate_cells
from smearnet.models.inference import load_for_inference
from smearnet.io import read_table, write_json, write_text
from smearnet.tracking.runs import flatten_metrics, revision_tags, setup_mlflow

OUT = Path("reports/evaluate")


def main() -> None:
    import mlflow

    cfg = load_params()
    setup_mlflow(cfg.mlflow)  # fail fast, before any work, when the tracking server is unreachable
    selected = json.loads(Path("reports/benchmark/selection.json").read_text())["selected"]
    split_manifest = read_table(Path("data/split/manifest.csv"))
    model = load_for_inference(Path("models") / selected, cfg.inference,
                               split_manifest[split_manifest["split"] == "train"], seed=int(cfg.seed))
    test = split_manifest[split_manifest["split"] == "test"]
    positive = str(cfg.evaluation.positive_class)
    metrics, table = evaluate_cells(model, test, positive, batch_size=int(cfg.evaluation.batch_size),
                                    confidence=float(cfg.evaluation.confidence), out_dir=OUT)
    write_text(table.to_csv(index=False), OUT / "predictions.csv")
    write_json({"model": selected, "engine": model.engine.spec.label, **metrics}, Path("metrics/cell.json"))
    print(f"evaluate {selected}: cell accuracy {metrics['accuracy']['value']:.4f} on {len(test)} test cells")

    with mlflow.start_run(run_name=f"evaluate-{selected}", tags={**revision_tags(experiment=str(cfg.mlflow.experiment)),
                                                                 "stage": "evaluate", "backbone": selected}):
        mlflow.log_params({"positive_class": positive, "test_cells": len(test),
                           "inference_engine": model.engine.spec.label})
        mlflow.log_metrics(flatten_metrics(metrics, "cell"))
        mlflow.log_artifacts(str(OUT), artifact_path="evaluate")


if __name__ == "__main__":
    run_cli(main)
