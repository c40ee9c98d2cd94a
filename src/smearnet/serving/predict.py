"""`smearnet predict`: classify every cell image of one smear (a folder) or many (a manifest CSV), call each smear.

The model is a registry URI (`models:/<name>@champion`, `models:/<name>/<version>`, `runs:/...`), a downloaded
pyfunc folder (with `MLmodel`), or a local `models/<name>` folder written by the train stage (offline use).
Each smear is called by the smear rule registered with the model (`smear_rule.json`: score, calibration,
threshold), through `SmearRule.classify`, as the pipeline measured it and the served model applies it; a bare
train-stage folder takes the workspace's measured rule (`reports/smear/smear_rule.json`; only the folder of the
backbone it was measured on, the one the benchmark stage selected); `--threshold`
replaces the rule's threshold. The workspace's params.yaml (tracking URI, inference engine) is read once
(`read_workspace`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf
from PIL import Image
from tqdm import tqdm

from smearnet.data.decode import IMAGE_SUFFIXES, load_rgb
from smearnet.data.manifest import canonical_columns, identifier, shared_smear_ids
from smearnet.errors import SmearnetError
from smearnet.io import json_safe, read_json
from smearnet.models.inference import (SERVING_FILE, TrainedModel, load_trained, read_serving, resolve_inference,
                                       serving_engine)
from smearnet.serving.batches import classify_in_batches
from smearnet.smear.calls import call_cells, served_rule
from smearnet.smear.mil import MILAggregator
from smearnet.smear.rule import RULE_FILE, SmearRule, load_rule
from smearnet.tracking.runs import check_reachable

WORKSPACE_PARAMS = Path("params.yaml")
WORKSPACE_RULE = Path("reports/smear")
WORKSPACE_SELECTION = Path("reports/benchmark/selection.json")  # the selected model and, for engine auto, its engine
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "file:/")


@dataclass(frozen=True)
class Workspace:
    """What predict takes from the pipeline workspace it runs in (params.yaml, read once by `read_workspace`)."""

    tracking_uri: str = DEFAULT_TRACKING_URI  # mlflow.tracking_uri: where models:/ URIs resolve
    inference: dict[str, Any] | None = None  # the `inference` section: how a train-stage folder is run
    rule_dir: Path = WORKSPACE_RULE  # the smear rule the smear stage measured
    selection: dict[str, Any] | None = None  # reports/benchmark/selection.json: the engine `auto` picked

    def model_inference(self) -> dict[str, Any] | None:
        """How a train-stage folder of this workspace is run: `inference`, with `engine: auto` resolved to the
        engine the benchmark stage picked (as evaluate used it); a clear error when it has not run."""
        return resolve_inference(self.inference, self.selection or {}) if self.inference else None


def read_workspace(params: Path = WORKSPACE_PARAMS) -> Workspace:
    """The workspace's settings from `params` (defaults when there is no such file: predict outside a workspace)."""
    if not Path(params).is_file():
        return Workspace()
    cfg = OmegaConf.to_container(OmegaConf.load(params), resolve=True)
    selection = Path(params).parent / WORKSPACE_SELECTION
    return Workspace(tracking_uri=str((cfg.get("mlflow") or {}).get("tracking_uri") or DEFAULT_TRACKING_URI),
                     inference=cfg.get("inference"), selection=read_json(selection) if selection.is_file() else None)


@dataclass
class LoadedModel:
    """A model ready to classify cells, with the smear rule it was registered with."""

    model: TrainedModel
    serving: dict[str, Any]
    source: str
    rule: SmearRule
    aggregator: MILAggregator | None = None
    rule_source: str = "smear_rule.json"


@dataclass
class Prediction:
    """Per-cell rows, per-smear summary and totals of one `predict` call."""

    cells: pd.DataFrame
    smears: pd.DataFrame
    cells_per_class: dict[str, int]
    loaded: LoadedModel
    skipped_files: list[str] = field(default_factory=list)


