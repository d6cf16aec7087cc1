"""Mechanisms as ``nn.Module``s, one family a file; importing registers them.

Every module of this package is imported here, so a new family file registers its
mechanisms without further wiring; the classes people import by name are re-exported.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from .bam import BAM
from .base import AttentionModule
from .biformer import BiLevelRoutingAttention
from .bilateral import BilateralLocalAttention, FeatureSpaceLocalAttention
from .branch import SelectiveKernel
from .cbam import CBAM, ChannelGate, SpatialGate
from .channel import EfficientChannelAttention, SqueezeExcite
from .coord import CoordinateAttention
from .cpca import ChannelPriorConvAttention
from .cpms import ChannelPriorMultiScaleAttention
from .criss_cross import CrissCrossAttention
from .cswin import CSWinAttention
from .deformable import DeformableConv2d, DynamicConv2d
from .deformable_attention import DeformableAttention
from .ema import EMA
from .external import ExternalAttention
from .gam import GAM
from .generalized import GeneralizedAttention
from .global_attention import GlobalAttention, GlobalSubsampledAttention
from .global_context import GlobalContext
from .lsk import LargeSelectiveKernel
from .maxvit import MaxViTBlockAttention, MaxViTGridAttention
from .multiview import MultiViewWindowAttention
from .neighborhood import NeighborhoodAttention
from .non_local import NonLocal2d
from .polarized import PolarizedSelfAttention
from .position import PositionEncodingGenerator, RelativePositionBias
from .rims import RIMs
from .scoring import AdditiveAttention, DotProductAttention, MultiHeadAttention
from .sge import SpatialGroupEnhance
from .shuffle_attention import ShuffleAttention
from .simam import SimAM
from .subspace import SubspaceAttention
from .temporal import TemporalAdaptiveModule, TemporalSelfAttention
from .triplet import TripletAttention
from .window import WindowAttention
from .workspace import SharedWorkspace

for _mod in _pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "RIMs",
    "MaxViTBlockAttention",
    "MaxViTGridAttention",
    "NeighborhoodAttention",
    "DeformableAttention",
    "ShuffleAttention",
    "LargeSelectiveKernel",
    "BiLevelRoutingAttention",
    "BAM",
    "CBAM",
    "EMA",
    "GAM",
    "AdditiveAttention",
    "AttentionModule",
    "BilateralLocalAttention",
    "CSWinAttention",
    "ChannelGate",
    "ChannelPriorConvAttention",
    "ChannelPriorMultiScaleAttention",
    "CoordinateAttention",
    "CrissCrossAttention",
    "DeformableConv2d",
    "DotProductAttention",
    "DynamicConv2d",
    "EfficientChannelAttention",
    "ExternalAttention",
    "FeatureSpaceLocalAttention",
    "GeneralizedAttention",
    "GlobalAttention",
    "GlobalContext",
    "GlobalSubsampledAttention",
    "MultiHeadAttention",
    "MultiViewWindowAttention",
    "NonLocal2d",
    "PolarizedSelfAttention",
    "PositionEncodingGenerator",
    "RelativePositionBias",
    "SelectiveKernel",
    "SharedWorkspace",
    "SimAM",
    "SpatialGate",
    "SpatialGroupEnhance",
    "SqueezeExcite",
    "SubspaceAttention",
    "TemporalAdaptiveModule",
    "TemporalSelfAttention",
    "TripletAttention",
    "WindowAttention",
]
