"""Model factory: timm backbones with a new head (paper 1) and the paper-2 ``LightCNN`` (`smearnet.models.lightcnn`).

``build_model(model_cfg, num_classes)`` is the one entry point. ``model_cfg`` is a plain mapping (dict or
OmegaConf ``DictConfig``) with the keys

- ``name``: our name for the model (used in messages only),
- ``arch``: a timm architecture (``xception71``, ``tf_efficientnet_b8``, ``repvgg_b3g4``, ...) or ``lightcnn``,
- ``input_size``: ``[H, W]``,
- ``pretrained``: load ImageNet weights,
- ``weights_path``: a local file of ImageNet weights (``.safetensors``, or a plain state dict in
  ``.pth``/``.pt``/``.bin``); with it no network is used,
- ``cell_weights``: a file of cell-domain weights (the ``pretrain`` stage's ``weights.safetensors``), used
  only when neither ``pretrained`` nor ``weights_path`` asks for ImageNet weights (those take precedence);
  the classifier head is always re-initialised,
- ``allow_random_init``: when ``pretrained`` but the weights cannot be had (offline, no hub), warn and
  train from random init instead of failing,
- ``drop_rate`` (optional): dropout before the classifier,
- lightcnn only, all optional: ``channels`` (``[32, 64]``), ``kernel_size`` (9), ``fc_units`` (128).

Every model's ``forward`` returns logits; softmax belongs to the loss / the prediction step.
"""

from __future__ import annotations

import copy
import difflib
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from timm import create_model
from timm.data import resolve_data_config
from timm.models import clean_state_dict, get_pretrained_cfg, is_model, list_models, split_model_name_tag
from timm.utils import reparameterize_model
from torch import nn

from smearnet.errors import SmearnetError
from smearnet.models.lightcnn import LIGHTCNN_ARCH, LIGHTCNN_DATA_CFG, LIGHTCNN_INPUT_SIZE, LightCNN

__all__ = [
    "build_model",
    "model_input_spec",
    "reparameterize_for_inference",
]

_logger = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
# Same priority as timm's load_state_dict(use_ema=True), so we check what timm will load.
_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
_REPARAM_METHODS = ("fuse", "reparameterize", "switch_to_deploy")


def build_model(model_cfg: Mapping, num_classes: int) -> nn.Module:
    """Build the model ``model_cfg`` describes with a fresh ``num_classes``-way head; see the module doc."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise SmearnetError(
            f"num_classes must be a positive integer, got {num_classes!r}.",
            "Pass the number of classes in the dataset's label list.",
        )
    arch = _check_arch(model_cfg)
    pretrained = bool(model_cfg.get("pretrained", False))
    weights_path = model_cfg.get("weights_path")
    if weights_path and not pretrained:
        _logger.warning(
            "model.weights_path=%s is ignored because model.pretrained=false; the model starts from random init.",
            weights_path,
        )
    if pretrained and weights_path:
        return _build_from_file(model_cfg, arch, num_classes, Path(str(weights_path)).expanduser())
    if pretrained:
        return _build_from_hub(model_cfg, arch, num_classes)
    if model_cfg.get("cell_weights"):
        return _build_from_file(model_cfg, arch, num_classes, Path(str(model_cfg["cell_weights"])).expanduser(),
                                reset_head=True)
    return _create(model_cfg, arch, num_classes)


def model_input_spec(model_cfg: Mapping) -> dict[str, Any]:
    """Input size ``(H, W)``, ``mean``, ``std``, ``interpolation``, ``crop_pct`` and ``center_crop`` the model expects.

    ``center_crop`` (``model_cfg.center_crop``, default 1) is the fraction of the image's shorter side kept
    around its centre before resizing: CellaVision cells sit in the middle of the frame.

    For timm models these are the default pretrained weights' values (ImageNet or Inception statistics, as
    the weights were trained); ``model_cfg.input_size`` overrides the size.
    """
    arch = _check_arch(model_cfg)
    if arch == LIGHTCNN_ARCH:
        data_cfg: dict[str, Any] = {"input_size": LIGHTCNN_INPUT_SIZE, **LIGHTCNN_DATA_CFG}
    else:
        pretrained_cfg = get_pretrained_cfg(arch)
        resolved = resolve_data_config(
            {}, pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {"input_size": (3, 224, 224)}
        )
        data_cfg = {key: resolved[key] for key in ("mean", "std", "interpolation", "crop_pct")}
        data_cfg["input_size"] = tuple(resolved["input_size"][1:])
    if model_cfg.get("input_size") is not None:
        data_cfg["input_size"] = _input_size(model_cfg)
    crop = float(model_cfg.get("center_crop") or 1.0)
    if not 0.0 < crop <= 1.0:
        raise SmearnetError(f"model.center_crop must be in (0, 1], got {crop} for model {_name(model_cfg)}.",
                            "It is the fraction of the image's shorter side kept around the centre (1 = all).")
    data_cfg["center_crop"] = crop
    data_cfg["mean"] = tuple(float(v) for v in data_cfg["mean"])
    data_cfg["std"] = tuple(float(v) for v in data_cfg["std"])
    return data_cfg


def reparameterize_for_inference(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fuse train-time branches (RepVGG and similar, via ``timm.utils.reparameterize_model``) for inference.

    Returns an eval-mode model with the same outputs. A model with nothing to fuse is returned as is (switched
    to eval mode, not copied); otherwise a fused copy is returned unless ``inplace``.
    """
    if not any(hasattr(m, name) for m in model.modules() for name in _REPARAM_METHODS):
        return model.eval()
    target = model if inplace else copy.deepcopy(model)
    target.eval()  # fusion folds BatchNorm running statistics, so it must see eval-mode layers
    return reparameterize_model(target, inplace=True).eval()


