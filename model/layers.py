"""Layers evaluated in float32 whatever the weights' dtype, as the reference runs them (WanLayerNorm,
linears under fp32 autocast); shared by the transformer (blocks, time embedding, head) and its
conditioning modules (model/conditioning.py), so they sit in a module below both.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the stored dtype (the official WanLayerNorm)."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


def _linear32(layer: nn.Linear, x: Tensor) -> Tensor:
    """A linear layer evaluated in float32 (the reference runs these under fp32 autocast)."""
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(x.float(), _dense_weight(layer).float(), bias)


def _dense_weight(layer: nn.Module) -> Tensor:
    """The weight of a Linear, dequantized if it is stored in fp8 (see checkpoint.Fp8Linear)."""
    dequant = getattr(layer, "dequantized_weight", None)
    return dequant() if dequant is not None else layer.weight
