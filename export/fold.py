"""BatchNorm folding: every BatchNorm2d merged into the convolution in front of it, on a copy."""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


class FoldError(ValueError):
    """A BatchNorm that has no convolution directly before it, so it cannot be folded."""


def fold_batchnorms(model: nn.Module) -> nn.Module:
    """A deep copy of `model` in eval mode with each Conv2d -> BatchNorm2d pair replaced by one Conv2d.

    The model's BatchNorms all sit right after a Conv2d inside an `nn.Sequential` (the PCMs), which is the
    only place this looks; any BatchNorm left elsewhere is an error, so an unfolded one never reaches ONNX.
    """
    folded = copy.deepcopy(model).eval()
    for parent in folded.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        for i in range(1, len(parent)):
            conv, bn = parent[i - 1], parent[i]
            if isinstance(bn, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d):
                parent[i - 1] = fuse_conv_bn_eval(conv, bn)
                parent[i] = nn.Identity()
    leftover = [name for name, m in folded.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if leftover:
        raise FoldError(f"BatchNorm layers without a preceding Conv2d cannot be folded: {', '.join(leftover)}")
    return folded
