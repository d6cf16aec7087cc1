"""The equal-budget CIFAR-10 benchmark of map attention (``spatial-attention compare``).

``cli`` parses and validates, ``runner`` trains one resumable (mechanism, seed) run under
a fixed :class:`~.runner.Protocol`, ``net`` is the airbench-style CNN with one attention
slot per stage, ``data`` decodes CIFAR-10 once into a uint8 cache and augments batches on
the device, ``stats`` summarises runs (Welch intervals against the baseline).
``token_net`` and ``token_runner`` are the token-mixer protocol (``compare --tokens``): a
small hierarchical transformer whose token mixer is swapped, trained with AdamW on the
same data, resume and summary machinery.
"""

from .runner import PRESETS, Protocol, RunResult, train_run

__all__ = ["PRESETS", "Protocol", "RunResult", "train_run"]
