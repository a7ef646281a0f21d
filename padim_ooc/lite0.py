"""EfficientNet-Lite0 under its first names: the Lite0 row of :mod:`padim_ooc.lite`.

Kept so that code written for Lite0 alone goes on working; the family (Lite0,
Lite1, Lite2), its normalisation, nodes and padding are described in
:mod:`padim_ooc.lite`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .lite import LITE_MEAN, LITE_STD, VARIANTS, build_lite, lite_weights_path

__all__ = ["LITE0_NODES", "LITE0_CHANNELS", "LITE0_MEAN", "LITE0_STD",
           "build_lite0", "lite0_weights_path"]

_LITE0 = VARIANTS["efficientnet_lite0"]

LITE0_NODES: list[str] = list(_LITE0.nodes)
"""Node names of the three PaDiM stages, for ``create_feature_extractor``."""

LITE0_CHANNELS: list[int] = list(_LITE0.channels)
"""Channels of the ``LITE0_NODES`` outputs (strides 4, 8, 16)."""

LITE0_MEAN: tuple[float, float, float] = LITE_MEAN
"""Per-channel mean for a [0, 1] RGB tensor, matching the TF-Lite training."""

LITE0_STD: tuple[float, float, float] = LITE_STD
"""Per-channel std for a [0, 1] RGB tensor, matching the TF-Lite training."""


def lite0_weights_path() -> Path:
    """Path of the installed ``efficientnet-lite0-*.pth`` (:func:`padim_ooc.lite.lite_weights_path`)."""
    return lite_weights_path(_LITE0.backbone)


def build_lite0(pretrained: bool) -> torch.nn.Module:
    """EfficientNet-Lite0, pretrained or random, in eval mode (:func:`padim_ooc.lite.build_lite`)."""
    return build_lite(_LITE0.backbone, pretrained)
