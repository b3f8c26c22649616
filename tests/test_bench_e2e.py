"""The end-to-end benchmark's shapes and its flow on CPU (the timings themselves need a GPU)."""
import json

import torch

from minihalo.bench_e2e import SHAPES, build_models, main
from minihalo.halo import evenly_spaced_layers


def test_smollm2_shape_is_the_real_models():
    """--shape smollm2-135m builds transformers' Llama with SmolLM2-135M-Instruct's parameter count (134,515,008,
    as the real checkpoint loaded in notebook 09 has) and a HypeNet with 7 evenly spaced attention layers."""
    config_class, shape, layers = SHAPES["smollm2-135m"]
    assert layers == evenly_spaced_layers(30, 7)
    models = build_models(config_class, shape, layers, "cpu", torch.float32)
    assert type(models["hf"]).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in models["hf"].parameters()) == 134_515_008
    assert [i for i, t in enumerate(models["hypenet"].config.layer_types) if t == "attention"] == layers


def test_smoke_runs_each_shapes_architecture(tmp_path):
    """--smoke takes a tiny model of --shape's architecture through every check and timing on CPU."""
    for name in SHAPES:
        out = tmp_path / f"{name}.json"
        main(["--smoke", "--shape", name, "--out", str(out)])
        res = json.loads(out.read_text())
        assert res["shape_name"] == name and res["checks"]["passed"], res["checks"]
        assert res["checks"]["transformer_vs_hf_logits"] < 1e-5
        assert {r["model"] for r in res["rows"]} == {"hypenet", "transformer", "hf"}