def load_model(spec: str, *, threshold: float | None = None, tracking_uri: str | None = None,
               workspace: Workspace | None = None) -> LoadedModel:
    """Resolve `--model`: a registry/run URI (downloaded) or a local model folder, with its smear rule.

    A registered version carries its rule (`smear_rule.json`); a workspace's `models/<name>` folder takes the
    workspace's measured rule (`reports/smear/smear_rule.json`). `threshold` replaces the rule's threshold.
    `workspace` defaults to the one in the working directory (`read_workspace`).
    """
    workspace = workspace if workspace is not None else read_workspace()
    path = Path(spec).expanduser()
    if spec.startswith(URI_SCHEMES):
        with tempfile.TemporaryDirectory(prefix="smearnet-model-") as tmp:
            model_dir = _download(spec, Path(tmp), tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                                  or workspace.tracking_uri)
            serving = read_serving(model_dir)
            model = serving_engine(load_trained(model_dir), serving, model_dir)  # ONNX sessions load here
            rule, aggregator = served_rule(model_dir, serving)
        rule_source = "registered with the model"
    elif path.is_dir():
        model_dir = _local_model_dir(path) if (path / "MLmodel").is_file() else path
        serving = read_serving(model_dir)
        trained = load_trained(model_dir)
        if (model_dir / SERVING_FILE).is_file():
            rule, aggregator = served_rule(model_dir, serving)
            rule_source = "registered with the model"
        else:  # a workspace's models/<name>: the workspace's engine and measured rule
            _check_measured_backbone(trained.name, workspace)
            serving["inference"] = workspace.model_inference()
            rule, aggregator = _workspace_rule(workspace.rule_dir)
            rule_source = str(workspace.rule_dir / RULE_FILE)
        model = serving_engine(trained, serving, model_dir)
    else:
        raise SmearnetError(f"--model {spec!r} is neither a model URI nor an existing folder.",
                            "pass models:/<name>@champion (with MLFLOW_TRACKING_URI set) or a models/<name> folder.")
    if threshold is not None:
        rule, rule_source = rule.with_threshold(float(threshold), "--threshold"), f"{rule_source}, --threshold"
    if rule.positive_class not in model.classes:
        raise SmearnetError(f"The positive class {rule.positive_class!r} is not one of {model.classes}.",
                            "re-register the model (register stage).")
    return LoadedModel(model=model, serving=serving, source=spec, rule=rule, aggregator=aggregator,
                       rule_source=rule_source)


