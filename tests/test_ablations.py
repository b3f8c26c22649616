"""The ablation runner (minihalo.experiments.ablations): one run of all six arms from one shared aligned model (a
random 4-layer byte-level teacher, the tiny step counts of tests/test_pipeline.py), then each rule an arm stands for:
its layers, where RoPE goes, no s_t without retraining, equal tokens; the summary; a rerun skips finished arms; the
runner's own options are refused among the shared ones."""
import hashlib
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from minihalo.experiments import ablations
from minihalo.pipeline import main as halo_main
from test_halo import make_teacher
from test_pipeline import word_corpus

ARMS = list(ablations.ARMS)


def shared_args(root, data):
    """The shared settings: tests/test_pipeline.py's tiny run (3 + 3 + 4 steps, T = 96, reports at 96 and 192)."""
    return ["--teacher", str(root / "teacher"), "--data-dir", str(data), "--no-progress", "--steps-align", "3",
            "--steps-distill", "3", "--steps-finetune", "4", "--batch-align", "2", "--batch-distill", "2",
            "--finetune-lengths", "192", "--finetune-tokens-per-batch", "384", "--select-samples", "5",
            "--eval-samples", "1", "--eval-windows", "2", "--eval-lengths", "96,192", "--scale-length", "192",
            "--a-grid", "16,256", "--warmup-steps", "1"]


