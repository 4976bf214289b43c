"""BERT: post-LN encoder. As in TransformerLens, resid_mid and resid_post are taken before the norms."""

from .table import ArchTable

BERT = ArchTable(
    model_types=("bert",),
    blocks="bert.encoder.layer",
    attn="attention",
    mlp="",
    ln1="attention.output.LayerNorm",
    ln2="output.LayerNorm",
    ln_final=None,
    embed="bert.embeddings.word_embeddings",
    pos_embed="bert.embeddings.position_embeddings",
    token_type_embed="bert.embeddings.token_type_embeddings",
    post_ln=True,
)
