"""HypeNet configuration for transformers (written by minihalo.export; needs only transformers).

Every field of minihalo's HybridConfig, under transformers' names where transformers has one:
num_hidden_layers, num_attention_heads, num_key_value_heads, and layer types "full_attention" (softmax
attention) / "linear_attention" (Lightning attention, an RNN).
"""
from transformers import PretrainedConfig

LAYER_TYPES = ("full_attention", "linear_attention")


class HypeNetConfig(PretrainedConfig):
    model_type = "hypenet"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, layer_types=None, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False, max_position_embeddings=32768,
                 qk_norm=True, attn_rope=False, attn_output_gate=True, attn_scale_a=None,
                 lin_rope=True, lin_qk_norm=True, lin_mha=True, lin_output_norm=True, lin_output_gate=True,
                 lin_chunk_size=64, lin_fp32=False, lin_impl="auto", initializer_range=0.02, use_cache=True,
                 **kwargs):
        layer_types = list(layer_types or ["full_attention"] * num_hidden_layers)
        if len(layer_types) != num_hidden_layers or not set(layer_types) <= set(LAYER_TYPES):
            raise ValueError(f"layer_types must list one of {LAYER_TYPES} for each of the {num_hidden_layers} "
                             f"layers; got {layer_types}")
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"num_attention_heads ({num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({num_key_value_heads})")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.layer_types = layer_types
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.attention_bias = attention_bias
        self.max_position_embeddings = max_position_embeddings
        # softmax-attention layers: HyPE's are NoPE (attn_rope False) with the query scale s_t = log_a(t + a)
        self.qk_norm = qk_norm
        self.attn_rope = attn_rope
        self.attn_output_gate = attn_output_gate
        self.attn_scale_a = attn_scale_a
        # Lightning layers
        self.lin_rope = lin_rope
        self.lin_qk_norm = lin_qk_norm
        self.lin_mha = lin_mha
        self.lin_output_norm = lin_output_norm
        self.lin_output_gate = lin_output_gate
        self.lin_chunk_size = lin_chunk_size
        self.lin_fp32 = lin_fp32
        self.lin_impl = lin_impl
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
