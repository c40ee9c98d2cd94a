"""`smearnet predict`: classify every cell image of one smear (a folder) or many (a manifest CSV), call each smear.

The model is a registry URI (`models:/<name>@champion`, `models:/<name>/<version>`, `runs:/...`), a downloaded
pyfunc folder (with `MLmodel`), or a local `models/<name>` folder written by the train stage (offline use).
The smear call uses the threshold stored with the model (`serving.json`); a bare train-stage folder takes it
from `--threshold`, else from the workspace's `metrics/smear.json`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from smearnet.errors import SmearnetError
from smearnet.inference import TrainedModel

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "file:/")


@dataclass
class LoadedModel:
    """A model ready to classify cells, with the smear rule it was registered with."""

    model: TrainedModel
    serving: dict[str, Any]
    source: str
    threshold_source: str


@dataclass
class Prediction:
    """Per-cell rows, per-smear summary and totals of one `predict` call."""

    cells: pd.DataFrame
    smears: pd.DataFrame
    cells_per_class: dict[str, int]
    loaded: LoadedModel
    skipped_files: list[str] = field(default_factory=list)


def load_model(spec: str, *, threshold: float | None = None, tracking_uri: str | None = None) -> LoadedModel:
    """Resolve `--model`: a registry/run URI (downloaded) or a local model folder."""
    from smearnet.inference import load_trained, serving_engine
    from smearnet.registry import SERVING_FILE, local_model_dir

    path = Path(spec).expanduser()
    if spec.startswith(URI_SCHEMES):
        with tempfile.TemporaryDirectory(prefix="smearnet-model-") as tmp:
            model_dir = _download(spec, Path(tmp), tracking_uri)
            serving = _read_json(model_dir / SERVING_FILE)
            model = serving_engine(load_trained(model_dir), serving, model_dir)  # ONNX sessions load here
    elif path.is_dir():
        model_dir = local_model_dir(path) if (path / "MLmodel").is_file() else path
        serving = _read_json(model_dir / SERVING_FILE)
        if not (model_dir / SERVING_FILE).is_file():  # a workspace's models/<name>: the workspace's engine
            serving["inference"] = _workspace_inference()
        model = serving_engine(load_trained(model_dir), serving, model_dir)
    else:
        raise SmearnetError(f"--model {spec!r} is neither a model URI nor an existing folder.",
                            "pass models:/<name>@champion (with MLFLOW_TRACKING_URI set) or a models/<name> folder.")
    source = "serving.json" if "smear_threshold" in serving else ""
    if threshold is not None:
        serving["smear_threshold"], source = float(threshold), "--threshold"
    elif not source:
        serving["smear_threshold"], source = _workspace_threshold(), "metrics/smear.json"
    if "positive_class" not in serving:
        serving["positive_class"] = _workspace_positive_class() or model.classes[-1]
        print(f"predict: positive class {serving['positive_class']!r} (not stored with the model)", file=sys.stderr)
    if serving["positive_class"] not in model.classes:
        raise SmearnetError(f"The positive class {serving['positive_class']!r} is not one of {model.classes}.",
                            "re-register the model (register stage).")
    return LoadedModel(model=model, serving=serving, source=spec, threshold_source=source)


def collect_cells(source: Path) -> tuple[pd.DataFrame, list[str]]:
    """Cells to classify as (path, smear_id[, label]) and the files skipped as not images.

    A folder is one smear (its name is the smear id; images found recursively); a CSV lists `path` and
    `smear_id` (or `patient_id`) per row, relative paths resolving against the CSV's folder.
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
        table.columns = [c.strip() for c in table.columns]
        if "smear_id" not in table and "patient_id" in table:
            table["smear_id"] = table["patient_id"]
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


