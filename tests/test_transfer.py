"""benchmarks/transfer.py: held-out splits by content digest; each start judged against scratch on the same
cells."""

import numpy as np
import pandas as pd
import pytest

from conftest import benchmark_script


@pytest.fixture(scope="module")
def transfer():
    return benchmark_script("transfer")


def test_held_out_splits_are_disjoint_and_sized_per_class(transfer):
    rng = np.random.default_rng(0)
    cells = pd.DataFrame({"label": np.repeat(["ig", "neutrophil"], 400),
                          "sha256": [f"{x:016x}" for x in rng.integers(0, 2**62, 800)]})
    pool, val, test = transfer.held_out_splits(cells.sample(frac=1, random_state=1))
    assert pool.groupby("label").size().tolist() == [transfer.POOL] * 2
    assert val.groupby("label").size().tolist() == [transfer.VAL] * 2
    assert test.groupby("label").size().tolist() == [400 - transfer.POOL - transfer.VAL] * 2
    assert not set(pool["sha256"]) & set(val["sha256"]) and not set(val["sha256"]) & set(test["sha256"])
    for label in ("ig", "neutrophil"):  # the lowest digests of each class are the pool
        assert pool.loc[pool["label"] == label, "sha256"].max() < val.loc[val["label"] == label, "sha256"].min()


def test_each_start_is_paired_with_the_scratch_row_of_its_shot_count(transfer):
    right, wrong = np.ones(100), np.zeros(100)
    half = np.r_[np.ones(50), np.zeros(50)]
    rows = [{"start": "scratch", "shots": 20, "correct": half}, {"start": "supervised pretrained", "shots": 20,
                                                                  "correct": right},
            {"start": "scratch", "shots": 50, "correct": right}, {"start": "supervised pretrained", "shots": 50,
                                                                  "correct": wrong}]
    versus = transfer.versus_scratch(rows)
    assert versus[0] == "" and versus[2] == ""
    assert versus[1].startswith("+0.500 (") and versus[3] == "-1.000 (-1.000 to -1.000)"
