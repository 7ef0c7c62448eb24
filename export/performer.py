"""The Performer of the reduction cells in a form that stays inside FP16's range, for the exported graph.

The release computes positive random features `kp = exp(lk) / sqrt(m)`, `qp = exp(lq) / sqrt(m)` with
`lk = w.k - |k|^2/2`, `lq = w.q - |q|^2/2`, then `y = (qp . sum_t v_t kp_t) / (qp . sum_t kp_t + eps)`. On the
trained demo model the features reach ~1e5, the normaliser ~5e7 and the numerator ~6e7: past FP16's 65504, so an
FP16 engine would produce inf/NaN logits.

`y` does not change when `qp` is scaled per token or `kp` per sequence (numerator and normaliser scale alike),
except through `eps`, which does not scale. So the form below writes `qp = c_q qp'`, `kp = c_k kp'` with
`qp' = exp(lq - max_m lq)` (<= 1) and `kp' = exp(lk - max_{t,m} lk) / T` (sums to at most 1 over t), and carries
eps to the new scale: `y = num' / (d' + eps / (c_q c_k))`. Every intermediate is then bounded by m * max|v| or
less; only the log-domain values `lk`, `lq` and |x|^2 (a few hundred on real images) stay as in the release.

Where the release's own features underflow (every `lq` of a token below about -100: `qp` is 0 and `y` is 0), the
carried eps keeps that answer instead of turning the token into an ordinary one. There eps / (c_q c_k) is huge,
so numerator and normaliser are both multiplied by its inverse instead: no factor ever exceeds 1.

The training module keeps the release's arithmetic and state dict; `stable_performers` swaps this form in on the
copy that is exported.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.layers import TokenPerformer


class StableTokenPerformer(TokenPerformer):
    """`TokenPerformer` with the same parameters and fp32 result, computed with FP16-sized intermediates."""

    @classmethod
    def from_release(cls, performer: TokenPerformer) -> StableTokenPerformer:
        """A stable twin of `performer` holding the same parameters (its state dict loads strictly)."""
        dim, token_dim = performer.norm1.normalized_shape[0], performer.emb
        twin = cls(dim, token_dim, kernel_ratio=performer.m / token_dim, drop=performer.dp.p)
        twin.load_state_dict(performer.state_dict(), strict=True)
        twin.epsilon = performer.epsilon
        return twin.train(performer.training)

    def log_features(self, x: torch.Tensor) -> torch.Tensor:
        """The release's features in the log domain: w.x - |x|^2/2, (B, T, m)."""
        xd = (x * x).sum(dim=-1, keepdim=True) / 2  # (B, T, 1)
        wtx = torch.einsum("bti,mi->btm", x.float(), self.w)  # (B, T, m)
        return wtx - xd

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)  # 3 x (B, T, E)
        lk, lq = self.log_features(k), self.log_features(q)  # (B, T, m)

        # Keys: one scale per sequence, kp = c_k kp' with kp' = exp(lk - max) / T, so sum_t kp' <= 1 for every m.
        # (Dividing by T, a constant, rather than by the sum of the features: that sum reaches T*m, 1e5 on ViTAE-T.)
        # Maxima as TopK(1): ONNX Runtime's symbolic shape inference (graph.tidy) cannot read ReduceMax's axes input.
        tokens = int(lk.shape[1])  # a constant of the graph: only the batch dimension is dynamic
        max_k = lk.flatten(1).topk(1, dim=1).values.unsqueeze(2)  # (B, 1, 1)
        kp = torch.exp(lk - max_k) * (1.0 / tokens)  # (B, T, m), in (0, 1/T]
        # Queries: one scale per token. qp = c_q qp'.
        max_q = lq.topk(1, dim=2).values  # (B, T, 1)
        qp = torch.exp(lq - max_q)  # (B, T, m), in (0, 1]

        d = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1)).unsqueeze(2)  # (B, T, 1), <= m
        kptv = torch.einsum("bin,bim->bnm", v.float(), kp)  # (B, E, m), <= max|v|
        # y = num' / (d' + exp(L)) with L = log(eps / (c_q c_k)), c_q = exp(max_q) / sqrt(m) and
        # c_k = T exp(max_k) / sqrt(m). L is large where the release's features underflow (its y is 0 there),
        # so both terms are scaled by exp(-max(L, 0)): no exp of a positive exponent, no factor above 1, exact.
        log_eps = math.log(self.epsilon) + math.log(self.m) - math.log(tokens) - max_q - max_k  # (B, T, 1)
        zero = log_eps.new_zeros(())
        shrink = torch.exp(torch.minimum(-log_eps, zero))  # (B, T, 1), exp(-max(L, 0))
        eps = torch.exp(torch.minimum(log_eps, zero))  # (B, T, 1), exp(min(L, 0))
        num = torch.einsum("bti,bni->btn", qp, kptv)  # (B, T, E), <= m max|v|
        y = num * shrink / (d * shrink + eps)  # (B, T, E)
        return v + self.dp(self.proj(y))


def stable_performers(model: nn.Module) -> int:
    """Replace, in place, every release `TokenPerformer` of `model` by its stable twin; returns how many."""
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is TokenPerformer
    ]
    for parent, name, child in swaps:
        setattr(parent, name, StableTokenPerformer.from_release(child))
    return len(swaps)
