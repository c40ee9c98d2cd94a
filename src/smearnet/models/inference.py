"""Loading a trained smearnet model and computing class probabilities for cells."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from smearnet.data.loaders import make_loader
from smearnet.errors import SmearnetError
from smearnet.io import read_json
from smearnet.models.engines import AccuracyControl, Engine, EngineSpec, Fidelity, build_engine, engine_spec
from smearnet.models.factory import build_model, reparameterize_for_inference
from smearnet.pseudonyms import pseudonym

# A model directory: the weights and their description (train stage); a registered version adds its serving
# configuration and the engine files it runs from (`smearnet.registry.package`).
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "model.json"
SERVING_FILE = "serving.json"
ENGINES_DIR = "engines"
ENGINE_FILES_KEY = "engine_files"  # serving.json: packaged engine file name -> sha256, checked before loading


@dataclass
class TrainedModel:
    """A network ready for inference and what is needed to feed it."""

    net: torch.nn.Module
    name: str
    classes: list[str]
    input_spec: dict
    meta: dict
    engine: Engine | None = None  # None: eager fp32, the network as trained

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 logits of preprocessed cells through the model's engine."""
        if self.engine is not None:
            return self.engine(images)
        with torch.inference_mode():
            return self.net(images).float()


def with_engine(model: TrainedModel, spec: EngineSpec, *, cache_dir: Path | None = None,
                calibration=None, accuracy_control: AccuracyControl | None = None,
                packaged_files: Mapping[str, str] | None = None) -> TrainedModel:
    """The same model run by the engine `spec` describes (see `smearnet.models.engines`)."""
    return replace(model, engine=build_engine(model.net, model.input_spec, spec, cache_dir=cache_dir,
                                              calibration=calibration, accuracy_control=accuracy_control,
                                              packaged_files=packaged_files))


#: serving.json's `inference` key for the loss OpenVINO int8 was quantised under (its engine file is named by it).
ACCURACY_CONTROL_KEY = "accuracy_control_max_drop"


def accuracy_control(model: TrainedModel | None, inference_cfg: Mapping | None,
                     validation_cells: pd.DataFrame | None = None, *, seed: int = 0) -> AccuracyControl | None:
    """OpenVINO int8's accuracy control from the `inference` section: the loss `fidelity` allows
    (`Fidelity.max_agreement_drop`), measured on `accuracy_control_images` of `validation_cells` (None when only a
    cached or packaged file may be used). A registered version's section records the loss itself
    (`ACCURACY_CONTROL_KEY`). None when `accuracy_control_images` is 0 or there is no `fidelity`."""
    settings = inference_cfg or {}
    if settings.get(ACCURACY_CONTROL_KEY) is not None:
        max_drop = float(settings[ACCURACY_CONTROL_KEY])
    elif int(settings.get("accuracy_control_images") or 0) > 0 and settings.get("fidelity"):
        max_drop = Fidelity.from_mapping(settings["fidelity"]).max_agreement_drop
    else:
        return None
    cells = None
    if validation_cells is not None:
        cells = calibration_batches(model, validation_cells, images=int(settings["accuracy_control_images"]), seed=seed)
    return AccuracyControl(max_drop=max_drop, cells=cells)


def engine_inputs(model: TrainedModel, inference_cfg: Mapping | None, split_manifest: pd.DataFrame | None = None,
                  *, seed: int = 0) -> dict:
    """`cache_dir`, `calibration` and `accuracy_control` for `with_engine`/`engine_artifact` from the `inference`
    config section: the configured export cache, `calibration_images` of the training cells of `split_manifest`
    (int8) and the accuracy control measured on its validation cells (OpenVINO int8). Cells are decoded only if an
    engine file has to be made; without `split_manifest`, only a cached file can be used."""
    settings = inference_cfg or {}
    cache = settings.get("cache_dir")
    calibration, validation = None, None
    if split_manifest is not None:
        split = split_manifest["split"]
        calibration = calibration_batches(model, split_manifest[split == "train"],
                                          images=int(settings.get("calibration_images", 128)), seed=seed)
        validation = split_manifest[split == "val"]
    return {"cache_dir": Path(cache) if cache else None, "calibration": calibration,
            "accuracy_control": accuracy_control(model, settings, validation, seed=seed)}


def resolve_inference(inference_cfg: Mapping, selection: Mapping) -> dict:
    """The `inference` section with `engine: auto` replaced by the engine the benchmark stage picked for the
    selected model (`selection`, reports/benchmark/selection.json); any other engine as configured."""
    from smearnet.models.engines import AUTO

    settings = dict(inference_cfg)
    if settings.get("engine") != AUTO:
        return settings
    if not selection.get("inference"):
        raise SmearnetError("inference.engine is auto, and reports/benchmark/selection.json names no engine.",
                            "re-run the benchmark stage (dvc repro).")
    return {**settings, **selection["inference"]}


def selected_model(inference_cfg: Mapping, selection_file: Path) -> tuple[str, dict]:
    """The backbone the benchmark stage selected (`selection_file`, its selection.json) and the `inference`
    section to run it by (`resolve_inference`: with `engine: auto`, the engine picked for it)."""
    selection = read_json(Path(selection_file))
    return str(selection["selected"]), resolve_inference(inference_cfg, selection)


