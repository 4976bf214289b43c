"""Phi (1, 1.5, 2): one LayerNorm feeding parallel attention and MLP, partial rotary."""

from .table import ArchTable

PHI = ArchTable(
    model_types=("phi",),
    blocks="model.layers",
    attn="self_attn",
    mlp="mlp",
    ln1="input_layernorm",
    ln2=None,
    ln_final="model.final_layernorm",
    embed="model.embed_tokens",
)
