import hashlib

import pandas as pd

import numpy as np
import pytest
from PIL import Image

from conftest import colour_cells
from smearnet.errors import SmearnetError
from smearnet.data.upsample import materialise, paper_augmentation, plan_upsampling, upsample_summary

AUGMENT = {"rotate_max": 120, "zoom_max": 1.01, "horizontal_flip": True, "vertical_flip": True,
           "brightness": 0.1, "jpeg_quality": 95}


@pytest.fixture
def train(tmp_path):
    labels = ["a"] * 6 + ["b"] * 2
    return colour_cells(tmp_path / "src", labels, [f"p{i}" for i in range(8)])


def test_counts_reach_target_and_originals_kept(train, tmp_path):
    plan = plan_upsampling(train, ["a", "b"], per_class=10, seed=0)
    assert plan["label"].value_counts().to_dict() == {"a": 4, "b": 8}
    created = materialise(plan, tmp_path / "out", AUGMENT, workers=1, progress=False)
    assert len(created) == 12 and all(Image.open(p).size == (72, 72) for p in created["path"])
    import pandas as pd
    summary = upsample_summary(train, pd.concat([train, created]), ["a", "b"], 10)
    assert summary["classes"]["b"] == {"originals": 2, "created": 8, "total": 10}
    # every original of the rare class is used evenly (round-robin)
    assert plan[plan["label"] == "b"]["source"].value_counts().tolist() == [4, 4]


def test_deterministic_by_seed_across_worker_counts(train, tmp_path):
    def hashes(folder, workers, seed):
        plan = plan_upsampling(train, ["a", "b"], per_class=8, seed=seed)
        rows = materialise(plan, folder, AUGMENT, workers=workers, progress=False)
        return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in rows["path"]]

    assert hashes(tmp_path / "one", 1, 7) == hashes(tmp_path / "two", 2, 7)
    assert hashes(tmp_path / "one", 1, 7) != hashes(tmp_path / "three", 1, 8)


def test_augmentation_changes_images_but_keeps_shape():
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    out = paper_augmentation(AUGMENT, seed=1)(image=image)["image"]
    assert out.shape == image.shape and not np.array_equal(out, image)


def test_class_above_target_is_kept_whole(train):
    plan = plan_upsampling(train, ["a", "b"], per_class=3, seed=0)
    assert set(plan["label"]) == {"b"}  # 'a' has 6 > 3: no originals dropped, none created


def test_class_without_training_images_is_a_clear_error(train):
    with pytest.raises(SmearnetError, match="Class `c` has no training images"):
        plan_upsampling(train, ["a", "b", "c"], per_class=5, seed=0)


def test_per_class_zero_creates_no_copies_and_names_no_class_above_target():
    train = pd.DataFrame({"path": ["a1", "a2", "a3", "b1"], "label": ["a", "a", "a", "b"],
                          "patient_id": ["p1", "p1", "p2", "p3"], "smear_id": ["s1", "s1", "s2", "s3"],
                          "site": ["x"] * 4, "cohort": ["development"] * 4})
    assert plan_upsampling(train, ["a", "b"], per_class=0, seed=0).empty
    assert upsample_summary(train, train, ["a", "b"], 0)["above_target"] == []
    with pytest.raises(SmearnetError, match="0 \\(no copies\\) or more"):
        plan_upsampling(train, ["a", "b"], per_class=-1, seed=0)
