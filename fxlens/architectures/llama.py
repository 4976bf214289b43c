"""Llama and its close relatives (Mistral, Qwen2, SmolLM2): RMSNorm, rotary, grouped-query attention."""

from .table import ArchTable

LLAMA = ArchTable(
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    blocks="model.layers",
    attn="self_attn",
    mlp="mlp",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    ln_final="model.norm",
    embed="model.embed_tokens",
)
