"""Reading the composed configuration (params.yaml) and composing conf/ with Hydra.

Stages read their parameters through `stage_params(stage)`: params.yaml seen through what dvc.yaml declares for
that stage, so a stage (or a library function it hands a section to) cannot read a key DVC does not track for it.
OmegaConf stops here: below this module the library sees plain mappings or typed settings.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from smearnet.errors import SmearnetError

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
PARAMS_FILE = "params.yaml"
DVC_FILE = "dvc.yaml"
_MISSING = "???"  # OmegaConf's mandatory value, left unresolved in params.yaml

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


def load_params(path: Path | str = PARAMS_FILE) -> DictConfig:
    """Load and check the whole composed configuration. Stages use `stage_params`, which reads through this."""
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


def check_numbers(cfg: Mapping) -> None:
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


# --- one stage's parameters: what dvc.yaml declares, nothing else ---------------------------------------------


class UndeclaredParam(SmearnetError):
    """A stage read a parameter its dvc.yaml entry does not declare (DVC would not re-run it when it changes)."""

    def __init__(self, stage: str, key: str):
        self.stage, self.key = stage, key
        super().__init__(f"Stage `{stage}` read the parameter `{key}`, which dvc.yaml does not declare for it, so "
                         "DVC would not re-run the stage when it changes.",
                         f"add `{key}` (or its section) under `params:` of stage `{stage.split('@')[0]}` in dvc.yaml.")


class MissingParam(SmearnetError, KeyError, AttributeError):
    """A declared parameter that params.yaml does not hold (a stale or hand-edited file, or a `???` value).

    A KeyError (and AttributeError), so ``.get(key, default)`` and ``getattr(..., default)`` give the default."""

    def __init__(self, key: str, path: Path | str = PARAMS_FILE):
        self.key = key
        super().__init__(f"The configuration ({path}) has no value for `{key}`.",
                         "recompose params.yaml from conf/ (`smearnet compose-params` or `dvc exp run`) and set the "
                         "key there if it is mandatory (`???`).")

    def __str__(self) -> str:  # KeyError would quote the message
        return Exception.__str__(self)


class StageParams(Mapping):
    """A read-only view of params.yaml holding only the keys dvc.yaml declares for one stage.

    Reading a declared key (or anything under a declared section) works as on a mapping or by attribute
    (``params.train.lr_max``); a section that is only partly declared shows only its declared keys; reading
    any other key raises `UndeclaredParam`, naming the stage and the key to declare. Lists come back as copies.
    """

    __slots__ = ("_stage", "_values", "_declared", "_prefix", "_source")

    def __init__(self, stage: str, values: Mapping[str, Any], declared: Sequence[str], prefix: str = "",
                 source: Path | str = PARAMS_FILE):
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_declared", tuple(declared))
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_source", source)

    @property
    def stage(self) -> str:
        return self._stage

    def _key(self, key: str) -> str:
        return f"{self._prefix}.{key}" if self._prefix else str(key)

    def _is_covered(self, key: str) -> bool:
        """`key` is declared, or lies under a declared section."""
        return any(not d or key == d or key.startswith(d + ".") for d in self._declared)

    def _is_visible(self, key: str) -> bool:
        """`key` is covered, or a section holding a declared key."""
        return self._is_covered(key) or any(d.startswith(key + ".") for d in self._declared)

    def __getitem__(self, key: str) -> Any:
        full = self._key(key)
        if not self._is_visible(full):
            raise UndeclaredParam(self._stage, full)
        value = self._values.get(key, _MISSING) if isinstance(self._values, Mapping) else _MISSING
        if isinstance(value, str) and value == _MISSING:
            raise MissingParam(full, self._source)
        if isinstance(value, Mapping):
            return StageParams(self._stage, value, self._declared, full, self._source)
        if isinstance(value, list):
            return copy.deepcopy(value)
        return value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the parameters of stage `{self._stage}` are read-only")

    def __iter__(self) -> Iterator[str]:
        return (key for key in self._values if self._is_visible(self._key(key)))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def to_dict(self) -> dict[str, Any]:
        """The visible keys as plain nested dicts and lists."""
        return {key: value.to_dict() if isinstance(value, StageParams) else value
                for key, value in ((key, self[key]) for key in self)}

    def __repr__(self) -> str:  # as a dict prints: what `str(section)` logged to MLflow before
        return repr(self.to_dict())

    def __reduce__(self):
        return (StageParams, (self._stage, self._values, self._declared, self._prefix, self._source))


def stage_params(stage: str, *, item: str | None = None, item_kind: str = "item",
                 params_file: Path | str = PARAMS_FILE, dvc_file: Path | str | None = None) -> StageParams:
    """The parameters of one DVC stage: params.yaml (checked as `load_params` checks it) seen through the
    `params:` dvc.yaml declares for `stage`. A `foreach` stage is named `name@item` (or `name` with `item`).

    dvc.yaml is the one beside params.yaml, else this checkout's (scripts run in a bare folder, as tests do).
    Every declared key must be in params.yaml (as `dvc repro` demands); reading an undeclared one raises.
    """
    params_file = Path(params_file)
    values = OmegaConf.to_container(load_params(params_file), resolve=True)
    if dvc_file is None:
        beside = params_file.parent / DVC_FILE
        dvc_file = beside if beside.is_file() else REPO_ROOT / DVC_FILE
    declared = declared_params(stage, values, item=item, item_kind=item_kind, dvc_file=Path(dvc_file))
    for key in declared:
        if key and _value_at(values, key) is _ABSENT:
            raise MissingParam(key, params_file)
    name = stage if item is None else f"{stage}@{item}"
    return StageParams(name, values, declared, source=params_file)


def declared_params(stage: str, values: Mapping[str, Any], *, item: str | None = None, item_kind: str = "item",
                    dvc_file: Path = REPO_ROOT / DVC_FILE) -> tuple[str, ...]:
    """The params.yaml keys dvc.yaml declares for `stage` (`${item}` and `${key}` interpolated); "" = all."""
    import yaml

    if "@" in stage and item is None:
        stage, item = stage.split("@", 1)
    try:
        stages = (yaml.safe_load(Path(dvc_file).read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError) as err:
        raise SmearnetError(f"{dvc_file} could not be read ({type(err).__name__}: {err}).".replace("\n", " "),
                            "run stages from the project root, next to dvc.yaml.") from None
    if stage not in stages:
        raise SmearnetError(f"dvc.yaml ({dvc_file}) has no stage `{stage}`.", f"use one of {sorted(stages)}.")
    definition = stages[stage]
    if "foreach" in definition:
        items = _interpolate(definition["foreach"], values, None)
        items = list(items) if isinstance(items, (list, tuple, Mapping)) else []
        if item is None or item not in items:
            raise SmearnetError(f"{item_kind.capitalize()} `{item}` is not configured for stage `{stage}`; "
                                f"configured: {[str(i) for i in items]}.",
                                f"name one of them, or configure it in conf/ and recompose params.yaml "
                                f"(dvc.yaml runs `{stage}` for each of `{definition['foreach']}`).")
        definition = definition.get("do") or {}
    elif item is not None:
        raise SmearnetError(f"Stage `{stage}` of dvc.yaml has no `foreach`, so no `{stage}@{item}`.",
                            f"run it as `{stage}`.")
    declared: list[str] = []
    for entry in definition.get("params") or []:
        if isinstance(entry, Mapping):  # {file: [keys]} (or {file: null}: the whole file)
            for file, keys in entry.items():
                if Path(str(file)).name == PARAMS_FILE:
                    declared += [str(_interpolate(k, values, item)) for k in keys] if keys else [""]
        else:
            declared.append(str(_interpolate(entry, values, item)))
    return tuple(declared)


_INTERPOLATION = re.compile(r"\$\{([^}]+)\}")


def _interpolate(text: Any, values: Mapping[str, Any], item: str | None) -> Any:
    """DVC's `${...}` in a dvc.yaml string: `item`, or a params.yaml key (a whole-string reference keeps its type)."""
    if not isinstance(text, str):
        return text

    def lookup(name: str) -> Any:
        name = name.strip()
        if name == "item":
            if item is None:
                raise SmearnetError("dvc.yaml uses `${item}` outside a foreach stage.", "check dvc.yaml.")
            return item
        value = _value_at(values, name)
        if value is _ABSENT:
            raise MissingParam(name)
        return value

    whole = _INTERPOLATION.fullmatch(text)
    if whole:
        return lookup(whole.group(1))
    return _INTERPOLATION.sub(lambda match: str(lookup(match.group(1))), text)


_ABSENT = object()


def _value_at(values: Mapping[str, Any], key: str) -> Any:
    """The value at dotted `key` in nested mappings, or `_ABSENT`."""
    node: Any = values
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


# --- helpers over a configuration or a stage's parameters -----------------------------------------------------


def plain(value: Any) -> Any:
    """`value` as plain Python: dicts, lists and scalars (from a DictConfig, a StageParams view or a Mapping)."""
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, StageParams):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def model_config(cfg: Mapping, name: str) -> dict[str, Any]:
    """The configuration of one configured backbone (`model.<name>`), as a plain dict with its name filled in."""
    models = cfg["model"]
    if name not in models:
        raise SmearnetError(
            f"Backbone `{name}` is not configured; configured: {sorted(models)}.",
            "select it with `dvc exp run -S model=<name>` (one of conf/model/*.yaml).",
        )
    return {**plain(models[name]), "name": name}


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
