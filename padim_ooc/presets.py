"""Named configurations matching the PaDiM paper, and the numbers it published for them.

A preset is a :class:`~padim_ooc.config.ModelConfig` (backbone, channels,
preprocessing, weights); fields given explicitly override it. The published figures are
the MVTec AD means (15 classes) from /work/shared/PAPER.md, in percent;
``None`` where the paper gives no number for that configuration.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .config import DEFAULT_BACKBONE, DEFAULT_CROP, DEFAULT_RESIZE, DEFAULT_WEIGHTS, ModelConfig
from .errors import PadimError
from .lite import VARIANTS as LITE_VARIANTS

# The paper used torchvision's original ImageNet weights (V1); torchvision's default for
# wide_resnet50_2 is now IMAGENET1K_V2, so the presets name V1 explicitly.
PRESETS: dict[str, ModelConfig] = {
    "r18-rd100": ModelConfig(backbone="resnet18", dims=100, resize=256, crop=224,
                             weights="torchvision:ResNet18_Weights.IMAGENET1K_V1"),
    "wr50-rd550": ModelConfig(backbone="wide_resnet50_2", dims=550, resize=256, crop=224,
                              weights="torchvision:Wide_ResNet50_2_Weights.IMAGENET1K_V1"),
    # EfficientNet-Lite0, -Lite1, -Lite2 (padim_ooc.lite.VARIANTS): all channels of their three nodes
    # (176, 176, 192), crop = the variant's input size (Lite2: 256, not its 260), resize = crop / 0.875:
    # lite0 256 -> 224, lite1 274 -> 240, lite2 293 -> 256.
    **{f"lite{name[-1]}": ModelConfig(backbone=name, dims=None, resize=v.resize, crop=v.image_size,
                                      weights="default") for name, v in LITE_VARIANTS.items()},
}

PAPER_MVTEC_MEAN: dict[str, dict[str, float | None]] = {
    "r18-rd100": {"image_auroc": None, "pixel_auroc": 96.7, "pro": 91.7},
    "wr50-rd550": {"image_auroc": 95.3, "pixel_auroc": 97.5, "pro": 92.1},
    "lite0": {"image_auroc": None, "pixel_auroc": None, "pro": None},
    "lite1": {"image_auroc": None, "pixel_auroc": None, "pro": None},
    "lite2": {"image_auroc": None, "pixel_auroc": None, "pro": None},
}
"""PaDiM's published MVTec AD means (percent). R18-Rd100's PRO is also transcribed as 90.1."""


def preset(name: str) -> ModelConfig:
    """The configuration record of preset ``name``.

    Raises
    ------
    PadimError
        If ``name`` is not a known preset.
    """
    if name not in PRESETS:
        raise PadimError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def resolve(name: str | None, **given: Any) -> ModelConfig:
    """Preset ``name``'s record overridden by the fields given (``None`` = not given).

    Without a preset the defaults are resnet18 (Rd100), resize 256, crop 224
    (or the resize if smaller), pretrained weights. A backbone given without
    weights gets the preset's weights carried over (:func:`weights_for`).
    """
    base = preset(name) if name else ModelConfig(backbone=DEFAULT_BACKBONE, resize=DEFAULT_RESIZE,
                                                 weights=DEFAULT_WEIGHTS)
    out = base.merged(ModelConfig(**given))
    if given.get("weights") is None:
        out = dataclasses.replace(out, weights=weights_for(base, out.backbone))
    if given.get("crop") is None:  # the default crop never exceeds a smaller resize given
        out = dataclasses.replace(out, crop=min(out.crop or DEFAULT_CROP, out.resize))
    return out


def weights_for(options: ModelConfig, backbone: str) -> str:
    """The weights a preset's record ``options`` gives ``backbone``.

    Its own weights for its own backbone. For another backbone, the same
    torchvision member if that backbone has one (the ResNet presets' original
    ``IMAGENET1K_V1``: ``r18-rd100`` with wide_resnet50_2 gives
    ``Wide_ResNet50_2_Weights.IMAGENET1K_V1``), else ``default``.
    Nothing is downloaded.
    """
    weights = options.weights
    if backbone == options.backbone:
        return weights
    if not weights.startswith("torchvision:"):
        return "default"
    from .backbones import torchvision_weights

    member = weights.rpartition(".")[2].removeprefix("torchvision:")
    try:
        return f"torchvision:{torchvision_weights(backbone, f'torchvision:{member}')}"
    except (PadimError, ValueError, KeyError):  # no such member, or not a torchvision model (lite0, a typo: said later)
        return "default"
