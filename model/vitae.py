"""ViTAE: three reduction cells, normal cells on the last grid, a mean (or class-token) head."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ViTAEConfig, get_variant
from .layers import NormalCell, ReductionCell


def sincos_pos_embed_2d(side: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position encoding, (side*side, dim): half the channels per axis."""
    if dim % 4:
        raise ValueError(f"a 2-D sinusoidal encoding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    ys, xs = torch.meshgrid(
        torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij"
    )
    out = [torch.outer(axis.flatten(), omega) for axis in (ys, xs)]  # 2 x (side*side, dim/4)
    return torch.cat([f(o) for o in out for f in (torch.sin, torch.cos)], dim=1).float()  # (side*side, dim)


class ViTAE(nn.Module):
    def __init__(self, config: ViTAEConfig) -> None:
        super().__init__()
        self.config = config
        depth = sum(config.nc_depth)
        drop_path = torch.linspace(0, config.drop_path_rate, depth).tolist() if depth else []
        cls = config.pooling == "cls"
        layers, in_chans, start = [], config.in_chans, 0
        for i in range(config.num_stages):
            stage = nn.Module()
            if config.downsample_ratios[i] > 1:
                stage.RC = ReductionCell(
                    in_chans,
                    config.embed_dims[i],
                    config.token_dims[i],
                    config.downsample_ratios[i],
                    config.kernel_sizes[i],
                    config.dilations[i],
                    config.rc_tokens_type[i],
                    config.rc_groups[i],
                    drop=config.drop_rate,
                )
            else:
                stage.RC = nn.Identity()
            # Only the last stage's normal cells follow the class token; earlier stages see patches only.
            stage.NC = nn.ModuleList(
                NormalCell(
                    config.token_dims[i],
                    config.nc_heads[i],
                    config.mlp_ratio,
                    config.nc_groups[i],
                    config.qkv_bias,
                    config.drop_rate,
                    config.attn_drop_rate,
                    drop_path[start + j],
                    class_token=cls and i == config.num_stages - 1,
                )
                for j in range(config.nc_depth[i])
            )
            layers.append(stage)
            start += config.nc_depth[i]
            in_chans = config.token_dims[i]
        self.layers = nn.ModuleList(layers)
        if cls:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
            self.norm = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.head = nn.Linear(config.embed_dim, config.num_classes) if config.num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        if cls:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def check_input(self, x: torch.Tensor) -> None:
        cfg = self.config
        r = cfg.total_reduction
        if x.ndim != 4 or x.shape[1] != cfg.in_chans or x.shape[2] != x.shape[3] or x.shape[2] % r or x.shape[2] == 0:
            raise ValueError(
                f"ViTAE expects images of shape (B, {cfg.in_chans}, S, S) with S a positive multiple of {r} "
                f"(e.g. {cfg.img_size - r}, {cfg.img_size}, {cfg.img_size + r}); got {tuple(x.shape)}"
            )

    def stage_forward(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Run one stage (its RC, then its NCs); the class token joins before the last stage's NCs."""
        layer = self.layers[stage]
        x = layer.RC(x)
        if self.config.pooling == "cls" and stage == self.config.num_stages - 1:
            B, N, C = x.shape
            pos = sincos_pos_embed_2d(math.isqrt(N), C).to(x)  # (N, C)
            x = torch.cat([self.cls_token.expand(B, -1, -1), x + pos], dim=1)  # (B, 1+N, C)
        for cell in layer.NC:
            x = cell(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) -> tokens of the last cell (B, N, C); N includes the class token if any."""
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self.check_input(x)
        for stage in range(self.config.num_stages):
            x = self.stage_forward(x, stage)
        return x

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, C) -> logits (B, K)."""
        if self.config.pooling == "cls":
            pooled = self.norm(tokens[:, 0])  # (B, C)
        else:
            pooled = tokens.mean(dim=1)  # (B, C)
        return self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_head(self, num_classes: int) -> None:
        """Replace the classifier for a new class count (fine-tuning)."""
        self.config = self.config.replace(num_classes=num_classes)
        self.head = nn.Linear(self.config.embed_dim, num_classes)
        _init_weights(self.head)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def create_model(name: str, *, num_classes: int = 1000, img_size: int = 224, in_chans: int = 3, **overrides) -> ViTAE:
    """Build a registered variant; `overrides` replace any other ViTAEConfig field."""
    base = get_variant(name)
    changes = dict(num_classes=num_classes, img_size=img_size, in_chans=in_chans, **overrides)
    if in_chans != base.in_chans and "mean" not in overrides:
        # Per-channel statistics do not carry across channel counts; average them.
        changes["mean"] = (sum(base.mean) / len(base.mean),) * in_chans
        changes["std"] = (sum(base.std) / len(base.std),) * in_chans
    return ViTAE(base.replace(**changes))
