"""DVC stage `benchmark`: Table 1 over the validation split for every trained backbone and inference engine;
selects the model on it. The test split is left to `evaluate`, which measures the selected model on it once."""

from pathlib import Path

import pandas as pd

from smearnet.config import stage_params
from smearnet.evaluation.benchmark import (BenchmarkSettings, benchmark_engines, chosen_inference, device_name,
                                          markdown_table,
                                          select_model, selection_cells)
from smearnet.errors import run_cli
from smearnet.io import read_table, write_json, write_text
from smearnet.tracking.runs import stage_run

COLUMNS = ["model", "arch", "input_size", "device", "engine", "precision", "channels_last", "images", "accuracy",
           "agreement", "total_seconds", "ms_per_image", "images_per_second", "preprocess_ms_per_image",
           "peak_memory_mb", "parameters_m"]


def main() -> None:
    import mlflow

    params = stage_params("benchmark")
    with stage_run(params.mlflow, "benchmark") as stage:  # opened before the work: the run spans the stage
        settings = BenchmarkSettings.from_params(params.benchmark, params.inference, seed=int(params.seed))
        split_manifest = read_table(Path("data/split/manifest.csv"))
        val = selection_cells(split_manifest, settings.max_images)
        train = split_manifest[split_manifest["split"] == "train"]
        rows, chosen_rows, engine_reasons = [], [], {}
        for name in params.train.models:
            model_rows, chosen, why = benchmark_engines(Path("models") / name, val, train, settings)
            engine_reasons[name] = why
            rows += model_rows
            chosen_rows.append(chosen)
            for row in model_rows:
                print(f"benchmark {name} {row['engine']}-{row['precision']}: accuracy {row['accuracy']}, "
                      f"agreement {row.get('agreement', 1.0)}, {row['ms_per_image']} ms/image")
        selected, reason = select_model(chosen_rows, settings.select_by)
        engine = chosen_inference(next(r for r in chosen_rows if r["model"] == selected))
        out = Path("reports/benchmark")
        write_text(pd.DataFrame(rows).to_csv(index=False), out / "table1.csv")
        write_text(f"# Backbone comparison (paper 1, Table 1)\n\nOn the {len(val)} validation cells (accuracy, "
                   "agreement and times; the selected backbone's test figures are the evaluate stage's).\n\n"
                   + markdown_table(rows, COLUMNS)
                   + f"\nSelected: **{selected}**: {reason}.\n\nInference engine: {engine_reasons[selected]}.\n",
                   out / "table1.md")
        # `inference` is the engine evaluate, aggregate and register run the model by (and predict and serving,
        # through the registered serving.json): with inference.engine=auto, the one picked here.
        write_json({"selected": selected, "reason": reason, "rule": settings.select_by, "inference": engine,
                    "engine_reason": engine_reasons[selected], "timed_on": device_name()}, out / "selection.json")
        write_json({"selected": selected, "split": "val", "cells": len(val),
                    "models": {r["model"]: {k: r[k] for k in ("accuracy", "agreement", "ms_per_image",
                                                               "peak_memory_mb", "total_seconds")}
                               for r in chosen_rows}},
                   Path("metrics/benchmark.json"))
        row_tags = {key: value for key, value in stage.data.tags.items() if not key.startswith("mlflow.")}
        for row in rows:
            # One nested run per Table 1 row (backbone x engine), under the stage's run: compared side by side.
            with mlflow.start_run(run_name=f"benchmark-{row['model']}-{row['engine']}-{row['precision']}",
                                  nested=True, tags={**row_tags, "backbone": row["model"]}):
                mlflow.log_params({k: row[k] for k in ("device", "engine", "precision", "channels_last", "input_size",
                                                       "images", "batch_size")})
                mlflow.log_metrics({f"val/{k}": row[k] for k in ("accuracy", "agreement", "ms_per_image",
                                                                  "images_per_second", "peak_memory_mb", "total_seconds",
                                                                  "preprocess_ms_per_image", "build_seconds")})
                mlflow.log_artifacts(str(out), artifact_path="benchmark")


if __name__ == "__main__":
    run_cli(main)
