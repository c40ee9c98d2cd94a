"""DVC stage `benchmark`: Table 1 over the test split for every trained backbone; selects the model."""

from pathlib import Path

import pandas as pd

from smearnet.benchmark import benchmark_model, markdown_table, select_model
from smearnet.config import load_params
from smearnet.errors import run_cli
from smearnet.inference import load_trained
from smearnet.io import read_table, write_json, write_text
from smearnet.tracking import revision_tags, setup_mlflow

COLUMNS = ["model", "arch", "input_size", "device", "precision", "images", "accuracy", "total_seconds",
           "ms_per_image", "images_per_second", "peak_memory_mb", "parameters_m"]


def main() -> None:
    import mlflow

    cfg = load_params()
    setup_mlflow(cfg.mlflow)  # fail fast, before any work, when the tracking server is unreachable
    split_manifest = read_table(Path("data/split/manifest.csv"))
    test = split_manifest[split_manifest["split"] == "test"]
    if cfg.benchmark.max_images:
        test = test.iloc[: int(cfg.benchmark.max_images)]
    rows = []
    for name in cfg.train.models:
        model = load_trained(Path("models") / name)
        rows.append(benchmark_model(model, test, batch_size=int(cfg.benchmark.batch_size),
                                    warmup=int(cfg.benchmark.warmup), repeats=int(cfg.benchmark.repeats)))
        print(f"benchmark {name}: accuracy {rows[-1]['accuracy']}, {rows[-1]['ms_per_image']} ms/image")
    selected, reason = select_model(rows, str(cfg.benchmark.select_by))
    out = Path("reports/benchmark")
    write_text(pd.DataFrame(rows).to_csv(index=False), out / "table1.csv")
    write_text("# Backbone comparison (paper 1, Table 1)\n\n" + markdown_table(rows, COLUMNS)
               + f"\nSelected: **{selected}**: {reason}.\n", out / "table1.md")
    write_json({"selected": selected, "reason": reason, "rule": str(cfg.benchmark.select_by)}, out / "selection.json")
    write_json({"selected": selected, "models": {r["model"]: {k: r[k] for k in
                ("accuracy", "ms_per_image", "peak_memory_mb", "total_seconds")} for r in rows}},
               Path("metrics/benchmark.json"))
    for row in rows:
        with mlflow.start_run(run_name=f"benchmark-{row['model']}",
                              tags={**revision_tags(experiment=str(cfg.mlflow.experiment)), "stage": "benchmark",
                                    "backbone": row["model"]}):
            mlflow.log_params({k: row[k] for k in ("device", "precision", "input_size", "images")})
            mlflow.log_metrics({f"test/{k}": row[k] for k in ("accuracy", "ms_per_image", "images_per_second",
                                                              "peak_memory_mb", "total_seconds")})
            mlflow.log_artifacts(str(out), artifact_path="benchmark")


if __name__ == "__main__":
    run_cli(main)
