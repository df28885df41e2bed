"""A model factory for ``deferinit summary``: an MLP written without input sizes.

deferinit summary examples/tiny_factory.py:make_model --input-shape 2,20
deferinit summary examples/tiny_factory.py:make_model --input-shape 2,20 --device meta
"""

from __future__ import annotations

from torch import nn

from deferinit import nn as dnn


def make_model() -> nn.Module:
    """The d2l MLP: 256 hidden units, 10 outputs, input size inferred."""
    return nn.Sequential(dnn.Linear(256), nn.ReLU(), dnn.Linear(10))


def make_convnet() -> nn.Module:
    """A small convnet for images of any channel count and size (input ``(N, C, H, W)``)."""
    return nn.Sequential(
        dnn.Conv2d(8, 3, padding=1),
        dnn.BatchNorm2d(),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        dnn.Linear(10),
    )
