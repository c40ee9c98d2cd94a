"""MLflow pyfunc model (models-from-code: no pickle): base64 cell images in, classes and a smear call out.

Request rows: `image` (base64-encoded image bytes) and optional `smear_id`. Response rows, one per cell:
`smear_id, predicted, prob_<class>..., smear_share_positive, smear_call, error`; `error` is non-empty for an
image that could not be decoded (reported in its row, never fatal; its smear is called on the other cells).
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

SERVING_FILE = "serving.json"


class SmearnetPyfunc(PythonModel):
    """Serves a trained smearnet model directory (weights.safetensors + model.json + serving.json)."""

    def load_context(self, context) -> None:
        from smearnet.inference import load_trained, serving_engine

        model_dir = Path(context.artifacts["model_dir"])
        serving_file = model_dir / SERVING_FILE
        self.serving = json.loads(serving_file.read_text()) if serving_file.is_file() else {}
        self.model = serving_engine(load_trained(model_dir), self.serving, model_dir)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from smearnet.errors import SmearnetError
        from smearnet.inference import classify_images, decode_image_bytes

        if "image" not in model_input:
            raise ValueError("request rows need an `image` column of base64-encoded image bytes")
        if "smear_id" in model_input:
            smear_ids = [str(s) if s is not None and s == s else "smear" for s in model_input["smear_id"]]
        else:
            smear_ids = ["smear"] * len(model_input)
        images, errors = [], []
        for encoded in model_input["image"]:
            try:
                images.append(decode_image_bytes(base64.b64decode(str(encoded), validate=True)))
                errors.append("")
            except (binascii.Error, ValueError):
                images.append(None)
                errors.append("undecodable image: not valid base64")
            except SmearnetError as err:
                images.append(None)
                errors.append(err.what)
        return classify_images(self.model, images, smear_ids, self.serving, errors)


mlflow.models.set_model(SmearnetPyfunc())
