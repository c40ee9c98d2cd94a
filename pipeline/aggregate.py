"""DVC stage `aggregate`: calibrated cells, every smear score side by side, one chosen on development smears.

1. One pass of the selected backbone over the validation, test and assessment cells: logits and
   penultimate-layer embeddings.
2. Temperature scaling fitted on the validation cells (`calibration.json`).
3. Every smear score, cross-validated on smears composed from development cells (validation + test
   splits); the score and its threshold are chosen there (`smearnet.smear_scores.run_aggregation`).
4. The assessment smears are scored once and classified blind with the chosen score.
"""

import json
from pathlib import Path

from smearnet.calibration import CALIBRATION_FILE, fit_temperature, save_calibration, scaled_probabilities
from smearnet.config import load_params
from smearnet.errors import SmearnetError, run_cli
from smearnet.evaluate import class_indices
from smearnet.inference import load_trained, predictions_table
from smearnet.io import read_table, write_json, write_text
from smearnet.metrics import json_safe
from smearnet.mil import cell_outputs, save_mil
from smearnet.plots import roc_png
from smearnet.smear_scores import AggregateParams, CellSet, roc_curves, run_aggregation, scores_markdown
from smearnet.tracking import flatten_metrics, hash_patient_id, revision_tags, setup_mlflow

OUT = Path("reports/aggregate")
DEVELOPMENT_SPLITS = ("val", "test")


def main() -> None:
    import mlflow

    cfg = load_params()
    setup_mlflow(cfg.mlflow)  # fail fast, before any work, when the tracking server is unreachable
    positive = str(cfg.evaluation.positive_class)
    params = AggregateParams.from_config(cfg.aggregate, float(cfg.evaluation.confidence))
    selected = json.loads(Path("reports/benchmark/selection.json").read_text())["selected"]
    model = load_trained(Path("models") / selected)

    split_manifest = read_table(Path("data/split/manifest.csv"))
    cells = split_manifest[split_manifest["split"].isin([*DEVELOPMENT_SPLITS, "assessment"])].reset_index(drop=True)
    is_val = (cells["split"] == "val").to_numpy()
    if not is_val.any():
        raise SmearnetError("The validation split is empty: nothing to fit the temperature on.",
                            "Give split.val a positive share.")
    outputs = cell_outputs(model, cells, batch_size=int(cfg.aggregate.batch_size))

    low, high = (float(bound) for bound in cfg.aggregate.temperature_bounds)
    calibration = fit_temperature(outputs.logits[is_val], class_indices(cells.loc[is_val, "label"], model.classes),
                                  bounds=(low, high))
    table = predictions_table(cells, scaled_probabilities(outputs.logits, calibration.temperature), model.classes)
    table["patient_id"] = [hash_patient_id(patient) for patient in cells["patient_id"]]
    every_cell = CellSet(table, outputs.embeddings)
    development = every_cell.subset(cells["split"].isin(DEVELOPMENT_SPLITS).to_numpy())
    is_assessment = (cells["split"] == "assessment").to_numpy()
    assessment = every_cell.subset(is_assessment) if is_assessment.any() else None

    result = run_aggregation(development, assessment, positive, params, int(cfg.seed))

    save_calibration(calibration, OUT / CALIBRATION_FILE)
    save_mil(result.development.aggregator, OUT / "mil")
    write_json({"model": selected, "chosen_score": result.choice.chosen, "threshold": result.threshold,
                "threshold_rule": params.threshold_rule, "temperature": calibration.temperature,
                "reason": result.choice.reason, "mil": "mil/"}, OUT / "selection.json")
    write_text(result.development.composed.to_csv(index=False), OUT / "development_smears.csv")
    write_text(result.development.natural.to_csv(index=False), OUT / "development_natural_smears.csv")
    curves_from = "development, composed (out-of-fold)"
    curves = roc_curves(result.choice.aucs)
    if result.assessment is not None:
        write_text(result.assessment.table.to_csv(index=False), OUT / "assessment_smears.csv")
        curves_from, curves = "assessment, blind", roc_curves(result.assessment.aucs)
    roc_png(curves, OUT / "roc_all.png", title=f"Smear scores: {curves_from}")
    roc_png(roc_curves(result.choice.aucs), OUT / "roc_development.png",
            title="Smear scores: development, composed (out-of-fold)")
    write_text(scores_markdown(result, model_name=selected, positive_class=positive,
                               calibration=calibration.to_dict()), OUT / "scores.md")
    metrics = json_safe({"model": selected, "calibration": calibration.to_dict(), **result.metrics()})
    write_json(metrics, Path("metrics/aggregate.json"))
    blind = metrics.get("assessment", {}).get("auc", {}).get(result.choice.chosen, {}).get("value")
    print(f"aggregate: T={calibration.temperature:.3f}, chosen {result.choice.chosen} >= {result.threshold:.4g}"
          + (f", assessment AUC {blind:.3f}" if blind is not None else ""))

    with mlflow.start_run(run_name="aggregate", tags={**revision_tags(experiment=str(cfg.mlflow.experiment)),
                                                      "stage": "aggregate", "backbone": selected}):
        mlflow.log_params({"chosen_score": result.choice.chosen, "fold_unit": result.development.fold_unit,
                           **{f"aggregate.{k}": str(v) for k, v in cfg.aggregate.items()}})
        mlflow.log_metrics(flatten_metrics({k: v for k, v in metrics.items() if k != "reason"}, "aggregate"))
        mlflow.log_artifacts(str(OUT), artifact_path="aggregate")


if __name__ == "__main__":
    run_cli(main)