def collect_cells(source: Path) -> tuple[pd.DataFrame, list[str]]:
    """Cells to classify as (path, smear_id[, label]) and the files skipped as not images.

    A folder is one smear (its name is the smear id; images found recursively); a CSV lists `path` and
    `smear_id` (or `patient_id`) per row, relative paths resolving against the CSV's folder; the header and the id
    cells are read as the pipeline reads a manifest's (`smearnet.data.manifest`), and a smear id written for several
    patients is refused.
    """
    source = Path(source).expanduser()
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        skipped = [str(p) for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
        if not images:
            raise SmearnetError(f"No images ({', '.join(IMAGE_SUFFIXES)}) found under {source}.",
                                "point predict at a folder of one smear's cell images, or at a manifest CSV.")
        name = source.resolve().name
        return pd.DataFrame({"path": [str(p) for p in images], "smear_id": name}), skipped
    if source.is_file() and source.suffix.lower() == ".csv":
        table = pd.read_csv(source, dtype=str, keep_default_na=False)
        table = table.loc[:, [bool(str(name).strip()) for name in table.columns]]  # unnamed columns are ignored
        table.columns = canonical_columns(source, table.columns)  # as the pipeline reads a manifest's header
        for name in ("smear_id", "patient_id"):
            if name in table:
                table[name] = table[name].map(identifier)
        if "smear_id" not in table and "patient_id" in table:
            table["smear_id"] = table["patient_id"]
        elif "patient_id" in table:
            refuse_shared_smear_ids(source, table)
        missing = [c for c in ("path", "smear_id") if c not in table]
        if missing or table.empty:
            raise SmearnetError(f"Manifest {source} needs the columns path and smear_id and at least one row; "
                                f"it has {list(table.columns)} and {len(table)} rows.",
                                "write one row per cell image: path,smear_id[,label].")
        folder = source.resolve().parent
        table["path"] = [str(folder / p) if not os.path.isabs(p) else p for p in table["path"].str.strip()]
        keep = ["path", "smear_id", *(["label"] if "label" in table else [])]
        return table[keep].reset_index(drop=True), []
    raise SmearnetError(f"{source} is neither a folder of images nor a manifest CSV.",
                        "pass a folder (one smear) or a .csv with path,smear_id columns (many smears).")


def refuse_shared_smear_ids(source: Path, table: pd.DataFrame) -> None:
    """Refuse smear ids that repeat for several patients (smears numbered 1, 2, ... per patient): predict calls
    each smear_id as one smear and prints it, so it can neither merge them nor rename them after the patient."""
    shared = table.loc[shared_smear_ids(table), "smear_id"].nunique()
    if shared:
        raise SmearnetError(f"{shared} smear_id(s) of {source} repeat for more than one patient; predict would call "
                            "each such id as one smear, mixing patients.",
                            "give every smear an id of its own (the pipeline reads such ids as patient_id::smear_id; "
                            "predict prints smear ids, so it does not put patient ids into them).")


def predict_cells(loaded: LoadedModel, cells: pd.DataFrame, *, batch_size: int = 32, progress: bool = True,
                  skipped_files: list[str] | None = None) -> Prediction:
    """Classify every cell, `batch_size` decoded at a time (bad images become rows with `error`), then call each
    smear with the model's rule."""
    classes = loaded.model.classes
    errors: list[str] = []
    with tqdm(total=len(cells), desc="classify cells", unit="img", disable=not progress) as bar:
        def batches() -> Iterator[list[Image.Image | None]]:
            for start in range(0, len(cells), batch_size):
                images: list[Image.Image | None] = []
                for path in cells["path"].iloc[start:start + batch_size]:
                    try:
                        images.append(load_rgb(Path(path)))
                        errors.append("")
                    except SmearnetError as err:
                        images.append(None)
                        errors.append(err.what.replace(f"Cannot load image {path}: ", "").rstrip("."))
                yield images
                bar.update(len(images))

        probabilities, embeddings = classify_in_batches(loaded.model, batches(), embeddings=loaded.rule.uses_mil)
    table, smears = call_cells(loaded.rule, loaded.aggregator, classes, cells["smear_id"], probabilities,
                               embeddings=embeddings, errors=errors)
    table.insert(0, "path", list(cells["path"]))
    if "label" in cells:
        table.insert(2, "label", list(cells["label"]))
    table["max_probability"] = table[[f"prob_{name}" for name in classes]].max(axis=1)  # calibrated, as prob_*
    ok = table[table["error"] == ""]
    counts = {name: int((ok["predicted"] == name).sum()) for name in classes}
    return Prediction(cells=table, smears=smear_summary(table, smears, classes), cells_per_class=counts,
                      loaded=loaded, skipped_files=list(skipped_files or []))


def smear_summary(cells: pd.DataFrame, smears: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """One row per smear: cells classified, errors, cells per class, the score, threshold and call."""
    rows = []
    by_smear = smears.set_index("smear_id")
    for smear_id, group in cells.groupby("smear_id", sort=True):
        ok = group[group["error"] == ""]
        called = by_smear.loc[str(smear_id)]
        rows.append({"smear_id": smear_id, "cells": len(ok), "errors": int((group["error"] != "").sum()),
                     **{name: int((ok["predicted"] == name).sum()) for name in classes},
                     "score": float(called["score"]), "threshold": float(called["threshold"]),
                     "call": str(called["call"])})
    return pd.DataFrame(rows)


def least_sure(prediction: Prediction, k: int = 10) -> pd.DataFrame:
    """The `k` decodable cells with the lowest top-class probability."""
    ok = prediction.cells[prediction.cells["error"] == ""]
    return ok.nsmallest(k, "max_probability")[["path", "smear_id", "predicted", "max_probability"]]


def to_json(prediction: Prediction) -> dict[str, Any]:
    """The JSON document: model, rule, cells per class, smears and one row per cell (NaN -> null)."""
    rule = prediction.loaded.rule
    return json_safe({
        "model": prediction.loaded.source, "positive_class": rule.positive_class, "smear_rule": rule.to_dict(),
        "rule_from": prediction.loaded.rule_source,
        "cells_per_class": prediction.cells_per_class, "errors": int((prediction.cells["error"] != "").sum()),
        "skipped_files": prediction.skipped_files, "smears": prediction.smears.to_dict(orient="records"),
        "cells": prediction.cells.to_dict(orient="records"),
    })


def to_markdown(prediction: Prediction, k: int = 10) -> str:
    """Markdown report: per-smear calls, cells per class, the threshold and the least certain images."""
    rule = prediction.loaded.rule
    positive = rule.positive_class
    total = sum(prediction.cells_per_class.values())
    share = prediction.cells_per_class.get(positive, 0) / total if total else float("nan")
    lines = ["# Smear prediction", "", f"- Model: `{prediction.loaded.source}`",
             f"- Positive class: `{positive}`; a smear is positive when {rule.describe()} (rule "
             f"{prediction.loaded.rule_source}; threshold: {rule.threshold_from})",
             f"- Cells classified: {total}; share positive overall: {share:.4f}; images with errors: "
             f"{int((prediction.cells['error'] != '').sum())}", "", "## Smears", "",
             _markdown_table(prediction.smears, floats=("score", "threshold")), "## Cells per class", "",
             _markdown_table(pd.DataFrame([prediction.cells_per_class])),
             "## Least certain images (lowest top-class probability)", "",
             _markdown_table(least_sure(prediction, k), floats=("max_probability",))]
    errors = prediction.cells[prediction.cells["error"] != ""]
    if not errors.empty:
        lines += ["## Images that could not be classified", "", _markdown_table(errors[["path", "smear_id", "error"]])]
    if prediction.skipped_files:
        lines += [f"Skipped {len(prediction.skipped_files)} non-image file(s).", ""]
    return "\n".join(lines)


def to_html(prediction: Prediction, *, cells_per_smear: int = 6) -> str:
    """A self-contained HTML page: per smear the score against the threshold and the cells that weighed most,
    each with its Grad-CAM heat map of the positive class (`smearnet.explain`)."""
    from smearnet.explain import explain_smears, smear_report_html  # heavy (captum): only for --report *.html

    rule = prediction.loaded.rule
    smears = prediction.smears.rename(columns={"cells": "n_cells"})
    explained = explain_smears(prediction.loaded.model, rule.positive_class, rule.score, prediction.cells, smears,
                               load_image=lambda path: load_rgb(Path(path)), cells_per_smear=cells_per_smear)
    return smear_report_html(explained, title="Smear prediction", model=prediction.loaded.source,
                             positive_class=rule.positive_class)


def print_summary(prediction: Prediction, k: int = 5) -> None:
    """The per-smear table and the least certain images on stdout."""
    print(prediction.smears.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("\nleast certain images (top-class probability):")
    print(least_sure(prediction, k).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    errors = prediction.cells[prediction.cells["error"] != ""]
    for _, row in errors.iterrows():
        print(f"error: {row['path']}: {row['error']}")
    for smear in prediction.smears.itertuples():
        print(f"smear {smear.smear_id}: {smear.call.upper()} ({prediction.loaded.rule.score} {smear.score:.4f} over "
              f"{smear.cells} cells, threshold {smear.threshold:.4f})")


def _markdown_table(frame: pd.DataFrame, floats: tuple[str, ...] = ()) -> str:
    if frame.empty:
        return "(none)\n"
    rows = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    for record in frame.itertuples(index=False):
        rows.append("| " + " | ".join(f"{v:.4f}" if c in floats and isinstance(v, float) else str(v)
                                      for c, v in zip(frame.columns, record, strict=True)) + " |")
    return "\n".join(rows) + "\n"


def _download(uri: str, dst: Path, uri_store: str) -> Path:
    # MLflow takes seconds to import: only registry URIs and pyfunc folders need it.
    import mlflow

    from smearnet.registry.store import download_model_dir

    check_reachable(uri_store)
    mlflow.set_tracking_uri(uri_store)
    try:
        return download_model_dir(uri, dst)
    except mlflow.exceptions.MlflowException as err:
        raise SmearnetError(f"Could not fetch {uri} from the tracking store {uri_store}: {err.message}",
                            "check the model name and alias (`champion` exists once the register stage ran) "
                            "and MLFLOW_TRACKING_URI.") from None


def _local_model_dir(pyfunc_folder: Path) -> Path:
    from smearnet.registry.store import local_model_dir  # imports MLflow (seconds): only for pyfunc folders

    return local_model_dir(pyfunc_folder)


def _check_measured_backbone(name: str, workspace: Workspace) -> None:
    """A workspace's rule (calibration, cell and smear thresholds, MIL weights) and its `auto` engine belong to the
    backbone the benchmark stage selected: another backbone's folder must not borrow them."""
    selected = (workspace.selection or {}).get("selected")
    if selected is not None and selected != name:
        raise SmearnetError(f"This workspace's smear rule ({workspace.rule_dir / RULE_FILE}) and engine were measured "
                            f"on {selected!r}, the backbone the benchmark stage selected, not on {name!r}.",
                            f"pass --model models/{selected}, or a registered version of {name!r} (it carries its "
                            "own rule), or select it (benchmark.select_by) and re-run `dvc repro`.")


def _workspace_rule(rule_dir: Path) -> tuple[SmearRule, MILAggregator | None]:
    """The smear rule the workspace's smear stage measured."""
    if not (rule_dir / RULE_FILE).is_file():
        raise SmearnetError(f"This model folder has no smear rule and there is no {rule_dir / RULE_FILE} here.",
                            "run predict from the pipeline workspace after `dvc repro smear`, or pass a registered "
                            "model (models:/<name>@champion).")
    return load_rule(rule_dir)
