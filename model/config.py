"""One frozen config, one registry of variants, and the preprocessing each variant expects."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (ratio of the stage, kernel of its PRM, dilations of its PRM): the released reduction cells.
RELEASED_DOWNSAMPLE = (4, 2, 2)
RELEASED_KERNELS = (7, 3, 3)
RELEASED_DILATIONS = ((1, 2, 3, 4), (1, 2, 3), (1, 2))
RELEASED_RC_TYPES = ("performer", "performer", "performer_less")

RC_TOKEN_TYPES = ("performer", "performer_less")
POOLINGS = ("mean", "cls")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input: resize, center crop, scale to 0..1, normalise."""

    img_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    interpolation: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            img_size=int(d["img_size"]),
            in_chans=int(d["in_chans"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            crop_pct=float(d["crop_pct"]),
            interpolation=str(d["interpolation"]),
        )


@dataclass(frozen=True)
class ViTAEConfig:
    """Every architectural and preprocessing fact of a ViTAE model, in the release's terms."""

    embed_dims: tuple[int, int, int]
    token_dims: tuple[int, int, int]
    nc_depth: tuple[int, int, int]
    nc_heads: tuple[int, int, int]
    nc_groups: tuple[int, int, int]
    mlp_ratio: float
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    downsample_ratios: tuple[int, int, int] = RELEASED_DOWNSAMPLE
    kernel_sizes: tuple[int, int, int] = RELEASED_KERNELS
    dilations: tuple[tuple[int, ...], ...] = RELEASED_DILATIONS
    rc_tokens_type: tuple[str, str, str] = RELEASED_RC_TYPES
    rc_heads: tuple[int, int, int] = (1, 1, 1)
    rc_groups: tuple[int, int, int] = (1, 1, 1)
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    pooling: str = "mean"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    _stage_fields: tuple[str, ...] = field(
        default=(
            "embed_dims",
            "token_dims",
            "nc_depth",
            "nc_heads",
            "nc_groups",
            "downsample_ratios",
            "kernel_sizes",
            "dilations",
            "rc_tokens_type",
            "rc_heads",
            "rc_groups",
        ),
        repr=False,
        compare=False,
    )

    def __post_init__(self) -> None:
        for name in self._stage_fields:
            value = getattr(self, name)
            if name == "dilations":
                value = tuple(tuple(int(d) for d in stage) for stage in value)
            else:
                value = tuple(value)
            object.__setattr__(self, name, value)
            if len(value) != self.num_stages:
                raise ValueError(f"{name} must have one entry per stage ({self.num_stages}), got {value}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"mean and std need {self.in_chans} values (in_chans), got {self.mean} and {self.std}")
        for i, kind in enumerate(self.rc_tokens_type):
            if kind not in RC_TOKEN_TYPES:
                raise ValueError(f"rc_tokens_type[{i}]={kind!r} is not supported; use one of {RC_TOKEN_TYPES}")
            if kind == "performer_less" and self.embed_dims[i] * len(self.dilations[i]) != self.token_dims[i]:
                raise ValueError(
                    f"stage {i} is PRM-only, so token_dims[{i}] must equal embed_dims[{i}] x len(dilations[{i}])"
                    f" = {self.embed_dims[i] * len(self.dilations[i])}, got {self.token_dims[i]}"
                )
        if any(h != 1 for h in self.rc_heads):
            raise ValueError(f"the released reduction cells use one Performer head; rc_heads={self.rc_heads}")
        if self.img_size % self.total_reduction:
            raise ValueError(
                f"img_size {self.img_size} must be divisible by the total reduction {self.total_reduction}"
            )

    @property
    def num_stages(self) -> int:
        return 3

    @property
    def total_reduction(self) -> int:
        total = 1
        for r in self.downsample_ratios:
            total *= r
        return total

    @property
    def grid_size(self) -> int:
        """Side of the last token grid (the Grad-CAM map) at `img_size`."""
        return self.img_size // self.total_reduction

    @property
    def embed_dim(self) -> int:
        """Width of the tokens the head reads."""
        return self.token_dims[-1]

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.img_size, self.in_chans, self.mean, self.std, self.crop_pct, self.interpolation)

    def replace(self, **changes: Any) -> ViTAEConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("_stage_fields")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTAEConfig:
        known = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ViTAEConfig fields: {sorted(unknown)}")
        return cls(**d)


VARIANTS: dict[str, ViTAEConfig] = {
    # ViTAE_basic_Tiny, _6M, _13M and _Small of the release, ImageNet-1k at 224.
    "vitae_t": ViTAEConfig(
        embed_dims=(64, 64, 128),
        token_dims=(64, 64, 256),
        nc_depth=(0, 0, 7),
        nc_heads=(1, 1, 4),
        nc_groups=(1, 1, 64),
        mlp_ratio=2.0,
    ),
    "vitae_6m": ViTAEConfig(
        embed_dims=(64, 64, 128),
        token_dims=(64, 64, 256),
        nc_depth=(0, 0, 10),
        nc_heads=(1, 1, 4),
        nc_groups=(1, 1, 64),
        mlp_ratio=2.0,
    ),
    "vitae_13m": ViTAEConfig(
        embed_dims=(64, 64, 160),
        token_dims=(64, 64, 320),
        nc_depth=(0, 0, 11),
        nc_heads=(1, 1, 5),
        nc_groups=(1, 1, 64),
        mlp_ratio=2.0,
    ),
    "vitae_s": ViTAEConfig(
        embed_dims=(64, 64, 192),
        token_dims=(96, 192, 384),
        nc_depth=(0, 0, 14),
        nc_heads=(1, 1, 6),
        nc_groups=(1, 1, 96),
        mlp_ratio=3.0,
    ),
    # Fashion-MNIST preset: 28x28 grayscale resized to 32, three 2x reductions keep a 4x4 last grid
    # so Grad-CAM still localises; the cells are the released ones at a smaller width.
    "vitae_fmnist": ViTAEConfig(
        embed_dims=(32, 32, 64),
        token_dims=(32, 64, 128),
        nc_depth=(0, 0, 4),
        nc_heads=(1, 1, 4),
        nc_groups=(1, 1, 32),
        mlp_ratio=2.0,
        img_size=32,
        in_chans=1,
        num_classes=10,
        downsample_ratios=(2, 2, 2),
        mean=(0.2860,),
        std=(0.3530,),
        crop_pct=1.0,
        interpolation="bilinear",
    ),
}


def get_variant(name: str) -> ViTAEConfig:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; known variants: {', '.join(VARIANTS)}") from None


def _stage_list(value: Any, stages: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * stages


def config_from_official(kwargs: dict[str, Any]) -> ViTAEConfig:
    """Map the release's `ViTAE_ViT_basic(**kwargs)` constructor arguments to a config."""
    kwargs = dict(kwargs)
    stages = int(kwargs.pop("stages", 3))
    if stages != 3:
        raise ValueError(f"only three-stage ViTAE models are supported, got stages={stages}")
    for name, expected in (("RC_op", "cat"), ("class_token", False), ("share_weights", False)):
        if name in kwargs and kwargs.pop(name) != expected:
            raise ValueError(f"{name} other than {expected!r} is not part of the released ImageNet models")
    nc_types = _stage_list(kwargs.pop("NC_tokens_type", "transformer"), stages)
    if any(t != "transformer" for t in nc_types):
        raise ValueError(f"NC_tokens_type must be 'transformer' in every stage, got {nc_types}")
    token_dims = kwargs.pop("token_dims", 64)
    token_dims = token_dims if isinstance(token_dims, (list, tuple)) else [token_dims * 2**i for i in range(stages)]
    mapping = {
        "embed_dims": "embed_dims",
        "downsample_ratios": "downsample_ratios",
        "kernel_size": "kernel_sizes",
        "RC_heads": "rc_heads",
        "NC_heads": "nc_heads",
        "RC_tokens_type": "rc_tokens_type",
        "RC_group": "rc_groups",
        "NC_group": "nc_groups",
        "NC_depth": "nc_depth",
    }
    out: dict[str, Any] = {"token_dims": tuple(token_dims)}
    for official, ours in mapping.items():
        if official in kwargs:
            out[ours] = tuple(_stage_list(kwargs.pop(official), stages))
    if "dilations" in kwargs:
        out["dilations"] = tuple(tuple(d) for d in kwargs.pop("dilations"))
    scalars = {
        "img_size": "img_size",
        "in_chans": "in_chans",
        "num_classes": "num_classes",
        "mlp_ratio": "mlp_ratio",
        "qkv_bias": "qkv_bias",
        "drop_rate": "drop_rate",
        "attn_drop_rate": "attn_drop_rate",
        "drop_path_rate": "drop_path_rate",
    }
    for official, ours in scalars.items():
        if official in kwargs:
            out[ours] = kwargs.pop(official)
    if kwargs.pop("qk_scale", None) is not None:
        raise ValueError("qk_scale other than None is not supported")
    kwargs.pop("norm_layer", None)
    if kwargs:
        raise ValueError(f"unsupported constructor arguments of the release: {sorted(kwargs)}")
    if "in_chans" in out and out["in_chans"] != 3:
        out.setdefault("mean", (0.5,) * out["in_chans"])
        out.setdefault("std", (0.5,) * out["in_chans"])
    missing = [name for name in ("embed_dims", "nc_depth", "nc_heads", "nc_groups") if name not in out]
    if missing:
        raise ValueError(f"the release's constructor arguments lack {missing} (their stage-3 defaults differ)")
    out.setdefault("mlp_ratio", 4.0)
    return ViTAEConfig(**out)