def load_for_inference(model_dir: Path, split_manifest: pd.DataFrame | None, inference_cfg: Mapping | None, *,
                       seed: int = 0) -> TrainedModel:
    """`load_trained` run by the configured `inference` engine; unless its file is cached, int8 calibrates on the
    training cells of `split_manifest` and OpenVINO int8 controls its loss on the validation cells."""
    model = load_trained(model_dir)
    return with_engine(model, engine_spec(inference_cfg), **engine_inputs(model, inference_cfg, split_manifest,
                                                                          seed=seed))


def read_serving(model_dir: Path) -> dict:
    """A model directory's serving configuration (`SERVING_FILE`); empty for a train-stage folder."""
    return dict(read_json(Path(model_dir) / SERVING_FILE, default={}))


def serving_engine(model: TrainedModel, serving: Mapping, model_dir: Path) -> TrainedModel:
    """`model` run by the engine its serving.json names (eager fp32 for versions registered before engines).

    A registered version's engine files (ONNX, int8 programs; int8 is calibrated once, at registration) are used
    as packaged in `model_dir/engines`, each only if it matches the sha256 serving.json records for it; a
    workspace model (no packaged engines) runs from the configured engine cache."""
    settings = serving.get("inference") or {}
    packaged = Path(model_dir) / ENGINES_DIR
    control = accuracy_control(model, settings)
    if packaged.is_dir() or ENGINE_FILES_KEY in serving:
        return with_engine(model, engine_spec(settings), cache_dir=packaged, accuracy_control=control,
                           packaged_files=dict(serving.get(ENGINE_FILES_KEY) or {}))
    cache = settings.get("cache_dir")
    return with_engine(model, engine_spec(settings), cache_dir=Path(cache) if cache else None,
                       accuracy_control=control)


def calibration_batches(model: TrainedModel, manifest: pd.DataFrame, *, images: int = 128, batch_size: int = 16,
                        seed: int = 0):
    """A callable giving `images` preprocessed cells of `manifest` (drawn with `seed`) in batches: int8 calibration.

    The cells are decoded on the first call only (and never when every export is cached)."""
    decoded: list[torch.Tensor] = []

    def batches() -> list[torch.Tensor]:
        if not decoded:
            sample = manifest.sample(n=min(images, len(manifest)), random_state=seed) if len(manifest) else manifest
            loader = make_loader(sample, model.classes, model.input_spec, batch_size=batch_size, shuffle=False)
            decoded.extend(batch for batch, _ in loader)
        return decoded

    return batches


def save_trained(net: torch.nn.Module, model_dir: Path, meta: Mapping) -> None:
    """Weights as safetensors (no pickle) and a JSON description beside them."""
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(model_dir / WEIGHTS_FILE))
    (model_dir / META_FILE).write_text(json.dumps(dict(meta), indent=2, sort_keys=True, default=str) + "\n")


def load_trained(model_dir: Path) -> TrainedModel:
    """Rebuild the architecture from model.json and load the safetensors weights."""
    model_dir = Path(model_dir)
    if not (model_dir / META_FILE).is_file() or not (model_dir / WEIGHTS_FILE).is_file():
        raise SmearnetError(f"{model_dir} holds no trained model ({META_FILE} + {WEIGHTS_FILE}).",
                            "run `dvc repro train` first, or point to a folder written by the train stage.")
    meta = json.loads((model_dir / META_FILE).read_text())
    model_cfg = dict(meta["model_cfg"], pretrained=False, weights_path=None, cell_weights=None,
                     allow_random_init=True)
    net = build_model(model_cfg, num_classes=len(meta["classes"]))
    net.load_state_dict(load_file(str(model_dir / WEIGHTS_FILE)))
    net = reparameterize_for_inference(net)
    return TrainedModel(net=net.eval(), name=meta["name"], classes=list(meta["classes"]),
                        input_spec=dict(meta["input_spec"]), meta=meta)


@torch.inference_mode()
def predict_probabilities(model: TrainedModel, manifest: pd.DataFrame, *, batch_size: int = 32, num_workers: int = 0,
                          progress: bool = True, desc: str = "predict") -> np.ndarray:
    """Softmax probabilities (n_cells x n_classes) for every row of `manifest`, in order, through the model's engine."""
    loader = make_loader(manifest, model.classes, model.input_spec, batch_size=batch_size, shuffle=False,
                         num_workers=num_workers)
    chunks = []
    for images, _ in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        chunks.append(torch.softmax(model.logits(images), dim=1).numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, len(model.classes)), dtype=np.float32)


def predictions_table(manifest: pd.DataFrame, probabilities: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """One row per cell: smear (pseudonymised), true label (if known), predicted label, one probability column a class."""
    table = pd.DataFrame({"smear_id": [pseudonym(s) for s in manifest["smear_id"]],
                          "label": manifest["label"].to_numpy(),
                          "predicted": [classes[i] for i in probabilities.argmax(axis=1)]})
    for index, name in enumerate(classes):
        table[f"prob_{name}"] = probabilities[:, index]
    return table

