"""DVC stage `report`: one Markdown report for the run, logged to MLflow."""

import json
from pathlib import Path

from smearnet.config import load_params
from smearnet.errors import run_cli
from smearnet.io import write_text
from smearnet.evaluation.report import build_report
from smearnet.tracking.runs import revision_tags, setup_mlflow


def main() -> None:
    import mlflow

    cfg = load_params()
    setup_mlflow(cfg.mlflow)  # fail fast, before any work, when the tracking server is unreachable
    report = build_report(Path("reports/benchmark/table1.md").read_text(),
                          json.loads(Path("reports/benchmark/selection.json").read_text()),
                          json.loads(Path("metrics/cell.json").read_text()),
                          json.loads(Path("metrics/smear.json").read_text()))
    path = write_text(report, Path("reports/report.md"))
    print(f"report: {path}")
    with mlflow.start_run(run_name="report", tags={**revision_tags(experiment=str(cfg.mlflow.experiment)),
                                                   "stage": "report"}):
        mlflow.log_artifact(str(path))
        for image in ("evaluate/confusion.png", "evaluate/confusion_normalised.png", "smear/roc.png"):
            mlflow.log_artifact(str(Path("reports") / image), artifact_path=str(Path(image).parent))


if __name__ == "__main__":
    run_cli(main)
