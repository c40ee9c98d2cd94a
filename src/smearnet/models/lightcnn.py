"""The lightweight 7-layer CNN of paper 2 (white-cell types from 80x100 RGB crops), built by
`smearnet.models.factory.build_model` for ``arch: lightcnn``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from smearnet.errors import SmearnetError

LIGHTCNN_ARCH = "lightcnn"

# Paper 2 feeds 80x100 RGB images; "(80, 100)" in Keras' (rows, cols) order is H=80, W=100, which also
# keeps the landscape shape of the BCCD source images (640x480).
LIGHTCNN_INPUT_SIZE: tuple[int, int] = (80, 100)
# The paper does not state a normalisation; 0.5/0.5 maps [0, 1] pixels to [-1, 1], the range of tanh.
LIGHTCNN_DATA_CFG: dict[str, Any] = {
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
}


class LightCNN(nn.Module):
    """The lightweight 7-layer CNN of paper 2 (white-cell types from 80x100 RGB crops).

    Layers as numbered in the paper (C1 is the input), defaults shown for a 3x80x100 input:

    ====  ===========================================  ===========  ====================
    C1    input                                         3 x 80 x 100
    C2    conv 9x9, 32 maps, 'same' padding, tanh      32 x 80 x 100  ``features.conv1``
    C3    max pool 2x2, stride 2                       32 x 40 x 50   ``features.pool1``
    C4    conv 9x9, 64 maps, 'same' padding, tanh      64 x 40 x 50   ``features.conv2``
    C5    max pool 2x2, stride 2                       64 x 20 x 25   ``features.pool2``
    C6    fully connected, ``fc_units``, tanh           128            ``fc``
    C7    fully connected to the classes               num_classes    ``classifier``
    ====  ===========================================  ===========  ====================

    Dropout (0.1 in the paper) is applied to the inputs of both fully connected layers. The paper does not
    give C6's width; ``fc_units=128`` is our choice. Weights start as in Keras (Glorot-uniform, zero bias),
    the framework the paper used. ``forward`` returns logits (the paper's softmax lives in the loss).
    """

    def __init__(
        self,
        num_classes: int = 4,
        input_size: Sequence[int] = LIGHTCNN_INPUT_SIZE,
        channels: Sequence[int] = (32, 64),
        kernel_size: int = 9,
        fc_units: int = 128,
        drop_rate: float = 0.1,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        height, width = (int(v) for v in input_size)
        if kernel_size % 2 != 1:
            raise SmearnetError(
                f"lightcnn kernel_size must be odd for 'same' padding, got {kernel_size}.",
                "Set model.kernel_size to an odd number such as 9 (the paper's).",
            )
        pooled_h, pooled_w = height >> len(channels), width >> len(channels)
        if pooled_h < 1 or pooled_w < 1:
            raise SmearnetError(
                f"lightcnn input_size {height}x{width} is too small for {len(channels)} 2x2 poolings.",
                f"Use at least {2 ** len(channels)} px on each side, e.g. the paper's 80x100.",
            )
        self.num_classes = num_classes
        self.input_size = (height, width)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        prev = in_chans
        for i, out in enumerate(channels, start=1):
            layers[f"conv{i}"] = nn.Conv2d(prev, out, kernel_size, padding=kernel_size // 2)
            layers[f"act{i}"] = nn.Tanh()
            layers[f"pool{i}"] = nn.MaxPool2d(kernel_size=2, stride=2)
            prev = out
        self.features = nn.Sequential(layers)
        self.flatten = nn.Flatten()
        self.drop_fc = nn.Dropout(drop_rate)
        self.fc = nn.Linear(prev * pooled_h * pooled_w, fc_units)
        self.act_fc = nn.Tanh()
        self.drop_head = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(fc_units, num_classes)
        # Lets resolve_data_config(model=...) and our spec treat it like a timm model.
        self.pretrained_cfg = {
            "architecture": LIGHTCNN_ARCH,
            "input_size": (in_chans, height, width),
            "num_classes": num_classes,
            "classifier": "classifier",
            "first_conv": "features.conv1",
            **LIGHTCNN_DATA_CFG,
        }
        self._init_keras_like()

    def _init_keras_like(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def get_classifier(self) -> nn.Module:
        """The final layer (timm-compatible name), e.g. for a separate head learning rate."""
        return self.classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """C2..C5: the convolution / pooling stack."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, num_classes); ``x`` must be ``input_size`` (the FC layer fixes it)."""
        if tuple(x.shape[-2:]) != self.input_size:
            raise SmearnetError(
                f"lightcnn was built for {self.input_size[0]}x{self.input_size[1]} (HxW) images but got "
                f"{x.shape[-2]}x{x.shape[-1]}.",
                "Resize images to model.input_size, or build the model with the input_size you feed it.",
            )
        x = self.flatten(self.forward_features(x))
        x = self.act_fc(self.fc(self.drop_fc(x)))
        return self.classifier(self.drop_head(x))
