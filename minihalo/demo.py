"""The quick-start job: build a tiny random Qwen3 with transformers, load it into minihalo and
check the logits match, convert it to a HypeNet, and generate with mixed KV / recurrent caches.

    python -m minihalo.demo

Runs offline on a CPU in seconds. (The end-to-end HALO pipeline replaces it as the main job.)
"""
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import minihalo


def main():
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=1000, hidden_size=128, intermediate_size=384, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, rope_theta=1e6,
        tie_word_embeddings=True, eos_token_id=None)).eval()
    teacher = minihalo.from_hf(hf).eval()
    ids = torch.randint(0, 1000, (2, 48))
    with torch.no_grad():
        diff = (teacher(ids) - hf(ids).logits).abs().max().item()
    print(f"teacher: transformers Qwen3 with {sum(p.numel() for p in hf.parameters()):,} parameters; "
          f"minihalo logits differ by at most {diff:.1e}")
    assert diff <= 1e-4

    attn_layers = [2, 5]  # keep 2 of 8 layers as softmax attention (HALO would pick them: docs/method.md §4)
    hypenet = minihalo.to_hypenet(teacher, attn_layers, attn_scale_a=500.0).eval()
    print("HypeNet layers:", " ".join("A" if t == "attention" else "L" for t in hypenet.config.layer_types))
    for name, model in (("teacher", teacher), ("hypenet", hypenet)):
        mem = model.cache_bytes(context_len=131072, dtype=torch.bfloat16)
        print(f"{name:8s} decoding memory at 128K tokens (bf16): {mem['total_bytes'] / 2**20:7.1f} MiB "
              f"({mem['kv_bytes_per_token']} B/token KV + {mem['rnn_state_bytes'] / 2**20:.2f} MiB RNN state)")

    prompts = torch.tensor([[0, 0, 0, 11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27, 28]])
    mask = (torch.arange(8) >= torch.tensor([[3], [0]])).long()  # row 0 is left-padded
    out = hypenet.generate(prompts, mask, max_new_tokens=8)
    alone = hypenet.generate(prompts[:1, 3:], max_new_tokens=8)
    print("greedy continuation, padded batch row 0:", out[0, 8:].tolist())
    print("greedy continuation, the prompt alone:  ", alone[0, 5:].tolist())
    assert torch.equal(out[0, 8:], alone[0, 5:])
    print("demo OK")


if __name__ == "__main__":
    main()
