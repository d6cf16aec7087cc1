"""BOAT's balanced hierarchical binary clustering: partition, balance, determinism, and
the same grouping as a plain per-cluster transcription of the reference algorithm."""

import math

import pytest
import torch
import torch.nn.functional as F

from spatial_attention.functional.clustering import (
    balanced_binary_clustering,
    inverse_permutation,
    num_levels,
)


def plain_reference_grouping(q: torch.Tensor, g: int = 49, iters: int = 2, t: float = 100.0):
    """The reference's steps for one (N, d) sequence, N = g * 2^L, one cluster at a time."""
    clusters = [torch.arange(q.shape[0])]
    for _ in range(int(math.log2(q.shape[0] // g))):
        split = []
        for idx in clusters:
            x = q[idx]  # (n, d), current order
            n = x.shape[0]
            cent = torch.stack([x[: n // 2].mean(0), x[n // 2:].mean(0)])
            cent = F.normalize(cent, dim=-1)
            unit = F.normalize(x, dim=-1)
            for _ in range(iters):
                soft = torch.softmax(unit @ cent.T * t, dim=-1)  # (n, 2)
                cent = F.normalize(soft.T @ x, dim=-1)
            cos = unit @ cent.T
            key = (cos[:, 0] + 1) / (cos[:, 1] + 1)
            order = torch.sort(key).indices
            split += [idx[order[: n // 2]], idx[order[n // 2:]]]
        clusters = split
    return torch.cat(clusters)


def test_same_grouping_as_the_reference_algorithm_on_56x56_maps():
    torch.manual_seed(0)
    q = torch.randn(2, 56 * 56, 16, dtype=torch.float64)
    perm = balanced_binary_clustering(q, 49)
    assert perm.shape == (2, 3136)
    for b in range(2):
        assert torch.equal(perm[b], plain_reference_grouping(q[b]))


@pytest.mark.parametrize("n,g", [(3136, 49), (143, 49), (49, 49), (10, 49), (1, 4), (37, 4)])
def test_leaves_hold_g_slots_and_partition_the_tokens(n, g):
    q = torch.randn(2, n, 8)
    perm = balanced_binary_clustering(q, g)
    slots = g * 2 ** num_levels(n, g)
    assert perm.shape == (2, slots)
    for row in perm:
        assert torch.equal(row.sort().values, torch.arange(slots))  # a permutation
        # real tokens fill the first n slots, padding the rest: only the last real leaf
        # can be partial, every other leaf holds exactly g real tokens
        assert (row[:n] < n).all() and (row[n:] >= n).all()
    leaves = perm[:, : (n // g) * g].view(2, -1, g)
    assert (leaves < n).all()


def test_deterministic_and_per_sample():
    torch.manual_seed(1)
    q = torch.randn(4, 2, 400, 8)
    a = balanced_binary_clustering(q, 25)
    assert torch.equal(a, balanced_binary_clustering(q.clone(), 25))
    # a sample's grouping never depends on the other samples of the batch
    assert torch.equal(a[2:3], balanced_binary_clustering(q[2:3], 25))


def test_groups_similar_tokens_together():
    # two well separated directions: the first split must put them in different halves
    torch.manual_seed(2)
    a = torch.randn(1, 8) + torch.tensor([[8.0] + [0.0] * 7])
    b = torch.randn(1, 8) + torch.tensor([[0.0, 8.0] + [0.0] * 6])
    x = torch.cat([a.repeat(8, 1), b.repeat(8, 1)])[torch.randperm(16)]
    x = x + 0.01 * torch.randn_like(x)
    perm = balanced_binary_clustering(x[None], 8)[0]
    first = set(perm[:8].tolist())
    group_a = {i for i in range(16) if x[i, 0] > x[i, 1]}
    assert first == group_a or first == set(range(16)) - group_a


def test_inverse_permutation():
    perm = torch.stack([torch.randperm(10) for _ in range(3)])
    inv = inverse_permutation(perm)
    assert torch.equal(perm.gather(1, inv), torch.arange(10).expand(3, 10))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="balanced_binary_clustering"):
        balanced_binary_clustering(torch.randn(5), 4)
    with pytest.raises(ValueError, match="group_size"):
        balanced_binary_clustering(torch.randn(5, 2), 0)
