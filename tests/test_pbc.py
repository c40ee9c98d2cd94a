"""Real CellaVision images (../shared/data/pbc): a small sample, skipped cleanly when the folder is absent."""

import shutil

import pytest

from conftest import PBC_DIR
from smearnet.config import compose_config
from smearnet.smear import evaluation_smears
from smearnet.data.sources import load_dataset_manifest, manifest_from_folder
from smearnet.data.decode import load_rgb
from smearnet.data.ingest import validate_manifest
from smearnet.evaluation.cells import check_class_mix

pytestmark = [pytest.mark.pbc,
              pytest.mark.skipif(not PBC_DIR.is_dir(), reason=f"PBC images not present at {PBC_DIR}")]


@pytest.fixture
def pbc_sample(tmp_path):
    """Four images of each class, copied into a temporary class-per-folder tree (never into the repo)."""
    for folder in sorted(p for p in PBC_DIR.iterdir() if p.is_dir()):
        (tmp_path / folder.name).mkdir()
        for image in sorted(folder.glob("*.jpg"))[:4]:
            shutil.copy2(image, tmp_path / folder.name / image.name)
    return tmp_path


def test_folder_tree_becomes_a_manifest_each_image_its_own_patient(pbc_sample):
    manifest = manifest_from_folder(pbc_sample)
    assert len(manifest) == 32 and manifest["label"].nunique() == 8
    assert manifest["patient_id"].is_unique  # no donor ids in PBC: one image, one patient


def test_real_images_pass_ingest_and_decode_to_rgb(pbc_sample):
    classes = sorted(p.name for p in pbc_sample.iterdir())
    result = validate_manifest(manifest_from_folder(pbc_sample), classes, workers=1, progress=False)
    assert len(result.accepted) == 32 and result.quarantined.empty
    image = load_rgb(result.accepted["path"].iloc[0])
    assert image.mode == "RGB" and min(image.size) >= 360


def test_experiment_pbc_points_at_the_shared_folder_and_composes_smears(pbc_sample):
    cfg = compose_config(["experiment=pbc", f"data.root={pbc_sample}"])
    assert cfg.data.source == "folder" and cfg.smear.compose.enabled and len(cfg.data.classes) == 8
    manifest = load_dataset_manifest(cfg.data)
    smears, source = evaluation_smears(manifest.assign(split="test"), {**cfg.smear.compose, "smears_per_class": 3},
                                       positive_class=str(cfg.data.positive_class), seed=0)
    per_smear = smears.groupby("smear_id")["label"].apply(lambda s: (s == "erythroblast").sum())
    assert source.startswith("composed") and len(per_smear) == 12
    assert (per_smear[per_smear.index.str.contains("-pos-")] >= 1).all()
    assert (per_smear[per_smear.index.str.contains("-neg-")] == 0).all()
    # The test split is also weighed at the mix of the PBC cells this subset leaves out: every class, by count.
    check_class_mix(cfg.evaluation.class_mix, list(cfg.data.classes))
    assert set(cfg.evaluation.class_mix) == set(cfg.data.classes) and sum(cfg.evaluation.class_mix.values()) == 9092


def test_wbc4_selects_the_four_white_cell_types_for_lightcnn():
    cfg = compose_config(["experiment=wbc4"])
    assert list(cfg.data.classes) == ["eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    assert cfg.train.models == ["lightcnn"] and list(cfg.model.lightcnn.input_size) == [80, 100]


def test_the_pbc_recipe_trains_on_real_cells_and_serves_the_same_preprocessing(pbc_sample, tmp_path, mlflow_uri):
    """experiment=pbc's recipe (centre crop, AdamW one-cycle, bf16 + channels_last, dihedral) on 32 real cells."""
    import json

    from smearnet.models.inference import load_for_inference, predict_probabilities
    from smearnet.models.settings import TrainSettings
    from smearnet.models.training import train_backbone

    cfg = compose_config(["experiment=pbc", f"data.root={pbc_sample}", "train.cycles=2", "train.batch_size=8",
                          "model.resnet18.input_size=[48,48]", "registry.model_name=test-pbc-recipe",
                          "inference.engine=eager"])  # pinned: no benchmark stage ran to pick one
    manifest = manifest_from_folder(pbc_sample)
    metrics = train_backbone(TrainSettings.from_params(cfg, "resnet18"), manifest, manifest.iloc[::4], tmp_path / "model", tmp_path / "ckpt",
                             progress=False)
    assert metrics["epochs"] == 2 and metrics["global_steps"] == 2 * 4 and metrics["best_val_loss"] > 0
    spec = json.loads((tmp_path / "model" / "model.json").read_text())["input_spec"]
    assert spec["center_crop"] == 0.75 and spec["input_size"] == [48, 48]
    model = load_for_inference(tmp_path / "model", None, cfg.inference)
    assert model.engine.spec.label == "eager-bf16-cl"
    probabilities = predict_probabilities(model, manifest, progress=False)
    assert probabilities.shape == (32, 8) and abs(probabilities.sum(axis=1) - 1).max() < 1e-4


def test_the_recipe_benchmark_tells_the_grey_acquisition_batch_by_frame_size_and_jitters_its_colours():
    """benchmarks/pbc_recipe.py --hold-out-batch / --stain-augment: the IG_ files are 360x360 grey frames, the others
    of the class the main batch's 360x363; colour jitter is drawn from each cell's seed alone."""
    import numpy as np

    from conftest import benchmark_script
    from smearnet.data.loaders import StainAugment
    from smearnet.models.factory import model_input_spec

    recipe = benchmark_script("pbc_recipe")
    paths = sorted((PBC_DIR / "ig").glob("IG_*.jpg"))[:2] + sorted((PBC_DIR / "ig").glob("MMY_*.jpg"))[:2]
    spec = model_input_spec({"name": "resnet18", "arch": "resnet18", "input_size": [32, 32], "center_crop": 0.75})
    pixels, main_batch = recipe.load_pixels(paths, spec)
    assert pixels.shape == (4, 32, 32, 3) and main_batch.tolist() == [False, False, True, True]
    colour = StainAugment(enabled=True, p=1.0).transform()
    plain, jittered = recipe.as_tensors(pixels, spec), recipe.as_tensors(pixels, spec, colour, [7, 8, 9, 10])
    assert plain.shape == (4, 3, 32, 32) and not np.allclose(plain.numpy(), jittered.numpy())
    assert np.array_equal(jittered.numpy(), recipe.as_tensors(pixels, spec, colour, [7, 8, 9, 10]).numpy())
