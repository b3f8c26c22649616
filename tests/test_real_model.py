"""A real pretrained checkpoint: SmolLM2-135M-Instruct (Llama architecture, GQA 9/3 heads, real
BPE tokenizer), through the `smollm2` fixture of conftest.py (skipped where it is not installed)."""
import pydoc_data.topics

import torch

import minihalo


def test_real_checkpoint_logits_perplexity_and_generation(smollm2):
    hf, tok = smollm2
    model = minihalo.from_hf(hf).eval()
    text = pydoc_data.topics.topics["if"] + pydoc_data.topics.topics["while"]
    ids = tok(text, return_tensors="pt").input_ids[:, :300]
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max() <= 1e-4
    ppl = torch.nn.functional.cross_entropy(ours[0, :-1], ids[0, 1:]).exp().item()
    assert 5 < ppl < 40, ppl  # a trained model on English; a random one scores ~49k
    # a left-padded batch of real prompts: each row's greedy tokens are transformers' for that prompt
    tok.padding_side = "left"
    prompts = ["The capital of France is", "def fibonacci(n):\n   "]
    batch = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(batch.input_ids, batch.attention_mask, max_new_tokens=8)
    for i, p in enumerate(prompts):
        single = tok(p, return_tensors="pt").input_ids
        ref = hf.generate(single, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id or 0)
        assert torch.equal(out[i, batch.input_ids.shape[1]:], ref[0, single.shape[1]:]), i
