"""A GPT-2-architecture model with hand-set weights whose induction circuit is known exactly.

Residual stream (72 dims) in four one-hot subspaces: TOK (the token), POS (the position), PREV (the
previous token, written by a0.h0) and OUT (the predicted token, written by a1.h0), plus BIAS, a large
constant that dominates every LayerNorm's scale. LayerNorm weights are 1 and all inputs have the same
spike magnitudes, so every LayerNorm is (nearly) the same affine map, and attention is sharp enough to
be right but soft enough to have gradients, so first-order methods (EAP) see the circuit.

- a0.h0, a previous-token head: query and key read POS (query at i matches key at i-1), value reads
  TOK, output writes PREV.
- a1.h0, an induction head: query reads TOK, key reads PREV (K-composition with a0.h0), value reads
  TOK, output writes OUT.
- a0.h1, a1.h1 and both MLPs are zero. The unembedding reads OUT only.

On [r_1..r_n, r_1..r_n] it predicts r_{i+1} at every position of the second copy. Against a corrupted
input with the same positions and other tokens, the edges that carry the difference are
input->a0.h0<v>, input->a1.h0<q>, a0.h0->a1.h0<k>, input->a1.h0<v> and a1.h0->logits; the
previous-token head's query and key (input->a0.h0<q|k>) read positions only, which the corrupted
input shares, so they carry none (they matter under zero ablation).
"""

from __future__ import annotations

import torch
import transformers

VOCAB, CTX, D = 16, 16, 72
TOK, POS, PREV, OUT, BIAS = 0, 16, 32, 48, 64
D_HEAD = 36

TRUE_CIRCUIT = (
    "input->a0.h0<v>",
    "input->a1.h0<q>",
    "a0.h0->a1.h0<k>",
    "input->a1.h0<v>",
    "a1.h0->logits",
)
POSITIONAL = ("input->a0.h0<q>", "input->a0.h0<k>")


def induction_model(sharpness: float = 9.0, bias: float = 12.0) -> transformers.GPT2LMHeadModel:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=CTX, n_embd=D, n_layer=2, n_head=2, n_inner=4 * D,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.fill_(1.0)
        t = model.transformer
        t.wte.weight[:, :] = 0
        t.wte.weight[torch.arange(VOCAB), TOK + torch.arange(VOCAB)] = 1.0
        t.wpe.weight[torch.arange(CTX), POS + torch.arange(CTX)] = 1.0
        t.wpe.weight[:, BIAS] = bias
        s = sharpness
        # a0.h0: previous-token head (Conv1D weights are [in, out]; q, k, v blocks of 64 columns)
        attn0 = t.h[0].attn
        for p in range(CTX):
            attn0.c_attn.weight[POS + p, 0 + p] = s  # q: position p -> f_p
            if p + 1 < D_HEAD and p + 1 < CTX:
                attn0.c_attn.weight[POS + p, D + p + 1] = s  # k: position p -> f_{p+1}
        for v in range(VOCAB):
            attn0.c_attn.weight[TOK + v, 2 * D + v] = 1.0  # v: token -> g_t
            attn0.c_proj.weight[v, PREV + v] = 1.0  # o: g_t -> PREV_t
        # a1.h0: induction head
        attn1 = t.h[1].attn
        for v in range(VOCAB):
            attn1.c_attn.weight[TOK + v, 0 + v] = s  # q: current token
            attn1.c_attn.weight[PREV + v, D + v] = s  # k: previous token (written by a0.h0)
            attn1.c_attn.weight[TOK + v, 2 * D + v] = 1.0  # v: token
            attn1.c_proj.weight[v, OUT + v] = 1.0  # o: token -> OUT
        model.lm_head.weight[torch.arange(VOCAB), OUT + torch.arange(VOCAB)] = 10.0
    return model.eval()


def repeated_tokens(batch: int, half: int = CTX // 2, seed: int = 0) -> torch.Tensor:
    """[batch, 2 * half]: a random sequence of distinct tokens, twice."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(VOCAB, generator=g)[:half] for _ in range(batch)]
    first = torch.stack(rows)
    return torch.cat([first, first], dim=1)


def induction_metric(tokens: torch.Tensor):
    """Mean log-probability of the correct next token over the second copy (a scalar)."""
    half = tokens.shape[1] // 2

    def metric(logits):
        logp = logits[:, half:-1].log_softmax(-1)
        target = tokens[:, half + 1 :]
        return logp.gather(-1, target[..., None]).mean()

    return metric
