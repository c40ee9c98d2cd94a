"""Reading the composed configuration (params.yaml) and composing conf/ with Hydra."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from smearnet.errors import SmearnetError

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"

# Keys whose numeric values must be finite and >= 0 (NaN or negative breaks a stage later, obscurely).
_NON_NEGATIVE_SECTIONS = ("split", "train", "augment", "ingest", "evaluation", "benchmark", "smear", "data")


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
        raise SmearnetError(
            f"The configuration override(s) {list(overrides)} could not be composed: {err}".replace("\n", " "),
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
            "run stages from the repository root, or compose it with `dvc exp run` / `make params`.",
        )
    cfg = OmegaConf.load(path)
    check_numbers(cfg)
    return cfg


def check_numbers(cfg: DictConfig) -> None:
    """Refuse NaN, infinite or negative numbers anywhere in the numeric sections."""
    for section in _NON_NEGATIVE_SECTIONS:
        if section in cfg:
            for key, value in _walk(cfg[section], section):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if math.isnan(value) or math.isinf(value) or value < 0:
                    raise SmearnetError(
                        f"Parameter `{key}` is {value}; it must be a finite number >= 0.",
                        f"set it in conf/ (or `dvc exp run -S {key}=<value>`) and recompose params.yaml.",
                    )


def _walk(node, prefix: str):
    if isinstance(node, (DictConfig, Mapping)):
        for key in node:
            yield from _walk(node[key], f"{prefix}.{key}")
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
