"""Test settings: offline, CPU, Triton through its interpreter (set before any kernel is defined)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