# --------------------------------------------------------------------------------------------- helpers


def _name(model_cfg: Mapping) -> str:
    return str(model_cfg.get("name") or model_cfg.get("arch"))


def _input_size(model_cfg: Mapping) -> tuple[int, int]:
    size = model_cfg.get("input_size")
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise SmearnetError(
            f"model.input_size must be [height, width], got {size!r} for model {_name(model_cfg)}.",
            "Set model.input_size=[H,W], e.g. [80,100] for lightcnn or [299,299] for xception71.",
        ) from None
    return height, width


def _check_arch(model_cfg: Mapping) -> str:
    """The validated architecture name; unknown names fail with close matches."""
    arch = str(model_cfg.get("arch") or "")
    if arch == LIGHTCNN_ARCH or (arch and is_model(split_model_name_tag(arch)[0])):
        return arch
    known = [LIGHTCNN_ARCH, *list_models()]
    lowered = arch.lower()
    close = difflib.get_close_matches(lowered, known, n=6, cutoff=0.6)
    close += [m for m in list_models(f"*{lowered}*") if m not in close] if lowered else []
    hint = f" Close matches: {', '.join(close[:8])}." if close else ""
    raise SmearnetError(
        f"Unknown model architecture {arch!r} for model {_name(model_cfg)}.{hint}",
        "Set model.arch to 'lightcnn' or a timm architecture name "
        "(list them with python -c \"import timm; print(timm.list_models('*part*'))\").",
    )


def _create(model_cfg: Mapping, arch: str, num_classes: int, **timm_kwargs: Any) -> nn.Module:
    """Instantiate ``arch``; ``timm_kwargs`` (pretrained, overlay) go to ``timm.create_model``."""
    drop_rate = model_cfg.get("drop_rate")
    if arch == LIGHTCNN_ARCH:
        options = {key: model_cfg.get(key) for key in ("channels", "kernel_size", "fc_units")}
        options = {key: value for key, value in options.items() if value is not None}
        if "channels" in options:
            options["channels"] = [int(c) for c in options["channels"]]
        if model_cfg.get("input_size") is not None:
            options["input_size"] = _input_size(model_cfg)
        return LightCNN(num_classes=num_classes, drop_rate=0.1 if drop_rate is None else float(drop_rate), **options)
    if drop_rate is not None:
        timm_kwargs["drop_rate"] = float(drop_rate)
    return create_model(arch, num_classes=num_classes, **timm_kwargs)


def _build_from_hub(model_cfg: Mapping, arch: str, num_classes: int) -> nn.Module:
    """Pretrained weights from the Hugging Face hub; offline falls back to random init only if allowed."""
    name = _name(model_cfg)
    try:
        if arch == LIGHTCNN_ARCH:
            raise RuntimeError("lightcnn has no published ImageNet weights")
        _logger.info("Fetching ImageNet weights for %s (%s) from the Hugging Face hub.", name, arch)
        return _create(model_cfg, arch, num_classes, pretrained=True)
    except Exception as error:  # offline, hub down, no weights for this arch: all handled the same way
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if not model_cfg.get("allow_random_init", False):
            raise SmearnetError(
                f"Could not get pretrained weights for model {name} ({arch}) from the hub (no network, "
                f"HF_HUB_OFFLINE=1, or no weights published) ({reason}).",
                f"Download the ImageNet weights once (e.g. the model.safetensors of timm/{arch} on the Hugging "
                "Face hub) and set model.weights_path=<file>, or set model.allow_random_init=true to train "
                "from random init, or set model.pretrained=false.",
            ) from error
    _logger.warning(
        "PRETRAINED WEIGHTS UNAVAILABLE for model %s (%s): %s. Building it with RANDOM INIT because "
        "model.allow_random_init=true; results will not match a fine-tuned ImageNet model. "
        "Set model.weights_path=<file> to fine-tune from ImageNet weights.",
        name,
        arch,
        reason,
    )
    return _create(model_cfg, arch, num_classes)


