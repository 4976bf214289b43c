"""Gemma 1, 2 and 3: scaled embeddings, (1 + w) RMSNorm; 2 and 3 add norms after each branch."""

from .table import ArchTable

GEMMA = ArchTable(
    model_types=("gemma",),
    blocks="model.layers",
    attn="self_attn",
    mlp="mlp",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    ln_final="model.norm",
    embed="model.embed_tokens",
)

GEMMA2 = ArchTable(
    model_types=("gemma2", "gemma3_text", "gemma3"),
    blocks="model.layers",
    attn="self_attn",
    mlp="mlp",
    ln1="input_layernorm",
    ln2="pre_feedforward_layernorm",
    ln_final="model.norm",
    embed="model.embed_tokens",
    ln1_post="post_attention_layernorm",
    ln2_post="post_feedforward_layernorm",
)
