"""The paper's models: a small MLP and a ResNet-18 adapted to small images.

Example:
    >>> model = build_model({"name": "resnet18", "in_channels": 1, "num_classes": 10, "input_shape": [1, 28, 28]})
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import math

import torch
from torch import nn

MODELS = ("mlp", "resnet18")


def mlp(input_shape, num_classes: int, hidden: tuple[int, ...] = (128, 64)) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def resnet18(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem: 3x3 stride-1 first convolution and no max-pool."""
    import torchvision
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def model_spec(name: str, input_shape, num_classes: int, **options) -> dict:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return {"name": name, "in_channels": int(input_shape[0]), "input_shape": [int(s) for s in input_shape],
            "num_classes": int(num_classes), **options}


def build_model(spec: dict) -> nn.Module:
    """Build a fresh model from the spec stored in a run (see :func:`model_spec`)."""
    name = spec.get("name")
    if name == "mlp":
        return mlp(spec["input_shape"], spec["num_classes"], tuple(spec.get("hidden", (128, 64))))
    if name == "resnet18":
        return resnet18(spec["in_channels"], spec["num_classes"])
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
