"""Backbones: a torchvision (or EfficientNet-Lite) model cut after the last layer needed.

``build(name, layers, weights, seed)`` returns a module whose forward gives a
dict ``{layer: feature map}`` and a string that identifies the weights.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torchvision.models import get_model, get_model_weights, list_models
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from .data import IMAGENET_MEAN, IMAGENET_STD
from .errors import PadimError
from .lite import LITE_MEAN, LITE_STD, VARIANTS as LITE_VARIANTS, build_lite, is_lite, lite_weights_path

DEFAULT_LAYERS = {
    "resnet18": ["layer1", "layer2", "layer3"],
    "resnet34": ["layer1", "layer2", "layer3"],
    "resnet50": ["layer1", "layer2", "layer3"],
    "wide_resnet50_2": ["layer1", "layer2", "layer3"],
    "wide_resnet101_2": ["layer1", "layer2", "layer3"],
}
DEFAULT_DIMS = {"resnet18": 100, "wide_resnet50_2": 550}


def default_layers(name: str) -> list[str]:
    """The layers PaDiM takes for ``name`` (its first three stages)."""
    if is_lite(name):
        return list(LITE_VARIANTS[name].nodes)
    _check_name(name)
    if name not in DEFAULT_LAYERS:
        raise PadimError(f"no default layers for backbone {name!r}: pass --layers (node names)")
    return list(DEFAULT_LAYERS[name])


def _check_name(name: str) -> None:
    if not is_lite(name) and name not in list_models():
        raise PadimError(f"unknown backbone {name!r}: use a torchvision classification model "
                         f"name (e.g. resnet18, wide_resnet50_2) or one of {', '.join(LITE_VARIANTS)}")


def normalization(name: str) -> tuple[tuple, tuple]:
    """(mean, std) of the input normalisation the backbone's pretrained weights expect."""
    if is_lite(name):
        return tuple(LITE_MEAN), tuple(LITE_STD)
    return IMAGENET_MEAN, IMAGENET_STD


def _classifier(name: str, weights: str | None, seed: int) -> tuple[torch.nn.Module, str]:
    """The full model with its weights, and the identity of those weights."""
    if is_lite(name):
        if weights in (None, "none"):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return build_lite(name, pretrained=False), f"random:seed={seed}"
        if weights == "default":
            return build_lite(name, pretrained=True), "file:" + file_hash(lite_weights_path(name))
        model = build_lite(name, pretrained=False)
        return model, _load_file(model, Path(weights))
    _check_name(name)
    if weights in (None, "none"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return get_model(name, weights=None), f"random:seed={seed}"
    if weights == "default" or weights.startswith("torchvision:"):
        choice = torchvision_weights(name, weights)
        try:
            model = get_model(name, weights=choice)
        except Exception as err:  # network or cache failure: say what to do instead
            raise PadimError(f"could not load the pretrained weights {choice} ({type(err).__name__}: "
                             f"{err}); download them to the torch cache, or pass --weights PATH "
                             "or --weights none") from None
        return model, f"torchvision:{choice}"
    model = get_model(name, weights=None)
    return model, _load_file(model, Path(weights))


def torchvision_weights(name: str, weights: str):
    """The torchvision weights enum member that ``weights`` names for model ``name``.

    ``default`` is torchvision's current default (``IMAGENET1K_V2`` for
    wide_resnet50_2 and resnet50, ``IMAGENET1K_V1`` for resnet18);
    ``torchvision:MEMBER`` or ``torchvision:Class.MEMBER`` (the form a model
    stores, e.g. ``torchvision:Wide_ResNet50_2_Weights.IMAGENET1K_V1``) names
    one. Nothing is downloaded.

    Raises
    ------
    PadimError
        If the member is not one of the model's weights.
    """
    enum = get_model_weights(name)
    if weights == "default":
        return enum.DEFAULT
    cls, _, member = weights.removeprefix("torchvision:").rpartition(".")
    choices = [w.name for w in enum]
    if cls not in ("", enum.__name__) or member not in choices:
        raise PadimError(f"unknown weights {weights!r} for {name}: use torchvision:{enum.__name__}.NAME "
                         f"with NAME one of {', '.join(choices)}, or default")
    return enum[member]


def file_hash(path: Path) -> str:
    """SHA-256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_file(model: torch.nn.Module, path: Path) -> str:
    if not path.is_file():
        raise PadimError(f"weights file not found: {path} (give a state-dict file, 'default' or 'none')")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        model.load_state_dict(state)
    except Exception as err:
        raise PadimError(f"cannot load weights from {path}: {type(err).__name__}: "
                         f"{str(err).splitlines()[0]}") from None
    return "file:" + file_hash(path)


def build(name: str, layers: list[str], weights: str | None, seed: int = 0):
    """The backbone cut after ``layers``, in eval mode, on the CPU.

    Returns
    -------
    module : torch.nn.Module
        ``module(x)`` returns ``{layer: tensor of shape (B, C_layer, h, w)}``.
    weights_id : str
        ``torchvision:<enum>``, ``file:<sha256>`` or ``random:seed=<seed>``.
    """
    model, weights_id = _classifier(name, weights, seed)
    nodes = get_graph_node_names(model)[1]
    for layer in layers:
        if not any(n == layer or n.startswith(layer + ".") for n in nodes):
            tops = ", ".join(dict.fromkeys(n.split(".")[0] for n in nodes))
            raise PadimError(f"layer {layer!r} not found in {name}; its top-level layers are: {tops}")
    module = create_feature_extractor(model, return_nodes={layer: layer for layer in layers})
    return module.eval().requires_grad_(False), weights_id


def state_digest(module: torch.nn.Module) -> str:
    """A short hash of every parameter and buffer: the weights actually used."""
    h = hashlib.blake2b(digest_size=12)
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
