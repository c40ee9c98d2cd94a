"""DVC stage `aggregate`: calibrated cells, every smear score side by side, the smear rule proposed.

1. One pass of the selected backbone, through the configured inference engine (the one predict and serving
   run), over the development, test and assessment cells: logits and penultimate-layer embeddings.
2. Temperature scaling fitted on the validation cells; the cell threshold (`smear.cell_threshold`: arg-max, one
   chosen on the calibrated validation cells, or a number) resolved there too (`smearnet.smear.cell_threshold`).
3. Every smear score, cross-validated on smears composed from development cells; the score (`smear.score:
   auto`, or the one it names) and a development threshold are fixed there (`smearnet.smear.run_aggregation`).
   Development cells never enter the evaluation smears: they are the validation (and, when the evaluation
   smears are an assessment cohort, test) cells.
4. The proposed rule (`reports/aggregate/smear_rule.json`, MIL aggregator in `mil/`) and the evaluation smears'
   cells (`evaluation_cells.csv`) go to the smear stage, which fixes the threshold and measures the rule.
"""

from dataclasses import replace
from pathlib import Path

import numpy as np

from smearnet.config import plain, stage_params
from smearnet.evaluation.calibration import CALIBRATION_FILE, fit_temperature, save_calibration, scaled_probabilities
from smearnet.errors import SmearnetError, run_cli
from smearnet.evaluation.cells import class_indices
from smearnet.models.inference import load_for_inference, selected_model, predictions_table
from smearnet.io import read_table, write_json, write_text
from smearnet.io import json_safe
from smearnet.smear.mil import cell_outputs
from smearnet.evaluation.plots import roc_png
from smearnet.smear import (AggregateParams, CellSet, SmearRule, check_cell_threshold_setting,
                            design_fitted_to_smears, evaluation_smears,
                            resolve_cell_threshold, run_aggregation, save_rule, smear_keys)
from smearnet.smear.report import roc_curves, scores_markdown
from smearnet.pseudonyms import pseudonym
from smearnet.pseudonyms import id_key
from smearnet.tracking.runs import flatten_metrics, log_stage_outputs, stage_run

OUT = Path("reports/aggregate")


