"""MLflow pyfunc model (models-from-code: no pickle): base64 cell images in, classes and smear calls out.

Request rows: `image` (base64-encoded image bytes) and optional `smear_id`. Response rows, one per cell:
`smear_id, predicted, prob_<class>..., cell_weight, smear_score, smear_threshold, smear_call, error`, where
the smear columns come from the smear rule registered with the version (`smear_rule.json`, applied by
`smearnet.smear.SmearRule.classify`) and `cell_weight` is the cell's weight in its smear's score (MIL
attention, or its share of the smear's positive probability). `error` is non-empty for an image that could not
be decoded (reported in its row, never fatal; its smear is called on the other cells).
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
    """Serves a trained smearnet model directory (weights + model.json + serving.json + smear_rule.json)."""

    def load_context(self, context) -> None:
        from smearnet.models.inference import load_trained, serving_engine
        from smearnet.smear.calls import served_rule

        model_dir = Path(context.artifacts["model_dir"])
        serving_file = model_dir / SERVING_FILE
        self.serving = json.loads(serving_file.read_text()) if serving_file.is_file() else {}
        self.model = serving_engine(load_trained(model_dir), self.serving, model_dir)
        self.rule, self.aggregator = served_rule(model_dir, self.serving)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from smearnet.errors import SmearnetError
        from smearnet.data.decode import decode_image_bytes
        from smearnet.smear.calls import call_cells, cell_outputs_for_images

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
        probabilities, embeddings = cell_outputs_for_images(self.model, images, embeddings=self.rule.uses_mil)
        cells, _ = call_cells(self.rule, self.aggregator, self.model.classes, smear_ids, probabilities,
                              embeddings=embeddings, errors=errors)
        return cells


mlflow.models.set_model(SmearnetPyfunc())
