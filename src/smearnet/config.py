"""Reading the composed configuration (params.yaml) and composing conf/ with Hydra."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from smearnet.errors import SmearnetError

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"

# Every number in the configuration must be finite; in these sections (and `seed`) also >= 0.
# NaN or a negative value would break a stage later, obscurely (or silently change a comparison).
_NON_NEGATIVE_SECTIONS = ("seed", "split", "train", "augment", "ingest", "evaluation", "benchmark", "smear", "aggregate",
                          "data", "model")


def compose_config(overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> DictConfig:
    """Compose conf/config.yaml with Hydra overrides, resolved, as DVC does for params.yaml."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(Path(conf_dir).resolve()), version_base=None):
            cfg = compose("config", overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        detail = " ".join(str(err).split("Config search path")[0].split())  # Hydra's search path is noise here
        raise SmearnetError(
            f"The configuration override(s) {list(overrides)} could not be composed: {detail}",
            "check the key names and option names against the files under conf/ "
            "(e.g. `model=resnet18`, `experiment=demo`, `trainer=cpu`).",
        ) from None
    return cfg


def load_params(path: Path | str = "params.yaml") -> DictConfig:
    """Load and check the composed parameters every stage reads."""
    path = Path(path)
    if not path.is_file():
        raise SmearnetError(
            f"{path} was not found.",
            "run stages from the repository root, or compose it with `smearnet compose-params` "
            "(or `dvc exp run` / `make params`).",
        )
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 - yaml.YAMLError, UnicodeDecodeError, ...
        raise SmearnetError(
            f"{path} is not a readable YAML file ({type(err).__name__}: {err}).".replace("\n", " "),
            "recompose it from conf/ with `smearnet compose-params` (or `dvc exp run`); never edit it by hand.",
        ) from None
    if not isinstance(cfg, DictConfig) or not cfg:
        raise SmearnetError(f"{path} holds no parameters (it is empty or not a mapping).",
                            "recompose it from conf/ with `smearnet compose-params` (or `dvc exp run`).")
    check_numbers(cfg)
    return cfg


def check_numbers(cfg: DictConfig) -> None:
    """Refuse NaN or infinite numbers anywhere, and negative numbers in the non-negative sections."""
    for key, value in _walk(cfg, ""):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        must_be_non_negative = key.split(".")[0].split("[")[0] in _NON_NEGATIVE_SECTIONS
        if math.isnan(value) or math.isinf(value) or (must_be_non_negative and value < 0):
            raise SmearnetError(
                f"Parameter `{key}` is {value}; it must be a finite number"
                f"{' >= 0' if must_be_non_negative else ''}.",
                f"set it in conf/ (or `dvc exp run -S {key}=<value>`) and recompose params.yaml.",
            )


def _walk(node, prefix: str):
    if isinstance(node, (DictConfig, Mapping)):
        for key in node:
            if isinstance(node, DictConfig) and OmegaConf.is_missing(node, key):
                continue  # `???`: reported by the stage that needs it
            yield from _walk(node[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, (ListConfig, list, tuple)):
        for index, item in enumerate(node):
            yield from _walk(item, f"{prefix}[{index}]")
    else:
        yield prefix, node


def model_config(cfg: DictConfig, name: str) -> DictConfig:
    """The configuration of one configured backbone, with its name filled in."""
    if name not in cfg.model:
        raise SmearnetError(
            f"Backbone `{name}` is not configured; configured: {sorted(cfg.model)}.",
            "select it with `dvc exp run -S model=<name>` (one of conf/model/*.yaml).",
        )
    model_cfg = OmegaConf.create(OmegaConf.to_container(cfg.model[name], resolve=True))
    model_cfg.name = name
    return model_cfg


def task_name(data: Mapping) -> str:
    """The task a dataset defines: `data.name`, or the manifest file's stem when it is null."""
    name = data.get("name")
    if name:
        return str(name)
    manifest = data.get("manifest")
    if not manifest:
        raise SmearnetError("data.name is not set and there is no data.manifest to name the task after.",
                            "set data.name (e.g. -S data.name=hospital_a).")
    return Path(str(manifest)).stem


def registered_model_name(registry: Mapping, data: Mapping) -> str:
    """`registry.model_name`, or `smearnet-<task>` when null: one registered model per task, so a model for
    other classes never competes with another task's champion."""
    name = registry.get("model_name")
    return str(name) if name else f"smearnet-{task_name(data)}"
