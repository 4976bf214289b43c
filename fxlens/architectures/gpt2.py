"""GPT-2: Conv1D projections, fused QKV split by ``split``, learned positions."""

from .table import ArchTable

GPT2 = ArchTable(
    model_types=("gpt2",),
    blocks="transformer.h",
    attn="attn",
    mlp="mlp",
    ln1="ln_1",
    ln2="ln_2",
    ln_final="transformer.ln_f",
    embed="transformer.wte",
    pos_embed="transformer.wpe",
)
