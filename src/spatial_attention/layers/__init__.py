"""Mechanisms as ``nn.Module``s, one family a file; importing registers them."""

from .base import AttentionModule
from .channel import EfficientChannelAttention, SqueezeExcite
from .position import RelativePositionBias
from .scoring import AdditiveAttention, DotProductAttention, MultiHeadAttention

__all__ = [
    "AttentionModule",
    "AdditiveAttention",
    "EfficientChannelAttention",
    "SqueezeExcite",
    "DotProductAttention",
    "MultiHeadAttention",
    "RelativePositionBias",
]
