"""OPT: learned positions offset by two, the MLP's linears live directly in the decoder layer."""

from .table import ArchTable

OPT = ArchTable(
    model_types=("opt",),
    blocks="model.decoder.layers",
    attn="self_attn",
    mlp="",
    ln1="self_attn_layer_norm",
    ln2="final_layer_norm",
    ln_final="model.decoder.final_layer_norm",
    embed="model.decoder.embed_tokens",
    pos_embed="model.decoder.embed_positions",
)
