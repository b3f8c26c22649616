"""minihalo: HALO distillation and HypeNet hybrids (arXiv 2601.22156), small and exact."""
from minihalo.convert import from_hf, to_hypenet, tokenizer_in_folder
from minihalo.decoding import Cache
from minihalo.export import export_transformers
from minihalo.model import HybridConfig, HybridLM
from minihalo.ops import lightning_attn, lightning_decay, lightning_step

__all__ = ["HybridConfig", "HybridLM", "Cache", "from_hf", "to_hypenet", "tokenizer_in_folder",
           "export_transformers", "lightning_attn", "lightning_decay", "lightning_step", "halo"]
__version__ = "0.1.0"


def __getattr__(name):
    """minihalo.halo on first use: imported here eagerly, `python -m minihalo.halo` would warn that runpy found
    it already imported."""
    if name == "halo":
        import importlib
        return importlib.import_module("minihalo.halo")
    raise AttributeError(f"module 'minihalo' has no attribute {name!r}")
