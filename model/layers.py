"""The cells of ViTAE, named as in the paper and laid out so their state_dict keys match the release."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def prm_padding(kernel: int, dilation: int, stride: int) -> int:
    """The release's padding, which makes every dilated branch land on the same output grid."""
    return math.ceil(((kernel - 1) * dilation + 1 - stride) / 2)


class PRM(nn.Module):
    """Pyramid Reduction Module: parallel strided dilated convs, joined along channels branch-major."""

    def __init__(
        self, in_chans: int, embed_dim: int, kernel_size: int, stride: int, dilations: tuple[int, ...]
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_chans, embed_dim, kernel_size, stride, prm_padding(kernel_size, d, stride), d),
                nn.GELU(),
            )
            for d in dilations
        )
        self.out_chans = embed_dim * len(dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One channel concat of the branches (branch-major, as the release's permute/reshape yields)
        # followed by the flatten to tokens: the shape export relies on for fusing.
        y = torch.cat([conv(x) for conv in self.convs], dim=1)  # (B, D*E, H', W')
        return y.flatten(2).transpose(1, 2)  # (B, H'*W', D*E)


def reduction_pcm(in_chans: int, embed_dim: int, token_dim: int, downsample: int, groups: int) -> nn.Sequential:
    """The RC's parallel convolution branch: three 3x3 convs whose strides multiply to `downsample`."""
    strides, residual = [], downsample // 2
    for _ in range(3):
        strides.append(2 if residual > 0 else 1)
        residual //= 2
    if residual:
        raise ValueError(f"a reduction cell reduces at most 8x, got {downsample}")
    return nn.Sequential(
        nn.Conv2d(in_chans, embed_dim, 3, strides[0], 1, groups=groups),
        nn.SiLU(inplace=True),
        nn.Conv2d(embed_dim, embed_dim, 3, strides[1], 1, groups=groups),
        nn.BatchNorm2d(embed_dim),
        nn.SiLU(inplace=True),
        nn.Conv2d(embed_dim, token_dim, 3, strides[2], 1, groups=groups),
        nn.SiLU(inplace=True),
    )


class TokenPerformer(nn.Module):
    """Performer token attention of the reduction cells (T2T style: the value projection is the skip)."""

    def __init__(self, dim: int, token_dim: int, kernel_ratio: float = 0.5, drop: float = 0.0) -> None:
        super().__init__()
        self.emb = token_dim
        self.kqv = nn.Linear(dim, 3 * token_dim)
        self.dp = nn.Dropout(drop)
        self.proj = nn.Linear(token_dim, token_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(token_dim)
        self.epsilon = 1e-8
        self.mlp = nn.Sequential(
            nn.Linear(token_dim, token_dim), nn.GELU(), nn.Linear(token_dim, token_dim), nn.Dropout(drop)
        )
        self.m = int(token_dim * kernel_ratio)
        # Fixed orthogonal random features; a parameter (not a buffer) so released checkpoints load.
        w = nn.init.orthogonal_(torch.empty(self.m, token_dim)) * math.sqrt(self.m)
        self.w = nn.Parameter(w, requires_grad=False)

    def prm_exp(self, x: torch.Tensor) -> torch.Tensor:
        # Positive random features of the softmax kernel: exp(w.x - |x|^2 / 2) / sqrt(m).
        xd = (x * x).sum(dim=-1, keepdim=True) / 2  # (B, T, 1)
        wtx = torch.einsum("bti,mi->btm", x.float(), self.w)  # (B, T, m)
        return torch.exp(wtx - xd) / math.sqrt(self.m)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)  # 3 x (B, T, E)
        kp, qp = self.prm_exp(k), self.prm_exp(q)  # (B, T, m)
        d = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1)).unsqueeze(2)  # (B, T, 1)
        kptv = torch.einsum("bin,bim->bnm", v.float(), kp)  # (B, E, m)
        y = torch.einsum("bti,bni->btn", qp, kptv) / (d + self.epsilon)  # (B, T, E)
        return v + self.dp(self.proj(y))


class ReductionCell(nn.Module):
    """RC: PRM -> Performer attention, plus the PCM on the cell's input, then a residual MLP.

    A PRM-only cell (`performer_less`, the release's last RC) returns the PRM tokens directly.
    """

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        token_dim: int,
        downsample: int,
        kernel_size: int,
        dilations: tuple[int, ...],
        tokens_type: str,
        groups: int,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        # Registration order PCM, PRM, attn reproduces the release's state_dict order.
        less = tokens_type == "performer_less"
        self.PCM = None if less else reduction_pcm(in_chans, embed_dim, token_dim, downsample, groups)
        self.PRM = PRM(in_chans, embed_dim, kernel_size, downsample, dilations)
        self.attn = None if less else TokenPerformer(self.PRM.out_chans, token_dim, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = tokens_to_image(x)  # (B, C, H, W)
        tokens = self.PRM(x)  # (B, N, D*E)
        if self.attn is None:
            return tokens
        y = self.attn.attention(self.attn.norm1(tokens))  # (B, N, C)
        y = y + image_to_tokens(self.PCM(x))
        return y + self.attn.mlp(self.attn.norm2(y))


def tokens_to_image(x: torch.Tensor) -> torch.Tensor:
    B, N, C = x.shape
    side = math.isqrt(N)
    return x.transpose(1, 2).reshape(B, C, side, side)  # (B, C, H, W)


def image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # (B, H*W, C)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention of the normal cells."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, drop: float = 0.0
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, C/H) each
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(x))


def normal_pcm(dim: int, hidden: int, groups: int) -> nn.Sequential:
    """The NC's parallel convolution branch (grouped, stride 1)."""
    return nn.Sequential(
        nn.Conv2d(dim, hidden, 3, 1, 1, 1, groups),
        nn.BatchNorm2d(hidden),
        nn.SiLU(inplace=True),
        nn.Conv2d(hidden, dim, 3, 1, 1, 1, groups),
        nn.BatchNorm2d(dim),
        nn.SiLU(inplace=True),
        nn.Conv2d(dim, dim, 3, 1, 1, 1, groups),
        nn.SiLU(inplace=True),
    )


class NormalCell(nn.Module):
    """NC: self-attention and the PCM side by side on the residual, then an MLP residual."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        groups: int,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        class_token: bool = False,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.class_token = class_token
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden, drop)
        self.PCM = normal_pcm(dim, hidden, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # With a class token the PCM sees only the patch tokens; the class token gets no conv term.
        patches = x[:, 1:] if self.class_token else x  # (B, H*W, C)
        conv = self.drop_path(image_to_tokens(self.PCM(tokens_to_image(patches))))  # (B, H*W, C)
        if self.class_token:
            conv = F.pad(conv, (0, 0, 1, 0))  # (B, 1+H*W, C)
        x = x + self.drop_path(self.attn(self.norm1(x))) + conv
        return x + self.drop_path(self.mlp(self.norm2(x)))
