"""params.yaml must be exactly what conf/ composes to, and bad configuration is a clear error."""

from collections.abc import Mapping

import pytest
from omegaconf import DictConfig, OmegaConf

from smearnet.config import (REPO_ROOT, MissingParam, UndeclaredParam, check_numbers, compose_config, model_config,
                             stage_params)
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
        assert model_config(cfg, name)["arch"]


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


# --- stage_params: each stage sees only what dvc.yaml declares for it -------------------------------------------

DVC_FOR_TESTS = """
stages:
  split:
    cmd: python pipeline/split.py
    params:
      - seed
      - split
  evaluate:
    cmd: python pipeline/evaluate.py
    params:
      - data.positive_class
      - evaluation.confidence
      - params.yaml:
          - inference
  train:
    foreach: ${train.models}
    do:
      cmd: python pipeline/train.py ${item}
      params:
        - model.${item}
        - train.batch_size
"""


@pytest.fixture
def project(tmp_path):
    from smearnet.cli import compose_params

    compose_params(["model=[resnet18,lightcnn]"], tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text(DVC_FOR_TESTS)
    return tmp_path


def test_a_stage_reads_its_declared_params_by_key_or_attribute(project):
    params = stage_params("evaluate", params_file=project / "params.yaml")
    assert params.data.positive_class == params["data"]["positive_class"] == "covid_rl"
    assert params.evaluation.confidence == 0.95 and params.inference.engine == "openvino"  # the demo pins it
    assert dict(params.data) == {"positive_class": "covid_rl"}  # a partly declared section shows only its keys
    assert params.to_dict() == {"evaluation": {"confidence": 0.95}, "inference": dict(params.inference),
                                "data": {"positive_class": "covid_rl"}}
    assert str(params.evaluation) == "{'confidence': 0.95}"  # prints as a dict (what MLflow params log)


@pytest.mark.parametrize("read", [lambda p: p.seed, lambda p: p["train"], lambda p: p.evaluation.batch_size,
                                  lambda p: p.data.get("classes"), lambda p: "name" in p.data,
                                  lambda p: getattr(p.data, "classes", None)])
def test_reading_an_undeclared_param_names_the_stage_and_the_key(project, read):
    params = stage_params("evaluate", params_file=project / "params.yaml")
    with pytest.raises(UndeclaredParam, match=r"Stage `evaluate` read the parameter `(seed|train|evaluation\.batch_size|"
                                              r"data\.classes|data\.name)`.*under `params:` of stage `evaluate`"):
        read(params)


def test_stage_params_are_read_only(project):
    params = stage_params("split", params_file=project / "params.yaml")
    with pytest.raises(AttributeError):
        params.seed = 1
    fractions = params.split
    with pytest.raises(TypeError):
        fractions["train"] = 0.9
    listed = stage_params("evaluate", params_file=project / "params.yaml")
    assert isinstance(listed, Mapping) and not isinstance(listed, DictConfig)


def test_a_foreach_stage_sees_its_own_item_only(project):
    params = stage_params("train@lightcnn", params_file=project / "params.yaml")
    assert list(params.model) == ["lightcnn"] and params.train.batch_size == 64
    assert params == stage_params("train", item="lightcnn", params_file=project / "params.yaml")
    with pytest.raises(UndeclaredParam, match="model.resnet18"):
        params.model.resnet18
    with pytest.raises(UndeclaredParam, match="train.models"):
        params.train.models
    with pytest.raises(SmearnetError, match=r"Backbone `vit` is not configured for stage `train`; configured: "
                                            r"\['resnet18', 'lightcnn'\]"):
        stage_params("train", item="vit", item_kind="backbone", params_file=project / "params.yaml")


def test_a_declared_param_missing_from_params_yaml_is_a_clear_error(project):
    cfg = OmegaConf.load(project / "params.yaml")
    del cfg["split"]
    (project / "params.yaml").write_text(OmegaConf.to_yaml(cfg))
    with pytest.raises(MissingParam, match="has no value for `split`.*recompose params.yaml"):
        stage_params("split", params_file=project / "params.yaml")
    with pytest.raises(SmearnetError, match="has no stage `upsample`"):
        stage_params("upsample", params_file=project / "params.yaml")


def test_a_missing_value_under_a_declared_section_gives_the_default(tmp_path):
    from smearnet.cli import compose_params

    compose_params([], tmp_path / "params.yaml")
    text = (tmp_path / "params.yaml").read_text()  # a mandatory value left unset: `???`
    (tmp_path / "params.yaml").write_text(text.replace("manifest: data/synthetic/manifest.csv", "manifest: ???"))
    (tmp_path / "dvc.yaml").write_text("stages:\n  ingest:\n    cmd: x\n    params:\n      - data\n")
    data = stage_params("ingest", params_file=tmp_path / "params.yaml").data
    assert data.get("manifest") is None and "manifest" not in data
    with pytest.raises(MissingParam, match="has no value for `data.manifest`"):
        data.manifest


def test_without_a_dvc_yaml_beside_params_the_checkout_declares(tmp_path):
    from smearnet.cli import compose_params

    compose_params([], tmp_path / "params.yaml")  # the bare folders tests run stage scripts in
    split = stage_params("split", params_file=tmp_path / "params.yaml")
    assert set(split) == {"seed", "split", "data"} and set(split.data) == {"positive_class"}


def test_every_stage_of_the_pipeline_gets_its_params_from_the_committed_files():
    import yaml

    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    cfg = compose_config([])
    for stage, body in stages.items():
        for item in (cfg.train.models if "foreach" in body else [None]):
            params = stage_params(stage, item=item, params_file=REPO_ROOT / "params.yaml")
            assert params.to_dict(), stage


def test_the_stage_settings_read_only_declared_params():
    from smearnet.evaluation.benchmark import BenchmarkSettings
    from smearnet.models.settings import TrainSettings
    from smearnet.smear import AggregateParams

    for name in compose_config([]).train.models:
        TrainSettings.from_params(stage_params("train", item=name, params_file=REPO_ROOT / "params.yaml"), name)
    benchmark = stage_params("benchmark", params_file=REPO_ROOT / "params.yaml")
    BenchmarkSettings.from_params(benchmark.benchmark, benchmark.inference, seed=benchmark.seed)
    aggregate = stage_params("aggregate", params_file=REPO_ROOT / "params.yaml")
    AggregateParams.from_config(aggregate.aggregate, aggregate.smear.compose, aggregate.evaluation.confidence,
                                threshold_rule=aggregate.smear.threshold_rule,
                                fixed_threshold=aggregate.smear.fixed_threshold)


def stage_modules():
    import yaml

    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    for stage, body in stages.items():
        command = body.get("do", body)["cmd"]
        script = next(word for word in command.split() if word.startswith("pipeline/") and word.endswith(".py"))
        yield stage, REPO_ROOT / script


@pytest.mark.parametrize("stage, script", list(stage_modules()), ids=lambda value: str(getattr(value, "name", value)))
def test_every_stage_module_reads_params_only_through_stage_params(stage, script):
    import ast

    tree = ast.parse(script.read_text())
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "stage_params"]
    assert "load_params" not in names, f"{script.name} reads the whole params.yaml; use stage_params({stage!r})"
    assert len(calls) == 1 and isinstance(calls[0].args[0], ast.Constant) and calls[0].args[0].value == stage, \
        f"{script.name} must read its parameters with stage_params({stage!r})"


def test_the_twin_knobs_are_one():
    cfg = compose_config([])
    assert "positive_class" not in cfg.evaluation and "rule" not in cfg.smear  # data.positive_class, smear.threshold_rule
    assert compose_config(["data.positive_class=classic_rl"]).data.positive_class == "classic_rl"
    assert compose_config(["experiment=paper"]).smear.threshold_rule == "fixed"


def test_the_demo_pins_its_engine_and_every_other_experiment_lets_auto_pick():
    """The demo's committed figures must reproduce, and auto's pick among engines timed within 10% of each other
    follows timing noise; a hospital's recipe (finetune), PBC and the paper keep auto, with Table 1 as before."""
    demo = compose_config([])
    assert (demo.inference.engine, demo.inference.precision) == ("openvino", "int8")
    timed = {(e.engine, e.precision) for e in demo.benchmark.engines}
    assert timed == {("eager", "bf16"), ("compile", "bf16"), ("openvino", "bf16"), ("compile", "int8")}
    for experiment in ("finetune", "pbc", "paper"):
        cfg = compose_config([f"experiment={experiment}"])
        assert cfg.inference.engine == "auto" and list(cfg.benchmark.engines) == [], experiment
