import pytest
import torch

from spatial_attention.functional import (
    cyclic_shift,
    pad_to_multiple,
    padding_mask,
    relative_position_bias,
    relative_position_index,
    shifted_window_mask,
    window_attention_mask,
    window_partition,
    window_reverse,
)


@pytest.mark.parametrize("H,W,M", [(8, 8, 4), (14, 21, 7), (9, 13, 4), (5, 3, 7), (1, 1, 2)])
def test_partition_reverse_round_trip_any_size(H, W, M):
    x = torch.randn(2, H, W, 3)
    xp, (ph, pw) = pad_to_multiple(x, M)
    assert xp.shape[1] % M == 0 and xp.shape[2] % M == 0
    assert ph == (-H) % M and pw == (-W) % M
    win = window_partition(xp, M)
    assert win.shape == (2 * (xp.shape[1] // M) * (xp.shape[2] // M), M * M, 3)
    back = window_reverse(win, M, xp.shape[1], xp.shape[2])
    torch.testing.assert_close(back[:, :H, :W], x)
    assert (back[:, H:] == 0).all() and (back[:, :, W:] == 0).all()


def test_partition_contents_are_windows():
    x = torch.arange(4 * 6).float().reshape(1, 4, 6, 1)
    win = window_partition(x, (2, 3))
    assert win[0, :, 0].tolist() == [0, 1, 2, 6, 7, 8]
    assert win[1, :, 0].tolist() == [3, 4, 5, 9, 10, 11]
    assert win[2, :, 0].tolist() == [12, 13, 14, 18, 19, 20]


def test_partition_rejects_unpadded():
    with pytest.raises(ValueError, match="pad_to_multiple"):
        window_partition(torch.randn(1, 5, 4, 2), 4)


def test_cyclic_shift_inverse():
    x = torch.randn(2, 7, 9, 3)
    torch.testing.assert_close(cyclic_shift(cyclic_shift(x, 3), -3), x)
    assert cyclic_shift(x, 0) is x
    torch.testing.assert_close(cyclic_shift(x, 2)[:, 0, 0], x[:, 2, 2])


def _brute_force_shift_mask(H, W, M, s):
    """The official Swin construction: label slices, partition, compare pairwise."""
    img = torch.zeros(1, H, W, 1)
    cnt = 0
    for hs in (slice(0, -M), slice(-M, -s), slice(-s, None)):
        for ws in (slice(0, -M), slice(-M, -s), slice(-s, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    win = window_partition(img, M)[..., 0]  # (nW, N)
    nW, N = win.shape
    keep = torch.zeros(nW, N, N, dtype=torch.bool)
    for w in range(nW):
        for i in range(N):
            for j in range(N):
                keep[w, i, j] = bool(win[w, i] == win[w, j])
    return keep


@pytest.mark.parametrize("H,W,M,s", [(8, 8, 4, 2), (14, 14, 7, 3), (12, 8, 4, 2), (6, 9, 3, 1)])
def test_shift_mask_equals_brute_force(H, W, M, s):
    torch.testing.assert_close(shifted_window_mask(H, W, M, s), _brute_force_shift_mask(H, W, M, s))


def test_window_attention_mask_none_when_nothing_to_mask():
    mask, ph, pw = window_attention_mask(14, 14, 7, 0)
    assert mask is None and ph == pw == 0


def test_window_attention_mask_masks_padding_keys_after_shift():
    H, W, M, s = 9, 10, 4, 2
    keep, ph, pw = window_attention_mask(H, W, M, s)
    Hp, Wp = H + ph, W + pw
    # brute force over the padded, shifted grid: same region and the key is a real token
    valid = cyclic_shift(padding_mask(H, W, ph, pw)[None, :, :, None], s)
    valid = window_partition(valid, M)[..., 0]
    region = _brute_force_shift_mask(Hp, Wp, M, s)
    torch.testing.assert_close(keep, region & valid[:, None, :])
    # every real query keeps at least itself
    real_query = valid[:, :, None].expand_as(keep)
    diag = torch.eye(M * M, dtype=torch.bool).expand_as(keep)
    assert keep[real_query & diag].all()


def test_relative_position_index_matches_offsets():
    M = 3
    idx = relative_position_index(M)
    assert idx.shape == (9, 9) and idx.min() == 0 and idx.max() == (2 * M - 1) ** 2 - 1
    coords = [(i, j) for i in range(M) for j in range(M)]
    for a, (yi, xi) in enumerate(coords):
        for b, (yj, xj) in enumerate(coords):
            assert idx[a, b] == (yi - yj + M - 1) * (2 * M - 1) + (xi - xj + M - 1)


def test_relative_position_index_rectangular():
    idx = relative_position_index((2, 3))
    assert idx.shape == (6, 6) and idx.max() == 3 * 5 - 1
    # same offset, same entry
    assert idx[0, 1] == idx[3, 4]


def test_relative_position_bias_gather_and_grad():
    table = torch.randn(25, 3, dtype=torch.float64, requires_grad=True)
    idx = relative_position_index(3)
    bias = relative_position_bias(table, idx)
    assert bias.shape == (3, 9, 9)
    torch.testing.assert_close(bias[1, 4, 4], table[12, 1])  # zero offset is the centre row
    torch.autograd.gradcheck(lambda t: relative_position_bias(t, idx), (table,))


@pytest.mark.parametrize(
    "H,W,M,s", [(9, 13, 4, 2), (7, 7, 7, 0), (14, 14, 7, 3), (5, 3, 7, 0), (57, 45, 7, 3)]
)
def test_window_token_index_is_pad_shift_partition(H, W, M, s):
    from spatial_attention.functional.windows import window_token_index

    x = torch.randn(2, H, W, 3)
    gather, scatter = window_token_index(H, W, M, s)
    padded, _ = pad_to_multiple(x, M)
    expected = window_partition(cyclic_shift(padded, s), M).reshape(2, -1, 3)
    real, _ = pad_to_multiple(torch.ones(1, H, W, 1), M)
    real = window_partition(cyclic_shift(real, s), M).reshape(-1) > 0
    got = x.flatten(1, 2)[:, gather]
    assert torch.equal(got[:, real], expected[:, real])  # padded slots are masked, not zero
    assert torch.equal(got[:, scatter], x.flatten(1, 2))  # the scatter undoes it and crops
