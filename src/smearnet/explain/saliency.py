"""Grad-CAM heat maps of cell classifiers, and their overlay on the cell image.

A pathologist reading a smear call wants to see *where* in each cell the network looked. Grad-CAM (captum's
``LayerGradCam``) answers that from the last spatial feature map of the backbone, so it works unchanged for
every backbone ``smearnet.models.factory.build_model`` makes (timm models and ``LightCNN``) without naming layers.

Explaining must never change the model that made the call: the network is run in eval mode, in fp32 (a
copy when it is held in another precision), with gradients switched on even inside a caller's
``torch.inference_mode``, and every module's mode and parameter flags are put back afterwards.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from matplotlib import colormaps
from PIL import Image
from torch import nn

from smearnet.errors import SmearnetError

__all__ = ["feature_layer", "grad_cam", "overlay"]


def feature_layer(net: nn.Module, example: torch.Tensor) -> tuple[str, nn.Module]:
    """The name and module of the last feature map with spatial extent that ``example`` passes through.

    Found by running ``example`` once with a forward hook on every submodule, so no backbone needs its layer
    named. Outputs of 1x1 spatial size are skipped: a global pool keeps 4-D ``(n, C, 1, 1)`` tensors, and a
    map of one pixel cannot say where a cell's evidence lies. Modules called more than once (a shared
    activation) are skipped because their output is ambiguous to hook. A container (``layer4``, ``features``)
    finishes after its children, so the outermost module yielding that final map is the one returned.
    """
    name, layer, _ = _probe(net, example)
    return name, layer


def _probe(net: nn.Module, example: torch.Tensor) -> tuple[str, nn.Module, int]:
    """``feature_layer``'s answer and the number of classes, from one forward pass of ``example``."""
    names = {module: name for name, module in net.named_modules() if module is not net}
    calls: dict[nn.Module, int] = {}
    order: list[nn.Module] = []

    def record(module: nn.Module, _inputs: object, output: object) -> None:
        calls[module] = calls.get(module, 0) + 1
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-2] * output.shape[-1] > 1:
            order.append(module)

    hooks = [module.register_forward_hook(record) for module in names]
    try:
        with torch.no_grad():
            logits = net(example)
    finally:
        for hook in hooks:
            hook.remove()
    candidates = [module for module in order if calls[module] == 1]
    if not candidates:
        raise SmearnetError(
            f"{type(net).__name__} has no layer producing a spatial feature map (4-D, larger than 1x1) for "
            f"{tuple(example.shape[-2:])} images, so Grad-CAM has nothing to localise.",
            "Explain a convolutional model, with images at the model's input size.",
        )
    return names[candidates[-1]], candidates[-1], int(logits.shape[-1])


def grad_cam(net: nn.Module, images: torch.Tensor, class_index: int) -> np.ndarray:
    """Grad-CAM maps of ``class_index`` for ``images`` ``(n, C, H, W)``: float32 ``(n, H, W)`` in [0, 1].

    Each map is the ReLU of captum's ``LayerGradCam`` at ``feature_layer``, upsampled bilinearly to the
    input size and divided by its own maximum: maps show *where* a cell's evidence lies, not how strong it
    is compared with other cells (the probability says that). A map with no positive evidence is all zeros.
    """
    if images.dim() != 4:
        raise SmearnetError(f"grad_cam needs a batch of images (n, C, H, W), got shape {tuple(images.shape)}.",
                            "Stack the preprocessed cells with torch.stack, or add a batch axis with unsqueeze(0).")
    n, _, height, width = images.shape
    if n == 0:
        return np.zeros((0, height, width), dtype=np.float32)
    with torch.inference_mode(False), torch.enable_grad(), _explaining(_fp32(net)) as model:
        # A copy made outside inference mode: the caller's images may be inference tensors autograd refuses.
        inputs = images.detach().clone().to(device=_device(model), dtype=torch.float32)
        _, layer, n_classes = _probe(model, inputs[:1])
        _check_class_index(class_index, n_classes)
        maps = LayerGradCam(model, layer).attribute(inputs, target=int(class_index), relu_attributions=True)
        maps = LayerAttribution.interpolate(maps.detach(), (height, width), interpolate_mode="bilinear")
    return _normalise_each(maps[:, 0].cpu().numpy())