def predict_cells(loaded: LoadedModel, cells: pd.DataFrame, *, batch_size: int = 32, progress: bool = True,
                  skipped_files: list[str] | None = None) -> Prediction:
    """Classify every cell (bad images become rows with `error`), then call each smear."""
    from PIL import Image
    from tqdm import tqdm

    from smearnet.inference import call_smears, image_probabilities
    from smearnet.ingest import load_rgb

    classes = loaded.model.classes
    chunks, errors = [], []
    with tqdm(total=len(cells), desc="classify cells", unit="img", disable=not progress) as bar:
        for start in range(0, len(cells), batch_size):
            images: list[Image.Image | None] = []
            for path in cells["path"].iloc[start:start + batch_size]:
                try:
                    images.append(load_rgb(Path(path)))
                    errors.append("")
                except SmearnetError as err:
                    images.append(None)
                    errors.append(err.what.replace(f"Cannot load image {path}: ", "").rstrip("."))
            chunks.append(image_probabilities(loaded.model, images))
            bar.update(len(images))
    probabilities = np.concatenate(chunks) if chunks else np.zeros((0, len(classes)), dtype=np.float32)
    table = call_smears(cells["smear_id"], probabilities, classes, loaded.serving, errors)
    table.insert(0, "path", list(cells["path"]))
    if "label" in cells:
        table.insert(2, "label", list(cells["label"]))
    decoded = ~np.isnan(probabilities).any(axis=1)
    top = np.full(len(probabilities), np.nan)
    top[decoded] = probabilities[decoded].max(axis=1)
    table["max_probability"] = top
    ok = table[table["error"] == ""]
    counts = {name: int((ok["predicted"] == name).sum()) for name in classes}
    return Prediction(cells=table, smears=smear_summary(table, classes, loaded.serving), cells_per_class=counts,
                      loaded=loaded, skipped_files=list(skipped_files or []))


def smear_summary(cells: pd.DataFrame, classes: list[str], serving: Mapping[str, Any]) -> pd.DataFrame:
    """One row per smear: cells classified, errors, cells per class, share positive, threshold, call."""
    rows = []
    for smear_id, group in cells.groupby("smear_id", sort=True):
        ok = group[group["error"] == ""]
        rows.append({"smear_id": smear_id, "cells": len(ok), "errors": int((group["error"] != "").sum()),
                     **{name: int((ok["predicted"] == name).sum()) for name in classes},
                     "share_positive": float(group["smear_share_positive"].iloc[0]),
                     "threshold": float(serving["smear_threshold"]), "call": str(group["smear_call"].iloc[0])})
    return pd.DataFrame(rows)


def least_sure(prediction: Prediction, k: int = 10) -> pd.DataFrame:
    """The `k` decodable cells with the lowest top-class probability."""
    ok = prediction.cells[prediction.cells["error"] == ""]
    return ok.nsmallest(k, "max_probability")[["path", "smear_id", "predicted", "max_probability"]]


def to_json(prediction: Prediction) -> dict[str, Any]:
    """The JSON document: model, rule, cells per class, smears and one row per cell (NaN -> null)."""
    from smearnet.metrics import json_safe

    serving = prediction.loaded.serving
    return json_safe({
        "model": prediction.loaded.source, "positive_class": serving["positive_class"],
        "smear_threshold": float(serving["smear_threshold"]), "threshold_from": prediction.loaded.threshold_source,
        "cells_per_class": prediction.cells_per_class, "errors": int((prediction.cells["error"] != "").sum()),
        "skipped_files": prediction.skipped_files, "smears": prediction.smears.to_dict(orient="records"),
        "cells": prediction.cells.to_dict(orient="records"),
    })


