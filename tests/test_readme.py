"""The README's claims that can drift: its package snippet runs as written, and the HALO numbers it quotes are
those of the committed reports in notebooks/results/."""
import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def python_blocks(section):
    """The ```python blocks of the README section that starts with the heading `section`."""
    start = README.index(section)
    end = README.find("\n## ", start + len(section))
    return re.findall(r"```python\n(.*?)```", README[start:end if end > 0 else None], re.S)


def test_package_snippet_runs_as_written(tmp_path, monkeypatch):
    snippet = python_blocks("## The package")[0]
    (tmp_path / "data").symlink_to(ROOT / "data")  # the snippet reads data/toy_teacher, relative to the repository
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["out"].shape == (1, scope["input_ids"].shape[1] + 8)
    assert scope["same"].config == scope["hypenet"].config
    assert os.path.isfile("runs/hypenet-toy/model.safetensors")


def halo_reports():
    return sorted(p for p in (ROOT / "notebooks" / "results").glob("halo_*.json")
                  if "quality" in json.loads(p.read_text()))


@pytest.mark.parametrize("path", halo_reports(), ids=lambda p: p.name)
def test_halo_numbers_in_readme_match_the_report(path):
    """A committed HALO report that the README links: the README gives its perplexity ratio (3 decimals) and its
    attention layers as they are in the JSON."""
    if path.name not in README:
        pytest.skip(f"the README does not cite {path.name}")
    rep = json.loads(path.read_text())
    ratio = f"{rep['quality']['perplexity_ratio_at_train_length']:.3f}"
    assert ratio in README, f"README should quote {path.name}'s perplexity ratio {ratio}"
    layers = str(rep["select"]["layers"])
    assert layers in README, f"README should quote {path.name}'s attention layers {layers}"


SMOLLM2_LENGTHS = ["512", "2048", "8192", "16384", "32768", "65536"]  # the columns of the README's SmolLM2 tables


def assert_readme_rows(e, ppl_label, niah_label):
    """The README has a table row `| ppl_label | ... |` of the evaluation `e`'s perplexity and one `| niah_label |
    ... |` of its pass-key NIAH (%) at SMOLLM2_LENGTHS, each rounded as the README writes it."""
    ppl = lambda x: f"{x:,.2f}" if x < 10 else f"{x:,.1f}" if x < 100 else f"{x:,.0f}"  # noqa: E731
    row = " | ".join(ppl(e["perplexity"][L]) for L in SMOLLM2_LENGTHS)
    assert f"| {ppl_label} | {row} |" in README
    row = " | ".join(f"{100 * e['niah'][L]:.0f}" for L in SMOLLM2_LENGTHS)
    assert f"| {niah_label} | {row} |" in README


def test_smollm2_table_in_readme_matches_the_report():
    """The README's SmolLM2 table: perplexity and pass-key NIAH of teacher and HypeNet at each length it shows, as
    in notebooks/results/smollm2_h200.json; its perplexity ratio at 2K and the attention layers HALO chose."""
    rep = json.loads((ROOT / "notebooks" / "results" / "smollm2_h200.json").read_text())
    for name, label in (("teacher", "teacher"), ("hypenet", "HypeNet")):
        assert_readme_rows(rep["eval"][name], f"{label} perplexity", f"{label} pass-key NIAH (%)")
    assert f"{rep['quality']['perplexity_ratio_at_train_length']:.2f} times the teacher's" in README
    assert str(rep["select"]["layers"]) in README


def test_longest_smollm2_table_in_readme_matches_the_results():
    """The README's table of the longest SmolLM2 run: the teacher's and each arm's HypeNet perplexity and pass-key
    NIAH at each length it shows, and each arm's perplexity ratio at 2K and attention layers, as in
    notebooks/results/smollm2_long_h200.json."""
    res = json.loads((ROOT / "notebooks" / "results" / "smollm2_long_h200.json").read_text())
    assert_readme_rows(res["halo"]["report"]["eval"]["teacher"], "teacher perplexity", "teacher pass-key NIAH (%)")
    for arm, label in (("halo", "HALO's layers"), ("even", "evenly spaced layers")):
        rep = res[arm]["report"]
        assert_readme_rows(rep["eval"]["hypenet"], f"HypeNet perplexity, {label}",
                           f"HypeNet pass-key NIAH (%), {label}")
        assert f"{rep['quality']['perplexity_ratio_at_train_length']:.3f}" in README
        assert str(rep["select"]["layers"]) in README
