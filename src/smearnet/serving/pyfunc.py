"""MLflow pyfunc model (models-from-code: no pickle): base64 cell images in, classes and smear calls out.

Request rows: `image` (base64-encoded image bytes) and optional `smear_id`. Response rows, one per cell:
`smear_id, predicted, prob_<class>..., cell_weight, smear_score, smear_threshold, smear_call, error`, where
the smear columns come from the smear rule registered with the version (`smear_rule.json`, applied by
`smearnet.smear.SmearRule.classify`) and `cell_weight` is the cell's weight in its smear's score (MIL
attention, or its share of the smear's positive probability). `error` is non-empty for an image that could not
be decoded (reported in its row, never fatal; its smear is called on the other cells).

A request over the version's limits (serving.json `limits`, `smearnet.serving.requests.ServingLimits`: rows,
bytes per image, bytes per request) is refused as a whole: an MlflowException with error code
INVALID_PARAMETER_VALUE, which `mlflow models serve` answers with HTTP 400 and a JSON body whose `message` says
which limit and how to fix the request. Engine files are loaded only if they match the sha256 serving.json
records (`smearnet.models.inference.serving_engine`): a version whose files were altered does not load.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from smearnet.errors import SmearnetError
from smearnet.models.inference import load_trained, read_serving, serving_engine
from smearnet.serving.requests import ServingLimits
from smearnet.registry.store import MODEL_DIR_ARTIFACT
from smearnet.serving.requests import check_request, classify_request
from smearnet.smear.calls import served_rule


class SmearnetPyfunc(PythonModel):
    """Serves a trained smearnet model directory (weights + model.json + serving.json + smear_rule.json)."""

    def load_context(self, context) -> None:
        model_dir = Path(context.artifacts[MODEL_DIR_ARTIFACT])
        self.serving = read_serving(model_dir)
        self.limits = ServingLimits.from_config(self.serving.get("limits"))  # defaults for older versions
        self.model = serving_engine(load_trained(model_dir), self.serving, model_dir)
        self.rule, self.aggregator = served_rule(model_dir, self.serving)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        try:
            check_request(model_input, self.limits)
        except SmearnetError as err:  # the client's to fix: HTTP 400 with this message
            raise MlflowException.invalid_parameter_value(str(err)) from None
        return classify_request(self.model, self.rule, self.aggregator, model_input, self.limits)


mlflow.models.set_model(SmearnetPyfunc())
