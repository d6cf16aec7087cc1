"""Image classification with any mechanism: ``spatial-attention train`` / ``evaluate``.

>>> from spatial_attention.apps.training import build_model, evaluate_run
>>> model = build_model("resnet18_cifar", num_classes=10, attn="cbam")

Modules, one concern each: :mod:`.cli` (options, the torchrun entry), :mod:`.config`
(settings), :mod:`.loop` (training and evaluation), :mod:`.distributed` (ranks and
devices), :mod:`.model`, :mod:`.data` (datasets, samplers, batch augmentation),
:mod:`.checkpoints` and :mod:`.ema` (run state), :mod:`.reporting` (CSV, figures,
attention overlays).
"""

from .cli import add_arguments, add_evaluate_arguments, main, run, run_evaluate
from .config import DEFAULTS
from .loop import WarmupCosine, evaluate_run, train
from .model import build_model
from .reporting import write_overlays

__all__ = [
    "DEFAULTS",
    "WarmupCosine",
    "add_arguments",
    "add_evaluate_arguments",
    "build_model",
    "evaluate_run",
    "main",
    "run",
    "run_evaluate",
    "train",
    "write_overlays",
]
