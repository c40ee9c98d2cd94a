import pandas as pd
import pytest

from smearnet.compose import compose_smears
from smearnet.errors import SmearnetError


def cells(n_target=30, n_other=300):
    labels = ["erythroblast"] * n_target + ["neutrophil", "lymphocyte"] * (n_other // 2)
    return pd.DataFrame({"label": labels, "path": [f"c{i}.jpg" for i in range(len(labels))]})


def test_positive_smears_carry_targets_and_negatives_none():
    smears = compose_smears(cells(), "erythroblast", seed=0)
    per_smear = smears.groupby("smear_id")["label"].apply(lambda s: int((s == "erythroblast").sum()))
    positive = per_smear[per_smear.index.str.startswith("S-pos")]
    negative = per_smear[per_smear.index.str.startswith("S-neg")]
    assert len(positive) == 58 and len(negative) == 34
    assert (positive >= 1).all() and (negative == 0).all()
    assert 1.5 < positive.mean() < 3.5  # Table 5: 132 targets / 58 smears
    sizes = smears.groupby("smear_id").size()
    assert 25 < sizes[sizes.index.str.startswith("S-pos")].mean() < 37
    assert not smears.duplicated(["smear_id", "cell_index"]).any()  # never twice in one smear


def test_deterministic_by_seed():
    assert compose_smears(cells(), "erythroblast", seed=3).equals(compose_smears(cells(), "erythroblast", seed=3))
    assert not compose_smears(cells(), "erythroblast", seed=3).equals(compose_smears(cells(), "erythroblast", seed=4))


def test_missing_target_class_is_a_clear_error():
    with pytest.raises(SmearnetError, match="target class `ig`"):
        compose_smears(cells(), "ig", seed=0)


def test_composed_smear_cells_reuse_the_test_predictions_without_the_network():
    import numpy as np

    from smearnet.evaluate import smear_cell_probabilities

    test = cells(n_target=10, n_other=40).set_index(np.arange(100, 150))
    table = pd.DataFrame({"prob_erythroblast": np.linspace(0, 1, 50), "prob_neutrophil": np.linspace(1, 0, 50)})
    model = type("Model", (), {"classes": ["erythroblast", "neutrophil"]})()  # no network: must not be called
    smears = compose_smears(test, "erythroblast", seed=0)
    probabilities = smear_cell_probabilities(model, smears, test, table, batch_size=4)
    expected = table["prob_erythroblast"].to_numpy()[smears["cell_index"].to_numpy() - 100]
    assert np.allclose(probabilities[:, 0], expected)
