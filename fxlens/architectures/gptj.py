"""GPT-J: interleaved rotary inside attention, one LayerNorm feeding parallel attention and MLP."""

from .table import ArchTable

GPTJ = ArchTable(
    model_types=("gptj",),
    blocks="transformer.h",
    attn="attn",
    mlp="mlp",
    ln1="ln_1",
    ln2=None,
    ln_final="transformer.ln_f",
    embed="transformer.wte",
)
