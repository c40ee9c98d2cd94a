"""params.yaml must be exactly what conf/ composes to, and bad configuration is a clear error."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from smearnet.config import REPO_ROOT, check_numbers, compose_config, model_config
from smearnet.errors import SmearnetError


def test_params_yaml_matches_composed_conf():
    composed = OmegaConf.to_yaml(compose_config([]))
    committed = (REPO_ROOT / "params.yaml").read_text()
    assert committed == composed, "params.yaml drifted from conf/: run `make params` (or `dvc exp run`)"


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO_ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    cfg = compose_config([f"experiment={experiment}"])
    assert cfg.train.models == list(cfg.model)
    for name in cfg.train.models:
        assert model_config(cfg, name).arch


def test_model_override_switches_backbone():
    cfg = compose_config(["model=lightcnn"])
    assert cfg.train.models == ["lightcnn"] and list(cfg.model.lightcnn.input_size) == [80, 100]


def test_paper_experiment_trains_three_backbones():
    cfg = compose_config(["experiment=paper"])
    assert cfg.train.models == ["xception71", "efficientnet_b8", "repvgg_b3g4"]
    assert cfg.train.batch_size == 10 and cfg.train.cycles == 36 and cfg.augment.per_class == 5000


@pytest.mark.parametrize("override", ["model=resnet99", "no_such_key=1", "trainer=tpu"])
def test_unknown_override_is_a_clear_error(override):
    with pytest.raises(SmearnetError, match="could not be composed"):
        compose_config([override])


@pytest.mark.parametrize("key, value", [("train.lr_max", float("nan")), ("augment.per_class", -5),
                                        ("split.val", float("inf"))])
def test_nan_or_negative_params_are_refused(key, value):
    cfg = compose_config([])
    OmegaConf.update(cfg, key, value)
    with pytest.raises(SmearnetError, match=key.replace(".", r"\.")):
        check_numbers(cfg)


def test_unknown_backbone_name_is_a_clear_error():
    with pytest.raises(SmearnetError, match="not configured"):
        model_config(compose_config([]), "vit_huge")
