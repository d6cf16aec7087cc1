"""The papers' claims table of the equal-budget benchmark (apps/compare/claims.py) and the
README generator that writes it."""

import pytest

from spatial_attention.apps.compare.claims import (
    CLAIMS,
    Claim,
    claims_table,
    read_accuracies,
    verdict,
)
from spatial_attention.apps.compare.readme import (
    CLAIMS_END,
    CLAIMS_START,
    END,
    START,
    TOKENS_END,
    TOKENS_START,
    update_readme,
)

BEATS = Claim("a", "beats", "b", "map", "paper")
RIVALS = Claim("a", "rivals", "b", "tokens", "paper")


@pytest.mark.parametrize("acc, expected", [
    ({"a": [90.0, 90.2, 90.1], "b": [89.0, 89.1, 88.9]}, "reproduced"),
    ({"a": [88.0, 88.2, 88.1], "b": [89.0, 89.1, 88.9]}, "contradicted"),
    ({"a": [89.0, 90.0, 88.5], "b": [89.0, 89.6, 88.9]}, "not resolved"),
    ({"a": [90.0], "b": [89.0, 89.1, 88.9]}, "not measured yet"),
    ({"b": [89.0, 89.1, 88.9]}, "not measured yet"),
])
def test_beats_verdicts(acc, expected):
    text, ci = verdict(BEATS, acc)
    assert text == expected
    assert (ci is None) == (expected == "not measured yet")
    if ci is not None:
        assert ci[1] < ci[0] < ci[2]


@pytest.mark.parametrize("acc, expected", [
    ({"a": [88.0, 88.2, 88.1], "b": [89.0, 89.1, 88.9]}, "not reproduced"),
    ({"a": [89.0, 90.0, 88.5], "b": [89.0, 89.6, 88.9]}, "consistent"),
    ({"a": [90.0, 90.2, 90.1], "b": [89.0, 89.1, 88.9]}, "consistent"),
])
def test_rivals_verdicts(acc, expected):
    assert verdict(RIVALS, acc)[0] == expected


def test_claims_are_the_issue_s_and_well_formed():
    assert [(c.first, c.kind, c.second) for c in CLAIMS] == [
        ("cbam", "beats", "se"), ("gam", "beats", "cbam"), ("cpms", "beats", "cbam"),
        ("generalized_attention_0111", "rivals", "generalized_attention"),
        ("boat", "rivals", "global")]
    with pytest.raises(ValueError, match="kind"):
        Claim("a", "equals", "b", "map", "x")
    with pytest.raises(ValueError, match="protocol"):
        Claim("a", "beats", "b", "detection", "x")


def _results(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["mechanism,seed,accuracy"] + [f"{m},{s},{a}" for m, s, a in rows]
    path.write_text("\n".join(lines) + "\n")


def test_table_reads_both_protocols_and_counts_seeds(tmp_path):
    assert read_accuracies(tmp_path / "missing.csv") == {}
    _results(tmp_path / "results.csv", [("cbam", 0, 0.90), ("cbam", 1, 0.902),
                                        ("se", 0, 0.89), ("se", 1, 0.891), ("gam", 0, 0.9)])
    acc = read_accuracies(tmp_path / "results.csv")
    assert acc["cbam"] == pytest.approx([90.0, 90.2])
    table = claims_table({"map": acc, "tokens": {}})
    rows = table.strip().splitlines()
    assert len(rows) == 2 + len(CLAIMS)
    cbam_se = next(r for r in rows if r.startswith("| cbam beats se"))
    assert "| 2 / 2 |" in cbam_se and "+1.05 [" in cbam_se
    assert cbam_se.rstrip().endswith("| reproduced |")
    gam = next(r for r in rows if r.startswith("| gam beats cbam"))
    assert "| 1 / 2 | - | not measured yet |" in gam
    boat = next(r for r in rows if r.startswith("| boat rivals global"))
    assert "| 0 / 0 | - | not measured yet |" in boat


def test_update_readme_rewrites_both_blocks(tmp_path):
    folder = tmp_path / "bench"
    _results(folder / "results.csv", [("none", 0, 0.87), ("none", 1, 0.871)])
    _results(folder / "tokens" / "results.csv", [("global", 0, 0.6), ("global", 1, 0.61),
                                                 ("boat", 0, 0.5), ("boat", 1, 0.51)])
    (folder / "summary.csv").write_text(
        "mechanism,n,mean,std,diff,ci_low,ci_high,significant,params,macs\n"
        "none,2,87.05,0.07,,,,,498104,33066272\n")
    readme = tmp_path / "README.md"
    (folder / "tokens" / "summary.csv").write_text(
        "mechanism,n,mean,std,diff,ci_low,ci_high,significant,params,macs,attn_flops_32px,"
        "attn_flops_224px\nglobal,2,60.5,0.7,,,,,1573994,79268352,25165824,2620391424\n"
        "boat,2,50.5,0.7,-10.0,-13.0,-7.0,*,1500000,70000000,,\n")
    readme.write_text(f"intro\n{START}\nold\n{END}\nmiddle\n{CLAIMS_START}\nold\n"
                      f"{CLAIMS_END}\n{TOKENS_START}\nold\n{TOKENS_END}\nend\n")
    assert update_readme(readme, folder)
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("end\n")
    assert "| none | 2 | 87.05 | 0.07 |" in text
    assert "| boat rivals global |" in text and "not reproduced" in text
    assert "| entry | seeds |" in text and "vs global (95% CI)" in text
    assert "| global | 2 | 60.50 | 0.70 | - | 1,573,994 | 79.3M | 25.2M | 2620.4M |" in text
    assert "| boat | 2 | 50.50 | 0.70 | -10.00 [-13.00, -7.00] * |" in text
    assert text.count("| - | - |") == 1  # boat's FLOPs unknown
    assert not update_readme(readme, folder)  # already current
    readme.write_text(f"{START}\n{END}\n")
    with pytest.raises(ValueError, match="claims:start"):
        update_readme(readme, folder)
