"""The benchmark's network: airbench's fast CIFAR-10 CNN with an attention slot per stage.

Shape (after Keller Jordan's airbench94, written anew here)::

    2x2 whitening conv (3 -> 24, no padding; fixed weights from the patch covariance)
    GELU
    stage(24 -> w1), stage(w1 -> w2), stage(w2 -> w3)      widths (64, 256, 256) x width
    MaxPool 3, linear (no bias), x 1/9

    stage(c_in -> c):  conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU -> attn(c)

``attn`` is the mechanism under test, built with ``sa.create(name, c)`` on the stage's
output channels (the ``attn_layer`` convention; an entry of :data:`VARIANTS` passes its
constructor arguments too); the baseline puts ``nn.Identity`` there. BatchNorms keep
their scale fixed at 1 (only the shift trains: with the following conv free to rescale,
a trained scale only adds a direction the large learning rate would have to fight).
Every 3x3 conv starts with its first ``min(c_in, c_out)`` filters set to the identity
(Dirac), the rest at PyTorch's default draw; so the second conv of a stage (``c -> c``)
starts as an exact identity and a deep stack of plain convs starts close to a shallow
one, the role a residual connection plays in deeper networks. The whitening conv's bias
starts at zero (as airbench's); its weights are set from data by
:func:`whitening_weights` and never train.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["CompareNet", "BASE_WIDTHS", "VARIANTS", "make_attention", "resolve_entry",
           "whitening_sample", "whitening_weights"]

BASE_WIDTHS = (64, 256, 256)
WHITEN_KERNEL = 2
#: how many training images the whitening is estimated from (airbench's number)
WHITEN_IMAGES = 5000


#: entries that are a registered mechanism with other constructor arguments, for the
#: papers' own ablations the benchmark tests (claims.py): name -> (mechanism, kwargs).
#: Zhu et al. (ICCV 2019) find the query-key content term E1 negligible in self-attention;
#: ``generalized_attention_0111`` drops it from the default ``'1111'``.
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "generalized_attention_0111": ("generalized_attention", {"attention_type": "0111"}),
}


def resolve_entry(name: str) -> tuple[str, dict[str, object]]:
    """``(registered mechanism, constructor kwargs)`` of a benchmark entry."""
    mechanism, kwargs = VARIANTS.get(name, (name, {}))
    return mechanism, dict(kwargs)


def make_attention(name: str, channels: int) -> nn.Module:
    if name == "none":
        return nn.Identity()
    import spatial_attention as sa

    mechanism, kwargs = resolve_entry(name)
    return sa.create(mechanism, channels, **kwargs)


class _Conv(nn.Conv2d):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        # identity on the first min(cin, cout) channels: see the module docstring
        torch.nn.init.dirac_(w[: min(w.shape[0], w.shape[1])])


def _norm(c: int) -> nn.BatchNorm2d:
    # momentum 0.4 (PyTorch convention): running stats track the fast-moving weights of a
    # short schedule; eps tiny because whitened, unscaled activations are well conditioned
    bn = nn.BatchNorm2d(c, momentum=0.4, eps=1e-12)
    bn.weight.requires_grad_(False)
    return bn


class Stage(nn.Module):
    def __init__(self, cin: int, cout: int, attention: str) -> None:
        super().__init__()
        self.conv1 = _Conv(cin, cout)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _norm(cout)
        self.conv2 = _Conv(cout, cout)
        self.norm2 = _norm(cout)
        self.act = nn.GELU()
        # the mechanism draws its initial weights from a stream of its own, so for a
        # given seed every entry starts from the same backbone weights (an entry differs
        # from the baseline by its mechanism only, not by a reshuffled initialisation)
        attn_seed = int(torch.randint(2**31 - 1, (), device="cpu"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(attn_seed)
            self.attn = make_attention(attention, cout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        x = self.act(self.norm2(self.conv2(x)))
        return self.attn(x)


class CompareNet(nn.Module):
    """The benchmark CNN; ``attention`` names the mechanism in every stage (or "none")."""

    def __init__(self, attention: str = "none", width: float = 0.5, num_classes: int = 10):
        super().__init__()
        widths = [max(8, int(round(w * width))) for w in BASE_WIDTHS]
        self.widths = tuple(widths)
        cw = 2 * 3 * WHITEN_KERNEL ** 2
        self.whiten = nn.Conv2d(3, cw, WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        # zeroed after PyTorch's default draw, so the random stream (and with it every
        # later weight) is what it would be without this line
        nn.init.zeros_(self.whiten.bias)
        self.act = nn.GELU()
        self.stages = nn.Sequential(
            Stage(cw, widths[0], attention),
            Stage(widths[0], widths[1], attention),
            Stage(widths[1], widths[2], attention),
        )
        self.pool = nn.MaxPool2d(3)
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        # logits scaled down so label-smoothed CE starts near its uniform value
        self.scale = 1.0 / 9
        # channels_last weights and inputs: oneDNN's convolutions run faster on them on
        # the CPU, for every entry measured (benchmarks/compare/README.md); the math is
        # the same, the rounding of the sums may differ
        self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.stages(self.act(self.whiten(x)))
        return self.head(self.pool(x).flatten(1)) * self.scale

    def norm_biases(self) -> list[nn.Parameter]:
        """The BatchNorm shifts of the backbone, which get the larger learning rate."""
        return [m.bias for s in self.stages for m in (s.norm1, s.norm2)]


def whitening_sample(n_train: int, count: int = WHITEN_IMAGES) -> Tensor:
    """Indices of the training images the whitening is estimated from: ``count`` of
    them in an order drawn once from a fixed generator, so the same for every
    mechanism and seed. airbench takes the first 5,000 of CIFAR-10's own file, which is
    in random class order; the decoded tars here are sorted by name, so their first
    5,000 images are all one class, and a whitening fitted to one class mis-scales the
    others' patches. A fixed random draw restores a sample of the whole set."""
    g = torch.Generator(device="cpu")
    g.manual_seed(20_240_517)
    return torch.randperm(n_train, generator=g)[: min(count, n_train)].sort().values


@torch.no_grad()
def whitening_weights(images: Tensor, eps: float = 5e-4) -> Tensor:
    """``(24, 3, 2, 2)`` conv weights that whiten 2x2 patches of ``images`` (normalised
    float ``(N, 3, H, W)``): the patch covariance's eigenvectors scaled by
    ``1/sqrt(eigenvalue + eps)``, each also negated so GELU keeps both signs."""
    k = WHITEN_KERNEL
    patches = images.double().unfold(2, k, 1).unfold(3, k, 1)  # (N, 3, H', W', k, k)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k)
    cov = patches.T @ patches / patches.shape[0]
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0), evecs.flip(1)  # largest variance first
    w = (evecs.T / torch.sqrt(evals.clamp_min(0) + eps)[:, None]).reshape(-1, 3, k, k)
    return torch.cat([w, -w]).float()
