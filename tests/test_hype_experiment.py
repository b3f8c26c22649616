"""The HyPE experiment's plumbing (minihalo.experiments.hype): layouts, the parallel runner, the summary."""
import pytest

from minihalo.experiments import hype

TINY = dict(steps=2, multiples=[1, 2], niah_samples=5, loss_rows=1, a_grid=[4, 16], curve_points=1)


def test_layouts():
    p = hype.PRESETS["gpu"]
    for name in hype.VARIANTS:
        cfg = hype.model_config(p, name)
        assert cfg.num_layers == 8 and cfg.hidden_size == 256  # one size for every model
        attn = [t == "attention" for t in cfg.layer_types]
        assert attn == ([True] * 8 if name == "transformer_rope" else [True, False, False, False] * 2)
    assert (hype.model_config(p, "hype").attn_rope, hype.model_config(p, "hype").lin_rope) == (False, True)
    assert hype.model_config(p, "all_rope").attn_rope and not hype.model_config(p, "all_nope").attn_rope
    assert set(hype.WITH_SCALE) == {v for v in hype.VARIANTS if not hype.model_config(p, v).attn_rope}


def test_run_gives_every_length_and_the_scaled_variant():
    res = hype.run("cpu", ["all_nope"], progress=False, **TINY)
    assert set(res["models"]) == {"all_nope", "all_nope_st"}
    assert set(res["models"]["all_nope"]["niah"]) == {1, 2} and res["models"]["all_nope_st"]["scale_a"] in (4, 16)
    with pytest.raises(ValueError, match="unknown preset entries"):
        hype.run("cpu", ["hype"], progress=False, step=3)


def test_parallel_runs_report_failures_and_keep_the_rest():
    res = hype.run_parallel("cpu", ["hype", "no_such_variant"], [0], changes=TINY)
    assert [r["seed"] for r in res["runs"]] == [0] and list(res["runs"][0]["models"]) == ["hype", "hype_st"]
    assert [f[:2] for f in res["failed"]] == [("no_such_variant", 0)]


def test_summary_over_seeds():
    runs = [{"models": {"hype": {"niah": {"1": 1.0, "64": a}}}} for a in (0.25, 1.0, 1.0)]
    s = hype.summary(runs)["hype"]
    assert s["seeds"] == 3 and s["niah"]["1"] == (1.0, 1.0, 1.0) and s["niah"]["64"] == (0.75, 0.25, 1.0)