def read(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every arm, two at a time. Steps 1 and 2 run first (as the runner's shared command would; the runner then
    finds them done): a random teacher finds no needle, so HALO's and the recall-drop rule's choices tie on the
    lowest layer; recall_drop's list is set to another layer, so that taking the wrong rule's list shows."""
    root = tmp_path_factory.mktemp("ablations")
    data = word_corpus(root / "data")
    make_teacher(vocab=256, layers=4, seq_len=96).save_pretrained(str(root / "teacher"))
    args, out = shared_args(root, data), root / "abl"
    halo_main([*args, "--out", str(out / "shared"), "--stages", "align,select"])
    select = read(out / "shared" / "select.json")
    select["recall_drop"] = [next(i for i in range(4) if i not in select["halo"] + select["even"])]
    (out / "shared" / "select.json").write_text(json.dumps(select))
    status = ablations.main(["--out", str(out), "--parallel", "2", *args])
    return SimpleNamespace(out=out, args=args, status=status, select=select,
                           report={arm: read(out / arm / "report.json") for arm in ARMS})


def test_every_arm_finishes(runs):
    assert runs.status == 0
    assert all(ablations.is_done(runs.out / arm) for arm in ARMS)


def test_layer_arms_take_their_rule_from_the_shared_selection(runs):
    s = runs.select
    assert len({tuple(s["halo"]), tuple(s["even"]), tuple(s["recall_drop"])}) == 3  # else a swap could not show
    rule = {"halo": "halo", "even": "even", "recall_drop": "recall_drop", "attn_rope": "halo", "no_lin_rope": "halo",
            "no_st": "halo"}
    for arm in ARMS:
        layers = read(runs.out / arm / "select.json")["layers"]
        types = runs.report[arm]["layer_types"]
        assert layers == s[rule[arm]], arm
        assert [i for i, t in enumerate(types) if t == "attention"] == layers, arm  # the model the report measured


def test_rope_goes_where_each_arm_says(runs):
    for arm in ARMS:
        assert runs.report[arm]["rope"] == {"attention": "RoPE" if arm == "attn_rope" else "NoPE",
                                            "lightning": "NoPE" if arm == "no_lin_rope" else "RoPE"}, arm


def file_sums(folder):
    """{relative path: sha256} of every file under `folder` but checkpoints."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and "ckpt" not in p.parts}


def test_no_st_is_the_halo_arm_without_its_query_scale(runs):
    halo, no_st = runs.out / "halo", runs.out / "no_st"
    assert runs.report["halo"]["query_scale_a"] in (16.0, 256.0) and (halo / "scale.json").is_file()
    assert runs.report["no_st"]["query_scale_a"] is None and "scale" not in runs.report["no_st"]
    assert not (no_st / "scale.json").exists() and not (no_st / "hybrid").exists()
    for step in ("distill", "finetune"):  # the same files, not retrained: stats.json holds each run's wall seconds
        sums = file_sums(halo / step)
        assert any(name.startswith("model") for name in sums) and "stats.json" in sums, step
        assert file_sums(no_st / step) == sums, step


def test_every_arm_trains_on_the_same_tokens(runs):
    tokens = {arm: runs.report[arm]["steps"] for arm in ARMS}
    for step, expected in (("align", 3 * 2 * 96), ("distill", 3 * 2 * 96), ("finetune", 4 * 384)):
        assert {arm: t[step]["tokens"] for arm, t in tokens.items()} == dict.fromkeys(ARMS, expected), step


def test_summary_has_each_arm_at_each_length(runs):
    res = read(runs.out / "ablations.json")
    assert list(res["arms"]) == ARMS and res["halo_args"] == runs.args
    for arm, entry in res["arms"].items():
        rep = runs.report[arm]
        for model in ("teacher", "hypenet"):
            assert entry["niah"][model] == rep["eval"][model]["niah"]  # report.py's own mean over depths
            assert entry["perplexity"][model] == rep["eval"][model]["perplexity"]
            assert list(entry["perplexity"][model]) == ["96", "192"]
        assert entry["perplexity_ratio_at_train_length"] == rep["quality"]["perplexity_ratio_at_train_length"]
        assert entry["query_scale_a"] == rep["query_scale_a"] and entry["rope"] == rep["rope"]
    assert res["arms"]["even"]["flags"] == ["--attn-layers", ",".join(map(str, runs.select["even"]))]
    table = (runs.out / "ablations.md").read_text()
    assert table == ablations.ablation_table(res) and len(table.splitlines()) == 2 + 1 + len(ARMS)


def test_niah_is_the_mean_over_depths_of_each_length():
    """report.json's niah_grid has a row per evaluated length and a column per depth."""
    grid = [[1, 0, 0, 0, 0], [1, 1, 1, 1, 0]]
    report = {"config": {"eval_lengths": [96, 192]}, "rope": {}, "query_scale_a": None, "train_length": 96,
              "quality": {"perplexity_ratio_at_train_length": 1.5}, "steps": {},
              "eval": {"hypenet": {"perplexity": {"96": 3.0, "192": 4.0}, "niah_grid": grid}}}
    assert ablations.arm_summary(report, [1], [])["niah"] == {"hypenet": {"96": 0.2, "192": 0.8}}


def test_redo_only_while_an_arm_holds_the_shared_result(runs):
    """--redo deletes a step's results: an arm's later command (after a spent time budget) must continue without it."""
    shared = runs.out / "shared"
    assert ablations.redo_flags(shared, shared, "select") == ["--redo", "select"]  # a fresh copy holds shared's
    assert ablations.redo_flags(shared, shared, "distill") == []  # shared has no distill: nothing to redo
    redone = {"align": {"no_lin_rope"}, "select": {"even", "recall_drop", "no_lin_rope"}}
    for step, arms in redone.items():
        for arm in ARMS:
            assert ablations.redo_flags(runs.out / arm, shared, step) == ([] if arm in arms else ["--redo", step])


def test_a_rerun_skips_every_finished_arm(runs, capsys):
    before = {arm: (runs.out / arm / "report.json").stat().st_mtime_ns for arm in ARMS}
    t0 = time.perf_counter()
    assert ablations.main(["--out", str(runs.out), "--parallel", "2", *runs.args]) == 0
    printed = capsys.readouterr().out
    assert all(f"{arm}: skipped" in printed for arm in ARMS), printed
    assert {arm: (runs.out / arm / "report.json").stat().st_mtime_ns for arm in ARMS} == before
    assert time.perf_counter() - t0 < 30  # the shared command finds its steps done; no arm runs


@pytest.mark.parametrize("options", [["--stages", "report"], ["--stages=report"], ["--stag", "report"],
                                     ["--redo", "select"], ["--attn-layers", "1"], ["--selection", "even"],
                                     ["--attn-rope"], ["--no-lin-rope"], ["--arms", "no_st"], ["--arms", "halo,x"]])
def test_the_runners_own_settings_are_refused_before_anything_runs(tmp_path, capsys, options):
    """With no teacher there: a runner that let the option through would fail fast in the shared command (exit
    status 1), not refuse it (SystemExit 2)."""
    with pytest.raises(SystemExit) as e:
        ablations.main(["--out", str(tmp_path / "abl"), "--teacher", str(tmp_path / "none"), *options])
    assert e.value.code == 2 and options[0].split("=")[0] in capsys.readouterr().err
    assert not (tmp_path / "abl").exists()
