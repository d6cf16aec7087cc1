"""The README's promises: its first lines give the two commands, its quick start runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_first_lines_give_the_two_commands():
    head = "\n".join(ROOT.joinpath("README.md").read_text().splitlines()[:8])
    assert "pip install torch==2.13.0" in head
    assert "spatial-attention bench" in head
    assert "pytest" in head
    ci = ROOT.joinpath(".ci", "run").read_text()
    assert "python -m pytest -q" in ci and "python -m pytest -q" in head


def test_quick_start_runs(tmp_path, monkeypatch):
    text = ROOT.joinpath("README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python quick start"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README quick start", "exec"), {})
    assert (tmp_path / "heads.png").stat().st_size > 0


def test_vision_transformer_snippet_runs(tmp_path, monkeypatch):
    text = ROOT.joinpath("README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
              if 'create_model("swin_tiny")' in b]
    assert blocks, "README lost its vision-transformer snippet"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "README vision transformers", "exec"), scope)
    assert [tuple(m.shape) for m in scope["maps"]] == [
        (1, 96, 56, 56), (1, 192, 28, 28), (1, 384, 14, 14), (1, 768, 7, 7)
    ]


def test_readme_compare_table_is_generated_from_the_committed_summary():
    from spatial_attention.apps.compare.readme import END, START, readme_block

    text = ROOT.joinpath("README.md").read_text()
    assert START in text and END in text
    block = text.split(START, 1)[1].split(END, 1)[0]
    assert block == "\n" + readme_block(ROOT / "benchmarks" / "compare")


def test_readme_claims_table_is_generated_from_the_committed_results():
    from spatial_attention.apps.compare.readme import CLAIMS_END, CLAIMS_START, claims_block

    text = ROOT.joinpath("README.md").read_text()
    assert CLAIMS_START in text and CLAIMS_END in text
    block = text.split(CLAIMS_START, 1)[1].split(CLAIMS_END, 1)[0]
    assert block == "\n" + claims_block(ROOT / "benchmarks" / "compare")


def test_readme_token_table_is_generated_from_the_committed_token_summary():
    from spatial_attention.apps.compare.readme import (
        TOKEN_FOLDER,
        TOKENS_END,
        TOKENS_START,
        readme_block,
    )

    text = ROOT.joinpath("README.md").read_text()
    block = text.split(TOKENS_START, 1)[1].split(TOKENS_END, 1)[0]
    folder = ROOT / "benchmarks" / "compare" / TOKEN_FOLDER
    assert block == "\n" + readme_block(folder, "global")
    assert "mixer FLOPs 224px" in block
