"""DVC stage `evaluate`: cell-level metrics of the selected backbone on the test split."""

from pathlib import Path

from smearnet.config import plain, stage_params
from smearnet.errors import run_cli
from smearnet.evaluation.cells import evaluate_cells
from smearnet.models.inference import load_for_inference, selected_model
from smearnet.io import read_table, write_json, write_text
from smearnet.pseudonyms import id_key
from smearnet.tracking.runs import flatten_metrics, log_dataset, log_stage_outputs, stage_run

OUT = Path("reports/evaluate")


def main() -> None:
    import mlflow

    params = stage_params("evaluate")
    id_key()  # a missing pseudonym key stops the stage before any work
    with stage_run(params.mlflow, "evaluate"):  # opened before the work: the run spans the stage
        selected, inference = selected_model(plain(params.inference), Path("reports/benchmark/selection.json"))
        split_manifest = read_table(Path("data/split/manifest.csv"))
        model = load_for_inference(Path("models") / selected, split_manifest, inference, seed=int(params.seed))
        test = split_manifest[split_manifest["split"] == "test"]
        positive, evaluation = str(params.data.positive_class), params.evaluation
        metrics, table = evaluate_cells(model, test, positive, batch_size=int(evaluation.batch_size),
                                        confidence=float(evaluation.confidence),
                                        n_resamples=int(evaluation.bootstrap_resamples), out_dir=OUT,
                                        class_mix=plain(evaluation.class_mix))
        write_text(table.to_csv(index=False), OUT / "predictions.csv")
        write_json({"model": selected, "engine": model.engine.spec.label, **metrics}, Path("metrics/cell.json"))
        mlflow.set_tag("backbone", selected)
        log_dataset(test, name="test", context="evaluation", source="data/split/manifest.csv")
        print(f"evaluate {selected}: cell accuracy {metrics['accuracy']['value']:.4f} on {len(test)} test cells"
              + (f" from {len(metrics['per_site'])} sites" if "per_site" in metrics else ""))
        if "accuracy_at_class_mix" in metrics:
            mixed = metrics["accuracy_at_class_mix"]
            print(f"evaluate {selected}: at evaluation.class_mix, accuracy {mixed['value']:.4f} "
                  f"({mixed['low']:.4f}-{mixed['high']:.4f}), each class recalled as on the test cells")

        mlflow.log_params({"positive_class": positive, "test_cells": len(test),
                           "inference_engine": model.engine.spec.label})
        # per-site figures stay in metrics/cell.json and per_site.md: site names are free text, MLflow metric names
        # are not
        mlflow.log_metrics(flatten_metrics({k: v for k, v in metrics.items() if k != "per_site"}, "cell"))
        log_stage_outputs(OUT, "evaluate")


if __name__ == "__main__":
    run_cli(main)
