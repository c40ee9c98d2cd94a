"""Temperature scaling: known answers on models whose calibration is known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import softmax

from smearnet.evaluation.calibration import (
    calibrate_probabilities,
    fit_temperature,
    load_calibration,
    log_probabilities,
    nll,
    save_calibration,
    scaled_probabilities,
)
from smearnet.errors import SmearnetError


def calibrated_model(n_cells: int = 4000, n_classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from the logits' own softmax: calibrated by construction (T* = 1)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, size=(n_cells, n_classes))
    cumulative = softmax(logits, axis=1).cumsum(axis=1)
    labels = (rng.random((n_cells, 1)) > cumulative).sum(axis=1)
    return logits, labels.astype(np.int64)


def test_nll_known_answer():
    logits = np.array([[0.0, math.log(3.0)], [0.0, 0.0]])
    labels = np.array([1, 0])
    assert nll(logits, labels) == pytest.approx(-(math.log(0.75) + math.log(0.5)) / 2)
    # T = 2 halves the logits: p(class 1) = sqrt(3) / (1 + sqrt(3)) for the first cell
    assert nll(logits, labels, 2.0) == pytest.approx(-(math.log(math.sqrt(3) / (1 + math.sqrt(3))) + math.log(0.5)) / 2)


def test_overconfident_model_gets_its_temperature_back_and_lower_nll():
    logits, labels = calibrated_model()
    fit = fit_temperature(logits * 5.0, labels)
    assert fit.temperature == pytest.approx(5.0, rel=0.08)
    assert fit.val_nll_after < fit.val_nll_before - 0.5
    assert fit.val_nll_before == pytest.approx(nll(logits * 5.0, labels))
    assert fit.val_nll_after == pytest.approx(nll(logits, labels), abs=0.005)  # as good as the true model
    assert fit.n_cells == len(labels) and not fit.at_bound


def test_underconfident_model_is_sharpened_and_calibrated_one_is_left_alone():
    logits, labels = calibrated_model(seed=1)
    assert fit_temperature(logits * 0.25, labels).temperature == pytest.approx(0.25, rel=0.08)
    assert fit_temperature(logits, labels).temperature == pytest.approx(1.0, abs=0.08)


def test_perfectly_separated_validation_cells_stop_at_the_bound():
    logits = np.array([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]] * 5)
    labels = np.array([0, 1, 2] * 5)
    fit = fit_temperature(logits, labels, bounds=(0.1, 10.0))
    assert fit.at_bound and fit.temperature == pytest.approx(0.1, rel=1e-3)
    assert fit.val_nll_after < fit.val_nll_before


def test_probabilities_route_equals_logits_route_and_keeps_argmax():
    logits, _ = calibrated_model(n_cells=200, seed=2)
    probabilities = softmax(logits, axis=1).astype(np.float32)  # as predict_probabilities returns them
    for temperature in (0.3, 1.0, 4.0):
        via_probabilities = calibrate_probabilities(probabilities, temperature)
        np.testing.assert_allclose(via_probabilities, scaled_probabilities(logits, temperature), atol=1e-6)
        np.testing.assert_array_equal(via_probabilities.argmax(axis=1), logits.argmax(axis=1))
    # fitting on log-probabilities gives the temperature fitted on logits
    labels = logits.argmax(axis=1)
    assert fit_temperature(log_probabilities(softmax(logits, axis=1)), labels).temperature == pytest.approx(
        fit_temperature(logits, labels).temperature, rel=1e-4)


def test_underflowed_probabilities_are_floored_not_infinite():
    probabilities = np.array([[1.0, 0.0, 0.0]])
    scaled = calibrate_probabilities(probabilities, 50.0)
    assert np.all(np.isfinite(scaled)) and scaled[0, 0] > 0.5 and scaled[0, 1] > 0.0


def test_save_and_load_round_trip(tmp_path):
    logits, labels = calibrated_model(n_cells=300, seed=3)
    fit = fit_temperature(logits * 2.0, labels)
    path = save_calibration(fit, tmp_path / "calibration.json")
    assert load_calibration(path) == fit
    with pytest.raises(SmearnetError, match="No calibration"):
        load_calibration(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"temperature": 2.0}')
    with pytest.raises(SmearnetError, match="not a calibration file"):
        load_calibration(tmp_path / "bad.json")


@pytest.mark.parametrize(
    "logits, labels, match",
    [
        (np.zeros((0, 3)), np.zeros(0, dtype=int), "No cells"),
        (np.zeros((2, 3)), np.array([0, 3]), "class indices"),
        (np.zeros((2, 3)), np.array([0.0, 1.0]), "class indices"),
        (np.zeros(3), np.array([0]), "shape"),
        (np.array([[0.0, np.nan]]), np.array([0]), "NaN"),
        (np.zeros((2, 3)), np.array([0]), "labels of shape"),
    ],
)
def test_bad_inputs_are_clear_errors(logits, labels, match):
    with pytest.raises(SmearnetError, match=match):
        fit_temperature(logits, labels)


def test_bad_bounds_temperature_and_probabilities():
    logits, labels = calibrated_model(n_cells=20)
    with pytest.raises(SmearnetError, match="0 < low < 1 < high"):
        fit_temperature(logits, labels, bounds=(1.5, 3.0))
    with pytest.raises(SmearnetError, match="temperature"):
        scaled_probabilities(logits, 0.0)
    with pytest.raises(SmearnetError, match="sum to 1"):
        calibrate_probabilities(np.array([[0.2, 0.2, 0.2]]), 2.0)
