"""minihalo: HALO distillation and HypeNet hybrids (arXiv 2601.22156), small and exact."""
from minihalo import halo
from minihalo.convert import from_hf, to_hypenet, tokenizer_in_folder
from minihalo.decoding import Cache
from minihalo.export import export_transformers
from minihalo.model import HybridConfig, HybridLM
from minihalo.ops import lightning_attn, lightning_decay, lightning_step

__all__ = ["HybridConfig", "HybridLM", "Cache", "from_hf", "to_hypenet", "tokenizer_in_folder",
           "export_transformers", "lightning_attn", "lightning_decay", "lightning_step", "halo"]
__version__ = "0.1.0"
