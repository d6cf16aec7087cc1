"""Mechanisms as ``nn.Module``s, one family a file; importing registers them.

Every module of this package is imported here, so a new family file registers its
mechanisms without further wiring; the classes people import by name are re-exported.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from .base import AttentionModule
from .bilateral import BilateralLocalAttention, FeatureSpaceLocalAttention
from .branch import SelectiveKernel
from .cbam import CBAM, ChannelGate, SpatialGate
from .channel import EfficientChannelAttention, SqueezeExcite
from .cpca import ChannelPriorConvAttention
from .cpms import ChannelPriorMultiScaleAttention
from .cswin import CSWinAttention
from .deformable import DeformableConv2d, DynamicConv2d
from .gam import GAM
from .generalized import GeneralizedAttention
from .global_attention import GlobalAttention, GlobalSubsampledAttention
from .multiview import MultiViewWindowAttention
from .position import PositionEncodingGenerator, RelativePositionBias
from .scoring import AdditiveAttention, DotProductAttention, MultiHeadAttention
from .subspace import SubspaceAttention
from .temporal import TemporalAdaptiveModule, TemporalSelfAttention
from .window import WindowAttention
from .workspace import SharedWorkspace

for _mod in _pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "CBAM",
    "GAM",
    "AdditiveAttention",
    "AttentionModule",
    "BilateralLocalAttention",
    "CSWinAttention",
    "ChannelGate",
    "ChannelPriorConvAttention",
    "ChannelPriorMultiScaleAttention",
    "DeformableConv2d",
    "DotProductAttention",
    "DynamicConv2d",
    "EfficientChannelAttention",
    "FeatureSpaceLocalAttention",
    "GeneralizedAttention",
    "GlobalAttention",
    "GlobalSubsampledAttention",
    "MultiHeadAttention",
    "MultiViewWindowAttention",
    "PositionEncodingGenerator",
    "RelativePositionBias",
    "SelectiveKernel",
    "SharedWorkspace",
    "SpatialGate",
    "SqueezeExcite",
    "SubspaceAttention",
    "TemporalAdaptiveModule",
    "TemporalSelfAttention",
    "WindowAttention",
]