def overlay(image_rgb: np.ndarray, heat: np.ndarray, *, alpha: float = 0.6, cmap: str = "jet") -> np.ndarray:
    """``image_rgb`` (uint8 ``(H, W, 3)``) with ``heat`` (``(h, w)``, in [0, 1]) blended on as a colour map.

    ``heat`` is resized to the image with PIL (bilinear), so a map at the network's input size lays over the
    cell photo at its own resolution. The colour's opacity grows with the heat, from a quarter of ``alpha``
    where the map is cold to ``alpha`` where it is hottest: the stain stays readable where the model did not
    look, and the reader can judge whether a warm region is the nucleus, the cytoplasm or the background.
    """
    image = np.asarray(image_rgb)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise SmearnetError(f"overlay needs an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}.",
                            "Convert the cell image with np.asarray(PIL.Image.open(path).convert('RGB')).")
    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim != 2:
        raise SmearnetError(f"overlay needs one 2-D heat map (H, W), got shape {heat.shape}.",
                            "Pass one map of grad_cam's output, e.g. maps[i].")
    height, width = image.shape[:2]
    resized = np.asarray(Image.fromarray(heat).resize((width, height), Image.Resampling.BILINEAR))
    resized = np.clip(np.nan_to_num(resized), 0.0, 1.0)
    colours = colormaps[cmap](resized)[..., :3] * 255.0
    opacity = (alpha * (0.25 + 0.75 * resized))[..., None]
    blended = (1.0 - opacity) * image.astype(np.float32) + opacity * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- helpers


def _fp32(net: nn.Module) -> nn.Module:
    """``net`` itself when all its floating tensors are fp32, else an fp32 copy (the caller's stays as it is).

    Gradients of bf16 activations are too coarse for a heat map, and casting in place would change the
    model the caller keeps serving with.
    """
    tensors = [*net.parameters(), *net.buffers()]
    if all(t.dtype == torch.float32 for t in tensors if t.is_floating_point()):
        return net
    return copy.deepcopy(net).float()


@contextmanager
def _explaining(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` in eval mode with frozen parameters; every module's mode and ``requires_grad`` put back after.

    Eval mode keeps BatchNorm statistics and dropout out of the explanation (and the statistics unchanged);
    freezing the weights spares autograd from keeping what weight gradients would need, since Grad-CAM
    only needs gradients with respect to one feature map.
    """
    modes = {module: module.training for module in net.modules()}
    flags = {param: param.requires_grad for param in net.parameters()}
    try:
        net.eval()
        for param in flags:
            param.requires_grad_(False)
        yield net
    finally:
        for module, training in modes.items():
            module.training = training
        for param, requires_grad in flags.items():
            param.requires_grad_(requires_grad)


def _device(net: nn.Module) -> torch.device:
    """Where ``net``'s weights live (the CPU for a network without any)."""
    return next(net.parameters(), torch.empty(0)).device


def _check_class_index(class_index: int, n_classes: int) -> None:
    """Fail with the class count instead of captum's bare index error."""
    if not 0 <= int(class_index) < n_classes:
        raise SmearnetError(f"class_index {class_index} is outside the model's {n_classes} classes.",
                            "Pass the index of the class in the model's class list (e.g. the positive class).")


def _normalise_each(maps: np.ndarray) -> np.ndarray:
    """Each map divided by its maximum (zeros stay zeros), as float32 in [0, 1]."""
    maps = np.nan_to_num(maps.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0.0)
    peaks = maps.reshape(len(maps), -1).max(axis=1)
    scale = np.where(peaks > 0, peaks, 1.0).astype(np.float32)
    return np.clip(maps / scale[:, None, None], 0.0, 1.0)
