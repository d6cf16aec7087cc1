import pytest

import spatial_attention as sa

SUBCOMMANDS = ["list", "info", "bench", "viz", "train", "evaluate", "denoise", "train-denoiser",
               "compare", "yolo"]


def test_list_shows_every_mechanism(cli):
    r = cli("list")
    assert r.returncode == 0, r.stderr
    for name in sa.list_mechanisms():
        assert name in r.stdout
    r = cli("list", "--family", "channel")
    assert r.returncode == 0 and "se" in r.stdout and "multi_head" not in r.stdout


def test_list_markdown_is_the_registry_table(cli):
    r = cli("list", "--markdown")
    assert r.returncode == 0
    assert r.stdout.strip() == sa.registry.markdown_table()


def test_info(cli):
    r = cli("info", "multi_head")
    assert r.returncode == 0
    assert "Vaswani" in r.stdout and "signature" in r.stdout and "num_heads" in r.stdout


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_for_every_subcommand(cli, sub):
    r = cli(sub, "--help")
    assert r.returncode == 0 and "usage" in r.stdout.lower()


@pytest.mark.parametrize(
    "args",
    [("info", "multihead"), ("list", "--family", "nope"), ("nosuchcommand",), ()],
)
def test_bad_input_exits_2_with_one_line(cli, args):
    r = cli(*args)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