def main() -> None:
    import mlflow

    cfg = stage_params("aggregate")
    id_key()  # a missing pseudonym key stops the stage before any work
    with stage_run(cfg.mlflow, "aggregate"):  # opened before the work: the run spans the stage
        positive, seed = str(cfg.data.positive_class), int(cfg.seed)
        params = AggregateParams.from_config(cfg.aggregate, cfg.smear.compose, float(cfg.evaluation.confidence),
                                             threshold_rule=str(cfg.smear.threshold_rule),
                                             fixed_threshold=float(cfg.smear.fixed_threshold))
        cell_setting = check_cell_threshold_setting(cfg.smear.cell_threshold)  # a bad value stops before any work
        selected, inference = selected_model(plain(cfg.inference), Path("reports/benchmark/selection.json"))
        split_manifest = read_table(Path("data/split/manifest.csv"))
        min_mixed_smears = int(cfg.smear.compose.fit_to_development)
        if min_mixed_smears:  # compose development smears like the cohort's own
            design, design_from = design_fitted_to_smears(split_manifest[split_manifest["split"] != "assessment"],
                                                          positive, params.design, min_mixed_smears=min_mixed_smears)
            params = replace(params, design=design, design_from=design_from)
        model = load_for_inference(Path("models") / selected, split_manifest, inference, seed=seed)

        smears, smears_from = evaluation_smears(split_manifest, cfg.smear.compose, positive_class=positive, seed=seed)
        development_splits = ["val", "test"] if smears_from == "assessment cohort" else ["val"]
        cells = split_manifest[split_manifest["split"].isin(["val", "test", "assessment"])]
        is_val = (cells["split"] == "val").to_numpy()
        if not is_val.any():
            raise SmearnetError("The validation split is empty: nothing to fit the temperature on.",
                                "Give split.val a positive share.")
        outputs = cell_outputs(model, cells.reset_index(drop=True), batch_size=int(cfg.aggregate.batch_size),
                               progress=True)
        low, high = (float(bound) for bound in cfg.aggregate.temperature_bounds)
        calibration = fit_temperature(outputs.logits[is_val], class_indices(cells.loc[is_val, "label"], model.classes),
                                      bounds=(low, high))
        table = predictions_table(cells, scaled_probabilities(outputs.logits, calibration.temperature), model.classes)
        table["patient_id"] = [pseudonym(patient) for patient in cells["patient_id"]]
        cell_threshold = resolve_cell_threshold(cell_setting, table[f"prob_{positive}"].to_numpy(),
                                                (cells["label"] == positive).to_numpy(), validation=is_val,
                                                confidence=params.confidence)
        every_cell = CellSet(table, outputs.embeddings)
        development = every_cell.subset(cells["split"].isin(development_splits).to_numpy())
        positions = cells.index.get_indexer(smears["cell_index"] if "cell_index" in smears else smears.index)
        smear_ids = np.array(smear_keys(smears), dtype=object)
        evaluation = every_cell.subset(positions)
        evaluation.cells["smear_id"] = smear_ids

        result = run_aggregation(development, evaluation, positive, params, seed, score=str(cfg.smear.score),
                                 cell_threshold=cell_threshold.threshold)
        rule = SmearRule(score=result.choice.chosen, positive_class=positive, threshold=result.threshold,
                         temperature=calibration.temperature, cell_threshold=cell_threshold.threshold,
                         threshold_rule=params.threshold_rule,
                         chosen_by=result.choice.reason,
                         threshold_from=f"{params.threshold_rule} on composed development smears (out-of-fold)")

        save_calibration(calibration, OUT / CALIBRATION_FILE)
        save_rule(rule, OUT, result.development.aggregator if rule.uses_mil else None)
        engine_probabilities = predictions_table(cells, scaled_probabilities(outputs.logits, 1.0), model.classes)
        evaluation_cells = engine_probabilities.iloc[positions].reset_index(drop=True)
        evaluation_cells["smear_id"] = smear_ids
        if "part" in smears.columns:
            evaluation_cells.insert(1, "part", smears["part"].to_numpy())
            evaluation_cells["cell_index"] = smears["cell_index"].to_numpy()  # composed smears reuse cells
        evaluation_cells["site"] = smears["site"].to_numpy()  # the smear stage's per-site figures
        write_text(evaluation_cells.to_csv(index=False), OUT / "evaluation_cells.csv")
        if rule.uses_mil:
            np.save(OUT / "evaluation_embeddings.npy", outputs.embeddings[positions])
        write_json({"model": selected, "classes": model.classes, "engine": model.engine.spec.label,
                    "smears_from": smears_from,
                    "development_splits": development_splits, **rule.to_dict()}, OUT / "selection.json")
        write_text(result.development.composed.to_csv(index=False), OUT / "development_smears.csv")
        write_text(result.development.natural.to_csv(index=False), OUT / "development_natural_smears.csv")
        curves_from, curves = "development, composed (out-of-fold)", roc_curves(result.choice.aucs)
        if result.assessment is not None:
            write_text(result.assessment.table.to_csv(index=False), OUT / "evaluation_smears.csv")
            curves_from, curves = f"evaluation smears ({smears_from})", roc_curves(result.assessment.aucs)
        roc_png(curves, OUT / "roc_all.png", title=f"Smear scores: {curves_from}")
        roc_png(roc_curves(result.choice.aucs), OUT / "roc_development.png",
                title="Smear scores: development, composed (out-of-fold)")
        write_text(scores_markdown(result, model_name=selected, positive_class=positive,
                                   calibration=calibration.to_dict()), OUT / "scores.md")
        metrics = json_safe({"model": selected, "engine": model.engine.spec.label, "smears_from": smears_from,
                             "development_splits": development_splits, "calibration": calibration.to_dict(),
                             **result.metrics(), **cell_threshold.metrics()})
        write_json(metrics, Path("metrics/aggregate.json"))
        print(f"aggregate: T={calibration.temperature:.3f}, proposed {rule.score} (development threshold "
              f"{result.threshold:.4g}"
              + (f", cell threshold {rule.cell_threshold:.4g}" if rule.cell_threshold is not None else "")
              + f"), development from {'+'.join(development_splits)}, composed with {params.design.target_cells[0]}-"
              f"{params.design.target_cells[1]} positive cells among {params.design.cells_per_smear[0]}-"
              f"{params.design.cells_per_smear[1]} (from {params.design_from}), evaluation: {smears_from}")

        mlflow.log_params({"chosen_score": result.choice.chosen, "fold_unit": result.development.fold_unit,
                           **{f"aggregate.{k}": str(v) for k, v in cfg.aggregate.items()}})
        mlflow.log_metrics(flatten_metrics({k: v for k, v in metrics.items() if k != "reason"}, "aggregate"))
        log_stage_outputs(OUT, "aggregate")


if __name__ == "__main__":
    run_cli(main)
