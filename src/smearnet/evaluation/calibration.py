"""Temperature scaling of cell logits (Guo et al. 2017), fitted on validation cells.

One scalar ``T > 0`` divides every logit: ``p = softmax(z / T)``.  ``T > 1`` softens an
over-confident classifier, ``T < 1`` sharpens an under-confident one; the argmax (and so
every argmax-based call, such as the paper's share of positive cells) never changes.

``T`` minimises the mean negative log-likelihood of the true classes of validation cells.
The NLL is convex in ``1 / T`` (a log-sum-exp of functions linear in ``1 / T`` minus a
linear term), hence unimodal in ``log T``: a bounded Brent search over ``log T`` finds the
global minimum inside the bounds.  When a bound is at least as good as the interior minimum
(a validation set the classifier separates perfectly wants ``T -> 0``), the bound is returned
and the fit says so (``at_bound``).

Softmax probabilities suffice: ``log p`` differs from the logits by a constant per row,
which softmax ignores, so ``softmax(log(p) / T) == softmax(z / T)`` exactly (up to the
floor applied to probabilities that underflowed to 0).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from smearnet.errors import SmearnetError
from smearnet.evaluation.metrics import per_cell_arrays

DEFAULT_BOUNDS: tuple[float, float] = (0.05, 20.0)
PROBABILITY_FLOOR = 1e-45
"""Probabilities below this (float32 softmax underflow) are raised to it before taking logs."""
CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class TemperatureFit:
    """A fitted temperature and the validation NLL (mean per cell, nats) before and after."""

    temperature: float
    val_nll_before: float
    val_nll_after: float
    n_cells: int
    bounds: tuple[float, float]
    at_bound: bool

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["bounds"] = list(self.bounds)
        return values


def _check_logits(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    values, targets = per_cell_arrays(logits, labels, what="logits", n_classes=None,
                                      empty="fit the temperature on a non-empty validation split.")
    if not np.all(np.isfinite(values)):
        raise SmearnetError("Logits contain NaN or infinite values.", "Check the model outputs.")
    return values, targets


def _check_temperature(temperature: float) -> float:
    value = float(temperature)
    if not math.isfinite(value) or value <= 0.0:
        raise SmearnetError(f"The temperature must be a finite number > 0; got {temperature!r}.",
                            "Fit it with fit_temperature().")
    return value


def nll(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (nats per cell) of ``labels`` under ``softmax(logits / T)``."""
    values, targets = _check_logits(logits, labels)
    log_p = log_softmax(values / _check_temperature(temperature), axis=1)
    return float(-log_p[np.arange(len(targets)), targets].mean())


def fit_temperature(logits: Any, labels: Any, *, bounds: tuple[float, float] = DEFAULT_BOUNDS) -> TemperatureFit:
    """The ``T`` in ``bounds`` minimising the validation NLL (bounded Brent search over ``log T``).

    ``logits`` may equally be log-probabilities (see the module docstring).
    """
    values, targets = _check_logits(logits, labels)
    low, high = (float(b) for b in bounds)
    if not (0.0 < low < 1.0 < high and math.isfinite(high)):
        raise SmearnetError(
            f"Temperature bounds must satisfy 0 < low < 1 < high; got {bounds!r}.",
            "Use e.g. [0.05, 20.0] (T = 1, no change, must be inside).",
        )
    rows = np.arange(len(targets))

    def objective(log_temperature: float) -> float:
        log_p = log_softmax(values / math.exp(log_temperature), axis=1)
        return float(-log_p[rows, targets].mean())

    found = minimize_scalar(objective, bounds=(math.log(low), math.log(high)), method="bounded",
                            options={"xatol": 1e-6})
    before = objective(0.0)
    log_temperature, after = float(found.x), float(found.fun)
    at_bound = False
    # A bound at least as good as the interior answer wins and is flagged: perfectly separated cells
    # make the NLL flat (underflow to 0) towards T -> 0, where Brent may stop anywhere.
    for bound in (math.log(low), math.log(high)):
        at_this_bound = objective(bound)
        if at_this_bound <= after + 1e-12:
            log_temperature, after, at_bound = bound, at_this_bound, True
    if after > before:  # cannot happen for a unimodal objective, but never return a worse T than 1
        log_temperature, after, at_bound = 0.0, before, False
    return TemperatureFit(temperature=math.exp(log_temperature), val_nll_before=before, val_nll_after=after,
                          n_cells=len(targets), bounds=(low, high), at_bound=bool(at_bound))


def log_probabilities(probabilities: Any) -> np.ndarray:
    """``log p`` with probabilities floored at ``PROBABILITY_FLOOR``; rows must be probability vectors."""
    values = np.asarray(probabilities, dtype=np.float64)
    if values.ndim != 2 or not np.all(np.isfinite(values)) or values.min(initial=0.0) < 0.0:
        raise SmearnetError(
            f"Probabilities must be a finite, non-negative (n_cells, n_classes) array; got shape {values.shape}.",
            "Pass softmax probabilities, e.g. from smearnet.models.inference.predict_probabilities.",
        )
    if len(values) and not np.allclose(values.sum(axis=1), 1.0, atol=1e-3):
        raise SmearnetError("Probability rows do not sum to 1.", "Pass softmax probabilities, not logits.")
    return np.log(np.maximum(values, PROBABILITY_FLOOR))


def scaled_probabilities(logits: Any, temperature: float) -> np.ndarray:
    """``softmax(logits / T)`` row by row."""
    values = np.asarray(logits, dtype=np.float64)
    if values.ndim != 2:
        raise SmearnetError(f"Logits must be 2-D; got shape {values.shape}.", "Pass one row per cell.")
    return softmax(values / _check_temperature(temperature), axis=1)


def calibrate_probabilities(probabilities: Any, temperature: float) -> np.ndarray:
    """Temperature-scale softmax probabilities: ``softmax(log(p) / T)`` (equals ``softmax(z / T)``)."""
    return scaled_probabilities(log_probabilities(probabilities), temperature)


def save_calibration(fit: TemperatureFit, path: Path) -> Path:
    """Write ``fit`` as JSON (``temperature``, ``val_nll_before``, ``val_nll_after``, ...)."""
    from smearnet.io import write_json

    return write_json(fit.to_dict(), Path(path))


def load_calibration(path: Path) -> TemperatureFit:
    """Read a calibration written by :func:`save_calibration`."""
    path = Path(path)
    if not path.is_file():
        raise SmearnetError(f"No calibration at {path}.", "Run `dvc repro aggregate` to fit the temperature.")
    data = json.loads(path.read_text())
    try:
        low, high = data["bounds"]
        return TemperatureFit(temperature=_check_temperature(data["temperature"]),
                              val_nll_before=float(data["val_nll_before"]),
                              val_nll_after=float(data["val_nll_after"]), n_cells=int(data["n_cells"]),
                              bounds=(float(low), float(high)), at_bound=bool(data["at_bound"]))
    except (KeyError, TypeError, ValueError) as error:
        raise SmearnetError(f"{path} is not a calibration file ({type(error).__name__}: {error}).",
                            "Re-create it with `dvc repro aggregate`.") from None