def _build_from_file(model_cfg: Mapping, arch: str, num_classes: int, path: Path, *,
                     reset_head: bool = False) -> nn.Module:
    """Weights from a local file; the classifier head is re-initialised when ``num_classes`` differs, or always
    with ``reset_head`` (cell-domain weights: the pretraining classes are not the task's)."""
    name = _name(model_cfg)
    state_dict = _read_state_dict(path, name)
    if arch == LIGHTCNN_ARCH or reset_head:
        model = _create(model_cfg, arch, num_classes)
        head = _head_keys(model)
        own = model.state_dict()
        state_dict = {
            k: v for k, v in state_dict.items()
            if not (k in head and (reset_head or tuple(v.shape) != tuple(own[k].shape)))
        }
        _load_checked(model, state_dict, name, path)
        return model
    try:
        # timm loads the file itself (torch.load weights_only=True / safetensors), drops the head when the
        # class count differs and applies the architecture's checkpoint filter.
        model = _create(
            model_cfg, arch, num_classes, pretrained=True, pretrained_cfg_overlay={"file": str(path)}
        )
    except RuntimeError as error:  # size mismatch: weights of another architecture
        raise SmearnetError(
            f"The weights file {path} does not fit model {name} ({arch}): {str(error).splitlines()[0]}",
            f"Use ImageNet weights of exactly this architecture (timm/{arch} on the Hugging Face hub).",
        ) from error
    _check_coverage(model, state_dict, name, path)
    return model


def _read_state_dict(path: Path, name: str) -> dict[str, torch.Tensor]:
    """Read a weights file without executing code: safetensors, or ``torch.load(weights_only=True)``.

    Accepts a plain state dict or a dict wrapping one under ``state_dict``/``model`` (and EMA variants).
    Large pickle files are memory-mapped, so this check costs little before timm loads the file.
    """
    if not path.is_file():
        raise SmearnetError(
            f"The weights file {path} for model {name} does not exist.",
            "Point model.weights_path at an existing .safetensors or .pth file (a relative path is taken "
            "from the working directory), or set model.weights_path=null.",
        )
    if path.name.endswith(".safetensors"):
        try:
            checkpoint: Any = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as error:
            raise SmearnetError(
                f"Could not read the safetensors weights file {path}: {error}",
                "Re-download or re-export the file.",
            ) from error
    else:
        checkpoint = _torch_load_weights_only(path)
    if isinstance(checkpoint, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not (
        isinstance(checkpoint, Mapping)
        and checkpoint
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items())
    ):
        raise SmearnetError(
            f"The weights file {path} is not a plain state dict (a mapping of names to tensors).",
            "Save the weights with torch.save(model.state_dict(), path) or as .safetensors.",
        )
    return clean_state_dict(dict(checkpoint))


def _torch_load_weights_only(path: Path) -> Any:
    refuse = SmearnetError(
        f"Refusing to load {path}: it holds pickled Python objects beyond tensors, and smearnet will not "
        "unpickle untrusted code (torch.load weights_only=True refused it).",
        "Convert the weights to .safetensors or to a plain state_dict (torch.save(model.state_dict(), path)) "
        "in an environment where you trust the file.",
    )
    if path.suffix not in _PICKLE_SUFFIXES:
        _logger.warning("Unknown weights file suffix %r; reading %s as a PyTorch file.", path.suffix, path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:  # legacy (non-zip) torch.save format cannot be memory-mapped
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise refuse from error
    except Exception as error:
        raise SmearnetError(
            f"Could not read the weights file {path}: {type(error).__name__}: {str(error).splitlines()[0]}",
            "Use a .safetensors file or a .pth written by torch.save(model.state_dict(), path).",
        ) from error


def _head_keys(model: nn.Module) -> set[str]:
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    prefixes = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return {f"{prefix}.{p}" for prefix in prefixes for p in ("weight", "bias")}


def _missing_backbone_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Model entries the file does not provide, other than the head and BatchNorm step counters."""
    skip = _head_keys(model)
    return [
        k for k in model.state_dict() if k not in state_dict and k not in skip and not k.endswith("num_batches_tracked")
    ]


def _check_coverage(model: nn.Module, state_dict: Mapping[str, torch.Tensor], name: str, path: Path) -> None:
    """timm loads non-strictly once the head is dropped; fail instead of silently keeping random layers."""
    missing = _missing_backbone_keys(model, state_dict)
    if missing:
        raise SmearnetError(
            f"The weights file {path} lacks {len(missing)} of model {name}'s backbone tensors "
            f"(e.g. {', '.join(missing[:3])}); it is probably for another architecture.",
            "Use ImageNet weights in timm's format for exactly this architecture (timm/<arch> on the "
            "Hugging Face hub).",
        )


def _load_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], name: str, path: Path) -> None:
    _check_coverage(model, state_dict, name, path)
    try:
        model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:
        raise SmearnetError(
            f"The weights file {path} does not fit model {name}: {str(error).splitlines()[0]}",
            "Use weights saved from the same model configuration (channels, kernel_size, fc_units, input_size).",
        ) from error
