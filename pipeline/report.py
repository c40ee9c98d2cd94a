"""DVC stage `report`: one Markdown report for the run, logged to MLflow with the plots it embeds."""

import json
from pathlib import Path

from smearnet.config import stage_params
from smearnet.errors import run_cli
from smearnet.io import write_text
from smearnet.evaluation.report import build_report
from smearnet.tracking.runs import stage_run

REPORT = Path("reports/report.md")
# The plots the report links to (relative to reports/) and logs beside it: dvc.yaml declares each as a dependency.
IMAGES = (Path("reports/evaluate/confusion.png"), Path("reports/evaluate/confusion_normalised.png"),
          Path("reports/smear/roc.png"))


def main() -> None:
    import mlflow

    params = stage_params("report")
    with stage_run(params.mlflow, "report"):  # opened before the work: the run spans the stage
        report = build_report(Path("reports/benchmark/table1.md").read_text(),
                              json.loads(Path("reports/benchmark/selection.json").read_text()),
                              json.loads(Path("metrics/cell.json").read_text()),
                              json.loads(Path("metrics/smear.json").read_text()))
        path = write_text(report, REPORT)
        print(f"report: {path}")
        mlflow.log_artifact(str(path))
        for image in IMAGES:
            mlflow.log_artifact(str(image), artifact_path=image.parent.name)


if __name__ == "__main__":
    run_cli(main)
