"""GPT-NeoX (Pythia): fused QKV chunked per head, partial rotary, parallel attention and MLP."""

from .table import ArchTable

NEOX = ArchTable(
    model_types=("gpt_neox",),
    blocks="gpt_neox.layers",
    attn="attention",
    mlp="mlp",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    ln_final="gpt_neox.final_layer_norm",
    embed="gpt_neox.embed_in",
)
