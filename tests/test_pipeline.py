"""The HALO pipeline (minihalo.pipeline) and its command line: a run folder end to end and step by step; every
setting checked before anything runs, each bad one refused in one line naming it; results that config.json does
not describe never kept; Ctrl-C says where to resume, and the rerun resumes there; --help explains each option."""
import json
import shutil
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from minihalo.data import prepare
from minihalo.halo import STEPS
from minihalo.model import HybridLM
from minihalo import pipeline
from minihalo.pipeline import PRESETS, ConfigError, HaloConfig, Interrupted, main, read_jsonl, run
from minihalo.tasks import WORDS
from minihalo.train import NonFiniteLossError
from test_halo import make_teacher

ROOT = Path(__file__).resolve().parent.parent


def word_corpus(folder):
    """A small byte-level corpus of word documents, prepared in `folder`."""
    rng = np.random.default_rng(0)
    docs = [" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 120)) + "." for _ in range(160)]
    return prepare("words", "byte", out_dir=folder, docs=docs)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A random byte-level teacher (4 layers, T = 96) and a small corpus of word documents."""
    root = tmp_path_factory.mktemp("halo")
    data = word_corpus(root / "data")
    make_teacher(vocab=256, layers=4, seq_len=96).save_pretrained(str(root / "teacher"))
    return root, data


def tiny_args(world, out, *more):
    """The command line of a run in `out` (relative to the world's folder, or absolute) with tiny step counts."""
    root, data = world
    return ["--out", str(root / out), "--teacher", str(root / "teacher"), "--data-dir", str(data), "--no-progress",
            "--steps-align", "3", "--steps-distill", "3", "--steps-finetune", "4", "--batch-align", "2",
            "--batch-distill", "2", "--finetune-lengths", "192", "--finetune-tokens-per-batch", "384",
            "--select-samples", "5", "--eval-samples", "1", "--eval-windows", "2", "--eval-lengths", "96,192",
            "--scale-length", "192", "--a-grid", "16,256", "--warmup-steps", "1", *more]


@pytest.fixture(scope="module")
def finished(world):
    """A run folder with every step done (tiny step counts); tests take copies (the `done` fixture)."""
    main(tiny_args(world, "finished"))
    return world[0] / "finished"


@pytest.fixture
def done(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def test_cli_runs_end_to_end_and_steps_run_alone(world):
    main(tiny_args(world, "run", "--stages", "align,select"))
    d = world[0] / "run"
    assert (d / "align" / "model" / "config.json").is_file()
    main(tiny_args(world, "run", "--stages", "distill,finetune,scale,report"))  # reads step 1's output
    rep = json.loads((d / "report.json").read_text())
    sel = json.loads((d / "select.json").read_text())
    assert len(sel["layers"]) == 1 and sel["layers"] == sel["halo"]  # k = floor(4 / 4)
    assert rep["layer_types"].count("attention") == 1 and rep["query_scale_a"] in (16.0, 256.0)
    assert set(rep["eval"]) == {"teacher", "hypenet"} and set(rep["eval"]["hypenet"]["perplexity"]) == {"96", "192"}
    assert set(rep["steps"]) == {"align", "distill", "finetune"}
    assert rep["steps"]["distill"]["tokens"] == 3 * 2 * 96
    sha = json.loads((Path(world[1]) / "meta.json").read_text())["sha256"]  # of the documents (tests/test_data.py)
    assert rep["corpus"] == {"corpus": "words", "sha256": sha} and sha in (d / "report.md").read_text()
    assert rep["wall_seconds"] >= rep["eval_seconds"] + rep["steps"]["distill"]["seconds"] > 0  # resumed: 2nd call
    for f in ("report.md", "perplexity.png", "niah.png", "layer_scores.png", "hybrid/config.json",
              "align/layers.jsonl", "distill/history.jsonl"):
        assert (d / f).is_file(), f
    assert len(read_jsonl(d / "align" / "layers.jsonl")) == 3
    assert json.loads((d / "steps.json").read_text()).keys() == set(STEPS)


def test_each_training_step_follows_the_method_schedule(finished):
    """docs/method.md §4: AdamW with betas (0.9, 0.95), no weight decay, clipping at 1; steps 1 and 3 decay by
    cosine to a hundredth of their peak, step 4 keeps its small learning rate constant after the warm-up."""
    defaults = HaloConfig()
    for step, lr in (("align", defaults.lr_align), ("distill", defaults.lr_distill)):
        rates = [r["lr"] for r in read_jsonl(finished / step / "history.jsonl")]
        assert rates[-1] == pytest.approx(lr / 100) and rates[0] == pytest.approx(lr), step
    rates = [r["lr"] for r in read_jsonl(finished / "finetune" / "history.jsonl")]
    assert rates == pytest.approx([defaults.lr_finetune] * 4)
    for ckpt in ("align/ckpt", "distill/ckpt", "finetune/len192/ckpt"):
        state = torch.load(finished / ckpt / "last.pt", weights_only=False)
        group = state["optimizer"]["param_groups"][0]
        assert tuple(group["betas"]) == (0.9, 0.95) and group["weight_decay"] == 0.0, ckpt
        assert state["config"]["grad_clip"] == 1.0, ckpt


# ------------------------------------------------------------------------------------------------
# Bad settings: refused before anything runs, in one line naming the option
# ------------------------------------------------------------------------------------------------
BAD_OPTIONS = [  # (options, the error after "python -m minihalo.halo: error: ")
    (["--attn-layers", "1,x"], "--attn-layers: expected comma-separated integers, got '1,x'"),
    (["--k", "99"], "--k: expected 0 to 4 (the teacher has 4 layers), got 99"),
    (["--steps-distill", "-5"], "--steps-distill: expected an integer > 0, got -5"),
    (["--eval-lengths", "0"], "--eval-lengths: expected lengths > 0, got [0]"),
    (["--eval-lengths", "96,40"], "--eval-lengths: expected lengths of at least"),
    (["--eval-lengths", "96,100000"], "--eval-lengths: expected lengths below the"),
    (["--steps-align", "abc"], "--steps-align: expected an integer, got 'abc'"),
    (["--lr-align", "0"], "--lr-align: expected a learning rate > 0, got 0.0"),
    (["--lr-distill", "nan"], "--lr-distill: expected a number, got nan"),
    (["--batch-align", "0"], "--batch-align: expected an integer > 0, got 0"),
    (["--batch-distill", "100000"], "--batch-distill: expected at most"),
    (["--retrieval-share", "1.5"], "--retrieval-share: expected a share in [0, 1], got 1.5"),
    (["--retrieval-share", "0.8", "--copy-share", "0.4"], "--copy-share: expected at most 1 - retrieval_share"),
    (["--a-grid", "1,16"], "--a-grid: expected bases a > 1"),
    (["--selection", "best"], "--selection: expected one of halo, recall_drop, even, got 'best'"),
    (["--stages", "align,distil"], "--stages: expected names from align,select,distill,finetune,scale,report"),
    (["--stages", "distill"], "--stages: 'distill' needs the results of 'select'"),
    (["--redo", "select", "--stages", "align"], "--redo: expected a step of --stages (align), got 'select'"),
    (["--attn-layers", "1,1"], "--attn-layers: expected each layer once, got [1, 1]"),
    (["--attn-layers", "4"], "--attn-layers: expected layers 0 to 3 (the teacher has 4 layers), got [4]"),
    (["--k", "1", "--attn-ratio", "0.5"], "--attn-ratio: give one of k, attn_ratio and attn_layers; got k too"),
    (["--attn-ratio", "2"], "--attn-ratio: expected a share in [0, 1], got 2.0"),
    (["--teacher", "/no/such/teacher"], "--teacher: no such folder: '/no/such/teacher'"),
    (["--teacher-steps", "5"], "--teacher-steps: expected nothing unless --teacher toy-scratch, got 5"),
    (["--data-dir", "/no/such/data"], "--data-dir: expected a folder written by minihalo.data.prepare"),
    (["--tokenizer", "/no/such/tokenizer"], "--tokenizer: expected 'byte', a tokenizer folder or a hub id"),
    (["--seq-len", "0"], "--seq-len: expected an integer > 0, got 0"),
    (["--seq-len", "20"], "--seq-len: expected lengths of at least"),
    (["--finetune-tokens-per-batch", "100"], "--finetune-tokens-per-batch: expected at least one row of the longest"),
    (["--seed", "-1"], "--seed: expected an integer in [0, 2**32), got -1"),
    (["--device", "tpu"], "--device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["--no-such-option", "1"], "unrecognized arguments: --no-such-option 1"),
]


@pytest.mark.parametrize("options, error", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_a_bad_option_fails_at_once_in_one_line(world, tmp_path, capsys, options, error):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as stop:
        main(tiny_args(world, out, *options))
    assert time.perf_counter() - t0 < 5
    assert stop.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m minihalo.halo: error: {error}"), lines
    assert not out.exists()  # nothing a later run could take for results


def test_the_command_line_error_is_one_line_without_a_traceback(world, tmp_path):
    """As a user runs it: a fresh process, within 5 s, exit status 2, one line on stderr, no folder made."""
    out = tmp_path / "run"
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "minihalo.halo", *tiny_args(world, out, "--attn-layers", "1,x")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert time.perf_counter() - t0 < 5  # Python, torch and minihalo imported included
    assert done.returncode == 2
    assert done.stderr == "python -m minihalo.halo: error: --attn-layers: expected comma-separated integers, " \
                          "got '1,x'\n"
    assert not out.exists()


# A bad value for every HaloConfig field (given from Python, where the error is a ValueError naming the field).
BAD_SETTINGS = dict(
    out=__file__, teacher="/no/such/teacher", teacher_steps=0, tokenizer="", data_dir="/no/such/data",
    stages=("align", "distil"), redo="distil", device="cuda:99", seed=2 ** 32, progress="yes", steps_align=0,
    lin_rope=1, attn_rope="no", lr_align=-1e-3, batch_align=0, k=5, attn_ratio=-0.1, attn_layers=[0, 9],
    selection="best", select_samples=0,
    steps_distill=-5, lr_distill=float("inf"), batch_distill=2.5, seq_len=-1, chunk_rows=0, retrieval_share=1.1,
    copy_share=-0.1, finetune_lengths=[], steps_finetune=0, lr_finetune=0.0, finetune_tokens_per_batch=10,
    warmup_steps=-1, a_grid=[0.5], scale_length=0, eval_lengths=[0], eval_samples=0, eval_windows=0, preset="huge",
    parallel="zero", teacher_parallel="split", max_minutes=0, recall="needle", corpus="books",
)


def test_every_setting_is_checked_before_anything_runs(world, tmp_path):
    root, data = world
    assert set(BAD_SETTINGS) == {f.name for f in fields(HaloConfig)}  # a new setting needs a check and a case here
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        pipeline.preset_config("huge")
    good = HaloConfig(out=str(tmp_path / "run"), teacher=str(root / "teacher"), data_dir=str(data), progress=False)
    with pytest.raises(ConfigError, match="^teacher: expected a non-empty string, got a HybridLM$"):
        run(replace(good, teacher=make_teacher()))  # a run folder names its teacher, so that a rerun can load it
    for name, value in BAD_SETTINGS.items():
        t0 = time.perf_counter()
        with pytest.raises(ConfigError) as e:
            run(replace(good, **{name: value}))
        assert e.value.field == name and str(e.value).startswith(f"{name}: "), (name, str(e.value))
        assert time.perf_counter() - t0 < 5, name
        assert not (tmp_path / "run").exists(), name


# ------------------------------------------------------------------------------------------------
# Reruns: never results that config.json does not describe
# ------------------------------------------------------------------------------------------------
def refused(world, out, capsys, *options):
    """The one-line refusal of a rerun in `out` with `options`, having checked that it changed nothing."""
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as stop:
        main(tiny_args(world, out, *options))
    assert stop.value.code == 2
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # config.json included
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    return lines[0]


def test_a_rerun_with_changed_settings_refuses_until_told_to_redo(world, done, capsys):
    config = lambda: json.loads((done / "config.json").read_text())  # noqa: E731
    assert config()["k"] is None and len(json.loads((done / "select.json").read_text())["layers"]) == 1
    records = json.loads((done / "steps.json").read_text())  # a step's settings include those it builds on
    assert "lr_align" in records["select"]["settings"] and "k" not in records["align"]["settings"]
    assert "eval_lengths" in records["report"]["settings"]
    assert not {"device", "progress", "stages", "redo", "out", "chunk_rows"} & set(records["report"]["settings"])
    error = refused(world, done, capsys, "--k", "3", "--stages", "select")
    assert "holds results of 'select' made with other settings (k unset → 3)" in error
    assert "--redo select" in error and "--out" in error
    # a change to an alignment setting invalidates every step built on it, so align is the one to redo
    error = refused(world, done, capsys, "--lr-align", "0.002", "--stages", "report")
    assert "'align'" in error and "lr_align 0.003 → 0.002" in error and "--redo align" in error
    # a report about to be recomputed is no obstacle; a step it reads is
    assert "'scale'" in refused(world, done, capsys, "--a-grid", "16", "--stages", "report")

    main(tiny_args(world, done, "--k", "3", "--stages", "select", "--redo", "select"))
    assert config()["k"] == 3 and config()["redo"] == "select"
    assert len(json.loads((done / "select.json").read_text())["layers"]) == 3
    for name in ("distill", "finetune", "scale.json", "hybrid", "report.json", "report.md"):
        assert not (done / name).exists(), name  # built on the old select: removed
    assert (done / "align" / "model").is_dir()  # before it: kept
    refused(world, done, capsys, "--stages", "select")  # k is 3 now: the old command no longer matches
    main(tiny_args(world, done, "--k", "3", "--stages", "distill,finetune,scale,report"))
    rep = json.loads((done / "report.json").read_text())
    assert rep["config"] == config() | {"stages": rep["config"]["stages"]}  # the report says what config.json says
    assert config()["k"] == 3 and rep["layer_types"].count("attention") == 3


def test_the_rope_ablations_reach_the_layers_they_name(world, done, capsys):
    """--no-lin-rope builds step 1's RNNs without RoPE (so step 1 and everything after it is redone); --attn-rope
    gives the attention layers kept in step 3 RoPE (step 1 stays); the report says which layers rotate."""
    error = refused(world, done, capsys, "--attn-rope", "--stages", "distill")
    assert "'distill'" in error and "attn_rope False → True" in error and "--redo distill" in error
    main(tiny_args(world, done, "--attn-rope", "--redo", "distill"))
    rep = json.loads((done / "report.json").read_text())
    assert rep["rope"] == {"attention": "RoPE", "lightning": "RoPE"}
    model = HybridLM.from_pretrained(str(done / "hybrid"))
    assert model.config.attn_rope and model.config.lin_rope
    assert "A attention, RoPE; L Lightning, RoPE" in (done / "report.md").read_text()
    assert "'align'" in refused(world, done, capsys, "--attn-rope", "--no-lin-rope", "--stages", "align")
    main(tiny_args(world, done, "--attn-rope", "--no-lin-rope", "--stages", "align,select,distill,report",
                   "--redo", "align"))
    aligned = HybridLM.from_pretrained(str(done / "align" / "model"))
    assert not aligned.config.lin_rope and set(aligned.config.layer_types) == {"lightning"}
    rep = json.loads((done / "report.json").read_text())
    assert rep["rope"] == {"attention": "RoPE", "lightning": "NoPE"} and rep["query_scale_a"] is None


def test_settings_that_cannot_change_results_never_refuse(world, done, capsys):
    before = (done / "distill" / "model" / "model.safetensors").read_bytes()
    main(tiny_args(world, done, "--device", "cpu", "--chunk-rows", "7", "--stages", "align,distill,report",
                  "--eval-lengths", "96"))
    out = capsys.readouterr().out
    assert "align: already done" in out and "distill: already done" in out
    assert (done / "distill" / "model" / "model.safetensors").read_bytes() == before
    rep = json.loads((done / "report.json").read_text())
    assert set(rep["eval"]["hypenet"]["perplexity"]) == {"96"}  # the report is recomputed with the new lengths
    assert json.loads((done / "config.json").read_text())["eval_lengths"] == [96]


def test_a_step_run_again_removes_the_results_built_on_its_earlier_output(world, tmp_path, capsys):
    out = tmp_path / "run"
    main(tiny_args(world, out, "--stages", "align,select,distill,scale"))  # scale on the distilled model
    assert (out / "hybrid").is_dir()
    main(tiny_args(world, out, "--stages", "finetune"))
    assert "removing the results of scale" in capsys.readouterr().out
    assert not (out / "hybrid").exists() and not (out / "scale.json").exists()


def test_results_without_a_record_of_their_settings_are_not_trusted(world, done, capsys):
    (done / "steps.json").unlink()  # e.g. a run folder written before the records existed
    assert "no record of their settings" in refused(world, done, capsys, "--stages", "report")


def test_a_toy_teacher_pretrained_for_other_steps_is_not_reused(tmp_path):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "report.json").write_text(json.dumps({"steps": 5}))  # as load_teacher("toy-scratch") saves
    forget = lambda steps: pipeline.Run.forget_other_toy_teacher(  # noqa: E731
        SimpleNamespace(dir=tmp_path, cfg=SimpleNamespace(teacher_steps=steps)))
    forget(5)
    assert (tmp_path / "teacher").is_dir()
    forget(None)  # the recipe's 4000 steps
    assert not (tmp_path / "teacher").exists()


def test_a_report_stopped_by_the_time_budget_continues_where_it_stopped(world, done, capsys, monkeypatch):
    """The report evaluates one model at one length at a time and keeps each in the run folder until it is whole: a
    command whose budget is spent stops after its first evaluation (exit 75), the same command computes only the
    rest, and the report equals an uninterrupted one's. Evaluations made with other settings are not reused."""
    from minihalo import report
    whole = json.loads((done / "report.json").read_text())
    calls, ppl = [], report.perplexity_by_length
    monkeypatch.setattr(report, "perplexity_by_length", lambda *a, **k: calls.append(a[2]) or ppl(*a, **k))
    with pytest.raises(SystemExit) as stop:
        main(tiny_args(world, done, "--stages", "report", "--max-minutes", "1e-6"))  # spent before the report starts
    assert stop.value.code == 75 and calls == [[96]]  # each command evaluates once at least
    assert capsys.readouterr().err.endswith("run the same command to continue the report where it stopped\n")
    assert not (done / "report.json").exists()
    assert set(json.loads((done / report.PARTS).read_text())["done"]) == {"teacher"}

    main(tiny_args(world, done, "--stages", "report"))
    assert calls == [[96], [192], [96], [192]]  # the teacher at 192, the HypeNet at both: nothing twice
    rep = json.loads((done / "report.json").read_text())
    assert rep["eval"] == whole["eval"] and not (done / report.PARTS).exists()

    calls.clear()
    with pytest.raises(SystemExit):
        main(tiny_args(world, done, "--stages", "report", "--max-minutes", "1e-6"))
    main(tiny_args(world, done, "--stages", "report", "--eval-lengths", "96"))  # other settings: evaluated again
    assert calls == [[96], [96], [96]]


# ------------------------------------------------------------------------------------------------
# Ctrl-C: one line that says where the same command resumes; the rerun resumes there
# ------------------------------------------------------------------------------------------------
def test_ctrl_c_says_where_to_resume_and_the_same_command_resumes_there(world, finished, tmp_path, capsys,
                                                                       monkeypatch):
    stage2 = pipeline.stage2_distill

    def killed_before_step_2(teacher, aligned, layers, batches, cfg, *args, **kwargs):  # a checkpoint after every step
        def source(i):
            if i == 2:
                raise KeyboardInterrupt
            return batches(i)
        return stage2(teacher, aligned, layers, source, cfg, *args, **kwargs)

    monkeypatch.setattr(pipeline, "stage2_distill", killed_before_step_2)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main(tiny_args(world, out))
    assert stop.value.code == 130
    assert capsys.readouterr().err == "interrupted; run the same command to resume from step 2 of distill\n"
    assert not (out / "distill" / "model").exists()
    assert "an unfinished run of 'distill'" in refused(world, out, capsys, "--lr-distill", "0.001")
    monkeypatch.setattr(pipeline, "stage2_distill", stage2)
    main(tiny_args(world, out))
    assert "resuming distill from step 2" in capsys.readouterr().out
    for name in ("distill/model/model.safetensors", "hybrid/model.safetensors"):  # as if never interrupted
        assert (out / name).read_bytes() == (finished / name).read_bytes(), name


def test_ctrl_c_in_a_step_without_checkpoints(world, tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "score_swapped_models", interrupted)
    cfg = pipeline.preset_config("tiny", out=str(tmp_path / "run"), teacher=str(world[0] / "teacher"),
                                 data_dir=str(world[1]), progress=False, steps_align=2)
    with pytest.raises(Interrupted, match="^interrupted; run the same command to resume from the start of select$"):
        run(cfg)
    with pytest.raises(Interrupted):  # select saved nothing: a new setting of it is no reason to refuse
        run(replace(cfg, select_samples=3))
    with pytest.raises(Interrupted, match="without --redo align to resume from the start of select$"):
        run(replace(cfg, redo="align"))


def test_a_non_finite_loss_ends_the_command_in_one_line(world, tmp_path, capsys, monkeypatch):
    def diverged(*args, **kwargs):
        raise NonFiniteLossError("loss is nan at step 2 (micro-batch 0); training stopped. Lower the learning rate")
    monkeypatch.setattr(pipeline, "stage2_distill", diverged)
    with pytest.raises(SystemExit) as stop:
        main(tiny_args(world, tmp_path / "run"))
    assert stop.value.code == 1
    assert capsys.readouterr().err == "python -m minihalo.halo: error: loss is nan at step 2 (micro-batch 0); " \
                                      "training stopped. Lower the learning rate\n"


# ------------------------------------------------------------------------------------------------
# --help
# ------------------------------------------------------------------------------------------------
def test_help_explains_every_option_with_each_presets_value(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert text.startswith("usage: python -m minihalo.halo ")
    for f in fields(HaloConfig):
        assert len(f.metadata["help"]) > 10, f.name
        if f.name != "preset":
            assert pipeline.option_name(f.name) in text, f.name
    assert "--steps-align STEPS optimizer steps of step 1 [tiny: 100, small: 500, smollm2: 200]" in text
    assert "[tiny: 256, small: 256,512, smollm2: 16384]" in text  # lists, as typed
    for name, values in PRESETS.items():
        for key, value in values.items():
            assert f"{name}: {pipeline.format_value(value)}" in text, (name, key)


def test_demo_help_explains_itself(capsys):
    from minihalo.demo import main as demo
    with pytest.raises(SystemExit):
        demo(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: python -m minihalo.demo ")
    for words in ("tiny preset", "runs/demo", "the same command resumes", "--out FOLDER", "--teacher NAME",
                  "--device DEVICE", "--no-progress"):
        assert words in text, words


@pytest.mark.parametrize("module", ["settings", "pipeline", "halo", "report"])
def test_each_module_imports_first(module):
    """A fresh interpreter imports each of the pipeline's modules on its own (the import system asks
    minihalo.halo for `__path__`, which its name forwarding must not answer by importing the pipeline)."""
    subprocess.run([sys.executable, "-c", f"from minihalo import {module}"], check=True, timeout=120)
