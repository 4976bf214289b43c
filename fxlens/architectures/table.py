"""The shape of an architecture table: HF module paths a family is known to use.

Problem: the site finder in ``graphs/`` derives every site from the dataflow, for any family. What it
cannot derive is naming convention (which embedding is positional) and what TransformerLens chose
for unusual families (BERT's ``resid_post`` before its post-norm). A table states those facts, and
lets the test suite check, family by family, that the dataflow analysis found the modules the table
names.

Example::

    ArchTable(model_types=("gpt2",), blocks="transformer.h", attn="attn", mlp="mlp",
              ln1="ln_1", ln2="ln_2", ln_final="transformer.ln_f",
              embed="transformer.wte", pos_embed="transformer.wpe")
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["ArchTable"]


@dataclass(frozen=True)
class ArchTable:
    model_types: tuple  # HF ``config.model_type`` values this table covers
    blocks: str  # module list of the blocks
    attn: str  # attention module, relative to a block
    mlp: str  # MLP module relative to a block ("" when the block itself holds the MLP, as in OPT)
    ln1: str | None  # norm modules, relative to a block
    ln2: str | None
    ln_final: str | None  # absolute path
    embed: str  # token embedding module (absolute)
    pos_embed: str | None = None  # learned positional embedding module (absolute)
    token_type_embed: str | None = None
    ln1_post: str | None = None  # norms applied to a branch output before the residual add (Gemma 2/3)
    ln2_post: str | None = None
    post_ln: bool = False  # norms after the residual add (BERT): resid_post is taken before ln2

    def for_blocks_at(self, found: str) -> "ArchTable":
        """This table for a model whose blocks sit at ``found``: the base model of a head class
        (``LlamaModel``'s ``layers`` for ``model.layers``) has every absolute path without the prefix."""
        if found == self.blocks or not self.blocks.endswith("." + found):
            return self
        prefix = self.blocks[: -len(found)]

        def strip(path):
            return path[len(prefix):] if path and path.startswith(prefix) else path

        return replace(self, blocks=found, ln_final=strip(self.ln_final), embed=strip(self.embed),
                       pos_embed=strip(self.pos_embed), token_type_embed=strip(self.token_type_embed))
