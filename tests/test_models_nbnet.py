"""NBNet: official configuration, any size, and the MegEngine checkpoint converter."""

import pickle

import numpy as np
import pytest
import torch

from spatial_attention.errors import UsageError
from spatial_attention.models import create_model, list_models
from spatial_attention.models.nbnet import (
    convert_megengine_state_dict,
    load_pretrained,
    read_megengine_pickle,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def official_shapes(in_chn=3, wf=32, depth=5, K=16, mid=128):
    """Names and shapes of MegEngine ``UNetD(3)``'s state dict, written from model.py.

    Independent of our module tree: built from the official layer list (conv weights
    (out, in, kh, kw), transposed-conv weights (in, out, kh, kw), biases (1, C, 1, 1)).
    """
    shapes = {}

    def conv(name, cin, cout, k, bias=True):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        if bias:
            shapes[f"{name}.bias"] = (1, cout, 1, 1)

    def conv_block(name, cin, cout, down=False):
        conv(f"{name}.block.0", cin, cout, 3)
        conv(f"{name}.block.2", cout, cout, 3)
        conv(f"{name}.shortcut", cin, cout, 1)
        if down:
            conv(f"{name}.downsample", cout, cout, 4, bias=False)

    prev = in_chn
    for i in range(depth):
        conv_block(f"down_path.{i}", prev, wf * 2**i, down=i + 1 < depth)
        prev = wf * 2**i
    for n, i in enumerate(reversed(range(depth - 1))):
        out, p = wf * 2**i, f"up_path.{n}"
        shapes[f"{p}.up.weight"] = (prev, out, 2, 2)
        shapes[f"{p}.up.bias"] = (1, out, 1, 1)
        conv_block(f"{p}.conv_block", prev, out)
        conv_block(f"{p}.subnet.blocks.0", prev, K)
        conv(f"{p}.subnet.shortcut", prev, K, 1)
        repeat = n + 1
        widths = [out, mid] + [mid] * (repeat - 2) + [out]
        for j, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            conv_block(f"{p}.skip_m.blocks.{j}", a, b)
        conv(f"{p}.skip_m.shortcut", out, out, 1)
        prev = out
    conv("last", prev, in_chn, 3)
    return shapes


def test_registered_and_official_parameter_count():
    assert {"nbnet", "nbnet_small"} <= set(list_models())
    model = create_model("nbnet")
    n = sum(p.numel() for p in model.parameters())
    assert n == sum(int(np.prod(s)) for s in official_shapes().values())
    assert round(n / 1e6, 1) == 13.3


@pytest.mark.parametrize("size", [(1, 1), (13, 29)])
def test_any_size_and_residual_output(size):
    model = create_model("nbnet_small").eval()
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        out = model(x)
        noise = model.predict_noise(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, x - noise)


def test_without_ssa_has_no_subspace_attention():
    with_ssa = create_model("nbnet_small")
    plain = create_model("nbnet_small", ssa=False)
    assert any(k.endswith("ssa.subnet.shortcut.weight") for k in with_ssa.state_dict())
    assert not any(".ssa." in k for k in plain.state_dict())
    assert plain(torch.rand(1, 3, 8, 8)).shape == (1, 3, 8, 8)


def test_wrong_input_is_a_clear_error():
    model = create_model("nbnet_small")
    with pytest.raises(ValueError, match="nbnet.*3 channels"):
        model(torch.rand(1, 4, 16, 16))
    with pytest.raises(ValueError, match="nbnet"):
        model(torch.rand(3, 16, 16))


def _as_megengine(model):
    """Our state dict rewritten in the official names/shapes, as numpy arrays."""
    out = {}
    for k, v in model.state_dict().items():
        k = k.replace(".ssa.subnet.", ".subnet.")
        v = v.numpy()
        if k.endswith(".bias"):
            v = v.reshape(1, -1, 1, 1)
        out[k] = v
    return out


def test_official_names_and_shapes_convert_to_ours():
    model = create_model("nbnet")
    official = official_shapes()
    mge = _as_megengine(model)
    assert {k: v.shape for k, v in mge.items()} == official
    converted = convert_megengine_state_dict({"epoch": 70, "state_dict": mge})
    ours = model.state_dict()
    assert set(converted) == set(ours)
    assert all(converted[k].shape == ours[k].shape for k in ours)


@pytest.mark.parametrize("suffix", [".pkl", ".npz", ".safetensors", ".pt"])
def test_load_pretrained_from_official_layout(tmp_path, suffix):
    torch.manual_seed(0)
    src = create_model("nbnet_small").eval()
    mge = _as_megengine(src)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pkl":  # what megengine.save writes: a pickle of numpy arrays
        with open(path, "wb") as f:
            pickle.dump({"epoch": 3, "state_dict": mge}, f)
    elif suffix == ".npz":
        np.savez(path, **mge)
    elif suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: torch.from_numpy(v) for k, v in mge.items()}, path)
    else:
        torch.save({k: torch.from_numpy(v) for k, v in mge.items()}, path)
    dst = load_pretrained(create_model("nbnet_small").eval(), path)
    x = torch.rand(1, 3, 20, 24)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


def test_wrong_keys_are_reported_by_name(tmp_path):
    mge = _as_megengine(create_model("nbnet_small"))
    mge.pop("up_path.1.subnet.shortcut.weight")
    mge["up_path.0.extra.weight"] = np.zeros(3, np.float32)
    mge["last.weight"] = np.zeros((3, 3, 1, 1), np.float32)
    path = tmp_path / "w.npz"
    np.savez(path, **mge)
    with pytest.raises(UsageError) as err:
        load_pretrained(create_model("nbnet_small"), path)
    msg = str(err.value)
    assert "up_path.1.ssa.subnet.shortcut.weight" in msg
    assert "up_path.0.extra.weight" in msg
    assert "last.weight" in msg and "(3, 3, 1, 1)" in msg


def test_pickle_reader_runs_no_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"a": Evil()}}, f)
    with pytest.raises(UsageError, match="refusing to load builtins.print"):
        read_megengine_pickle(path)
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(UsageError, match="not a MegEngine"):
        load_pretrained(create_model("nbnet_small"), tmp_path / "junk.pkl")