def to_markdown(prediction: Prediction, k: int = 10) -> str:
    """Markdown report: per-smear calls, cells per class, the threshold and the least certain images."""
    serving = prediction.loaded.serving
    positive, threshold = serving["positive_class"], float(serving["smear_threshold"])
    total = sum(prediction.cells_per_class.values())
    share = prediction.cells_per_class.get(positive, 0) / total if total else float("nan")
    lines = ["# Smear prediction", "", f"- Model: `{prediction.loaded.source}`",
             f"- Positive class: `{positive}`; a smear is positive when its share of `{positive}` cells is "
             f">= {threshold:.4f} (threshold from {prediction.loaded.threshold_source})",
             f"- Cells classified: {total}; share positive overall: {share:.4f}; images with errors: "
             f"{int((prediction.cells['error'] != '').sum())}", "", "## Smears", "",
             _markdown_table(prediction.smears, floats=("share_positive", "threshold")), "## Cells per class", "",
             _markdown_table(pd.DataFrame([prediction.cells_per_class])),
             "## Least certain images (lowest top-class probability)", "",
             _markdown_table(least_sure(prediction, k), floats=("max_probability",))]
    errors = prediction.cells[prediction.cells["error"] != ""]
    if not errors.empty:
        lines += ["## Images that could not be classified", "", _markdown_table(errors[["path", "smear_id", "error"]])]
    if prediction.skipped_files:
        lines += [f"Skipped {len(prediction.skipped_files)} non-image file(s).", ""]
    return "\n".join(lines)


def print_summary(prediction: Prediction, k: int = 5) -> None:
    """The per-smear table and the least certain images on stdout."""
    print(prediction.smears.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("\nleast certain images (top-class probability):")
    print(least_sure(prediction, k).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    errors = prediction.cells[prediction.cells["error"] != ""]
    for _, row in errors.iterrows():
        print(f"error: {row['path']}: {row['error']}")
    for smear in prediction.smears.itertuples():
        print(f"smear {smear.smear_id}: {smear.call.upper()} ({smear.share_positive:.4f} of {smear.cells} cells "
              f"{prediction.loaded.serving['positive_class']}, threshold {smear.threshold:.4f})")


def _markdown_table(frame: pd.DataFrame, floats: tuple[str, ...] = ()) -> str:
    if frame.empty:
        return "(none)\n"
    rows = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    for record in frame.itertuples(index=False):
        rows.append("| " + " | ".join(f"{v:.4f}" if c in floats and isinstance(v, float) else str(v)
                                      for c, v in zip(frame.columns, record, strict=True)) + " |")
    return "\n".join(rows) + "\n"


def _download(uri: str, dst: Path, tracking_uri: str | None) -> Path:
    import mlflow

    from smearnet.registry import download_model_dir
    from smearnet.tracking import check_reachable

    uri_store = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or _workspace_tracking_uri()
    check_reachable(uri_store)
    mlflow.set_tracking_uri(uri_store)
    try:
        return download_model_dir(uri, dst)
    except mlflow.exceptions.MlflowException as err:
        raise SmearnetError(f"Could not fetch {uri} from the tracking store {uri_store}: {err.message}",
                            "check the model name and alias (`champion` exists once the register stage ran) "
                            "and MLFLOW_TRACKING_URI.") from None


def _workspace_tracking_uri() -> str:
    params = Path("params.yaml")
    if params.is_file():
        from omegaconf import OmegaConf

        return str(OmegaConf.load(params).mlflow.tracking_uri)
    return "sqlite:///mlflow.db"


def _workspace_threshold() -> float:
    """The smear threshold of the pipeline workspace (metrics/smear.json)."""
    smear = Path("metrics/smear.json")
    if not smear.is_file():
        raise SmearnetError("This model folder has no serving.json (smear threshold) and there is no "
                            "metrics/smear.json here.", "pass --threshold 0.02 (or the threshold to use), or a "
                            "registered model (models:/<name>@champion).")
    return float(json.loads(smear.read_text())["threshold"])


def _workspace_positive_class() -> str | None:
    """evaluation.positive_class of the workspace's params.yaml, if there is one."""
    if not Path("params.yaml").is_file():
        return None
    from omegaconf import OmegaConf

    return str(OmegaConf.load("params.yaml").evaluation.positive_class)


def _workspace_inference() -> dict[str, Any] | None:
    """The `inference` section of the workspace's params.yaml (None: eager fp32)."""
    if not Path("params.yaml").is_file():
        return None
    from omegaconf import OmegaConf

    section = OmegaConf.load("params.yaml").get("inference")
    return OmegaConf.to_container(section, resolve=True) if section is not None else None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
