"""A dataset of 64 IOI-style prompt pairs on SmolLM2-135M: fxlens against TransformerLens and nnsight.

Prompts "When Mary and John went to the store, John gave a drink to" (answer " Mary", wrong " John"),
corrupted by replacing the three names with three others (answer and wrong tokens unchanged), in 64
pairs of one token length (as TransformerLens' IOI demo batches them). One resid_pre sweep over the
whole batch with a per-prompt logit difference at the last position, mean over prompts:

  fxlens                ``patching.get_act_patch_resid_pre`` on the batch (and ``reduce="none"``)
  TransformerLens 4.x   its ``patching.get_act_patch_resid_pre`` (TransformerBridge: one hooked forward per cell)
  nnsight               one trace per layer, one invoke per cell, the clean layer input written at the cell

all in one process, results checked to agree. Then fxlens alone on 64 pairs of *different* lengths
(places and objects of varying length), right-padded with masks, against a loop of single-pair sweeps.

Run: python benchmarks/dataset.py [--pairs 64] [--threads 1] [--skip tl nnsight]
"""

from __future__ import annotations

import argparse
import copy
import random

import torch
from sweep import load, saved_tokenizer, timed

NAMES = [" Mary", " John", " Tom", " James", " Anna", " Paul", " Sarah", " David", " Laura", " Mark", " Emma", " Peter"]
PLACES = [" store", " park", " garden", " station", " office", " river", " beach", " school"]
LONG_PLACES = [" old train station", " small coffee shop", " city library", " beach", " park", " new shopping mall"]
OBJECTS = [" drink", " book", " ring", " bag", " key", " letter"]


def prompts(tok, n: int, varied: bool, seed: int = 0):
    rng = random.Random(seed)
    clean, corrupted, answers, wrongs = [], [], [], []
    single = [nm for nm in NAMES if len(tok(nm, add_special_tokens=False)["input_ids"]) == 1]
    while len(clean) < n:
        a, b, c, d, e = rng.sample(single, 5)
        place = rng.choice(LONG_PLACES if varied else PLACES)
        obj = rng.choice(OBJECTS)
        text = f"When{a} and{b} went to the{place},{b} gave a{obj} to"
        other = f"When{c} and{d} went to the{place},{e} gave a{obj} to"
        ids, oth = (torch.tensor(tok(t, add_special_tokens=False)["input_ids"]) for t in (text, other))
        if ids.shape != oth.shape or (not varied and clean and ids.numel() != clean[0].numel()):
            continue
        clean.append(ids)
        corrupted.append(oth)
        answers.append(tok(a, add_special_tokens=False)["input_ids"][0])
        wrongs.append(tok(b, add_special_tokens=False)["input_ids"][0])
    return clean, corrupted, torch.tensor(answers), torch.tensor(wrongs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each fxlens variant (the best is kept)")
    parser.add_argument("--skip", nargs="*", default=[], help="competitors to skip: tl nnsight")
    parser.add_argument("--stream-budget", type=float, default=None,
                        help="also run the sweep with this memory_budget (GiB), small enough to stream chunks of pairs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import fxlens
    from fxlens import metrics, patching

    hf, tok, tl_name = load("smollm2")
    model = fxlens.Model.from_hf(hf, tok)
    clean, corrupted, answers, wrongs = prompts(tok, args.pairs, varied=False)
    clean_b, corrupted_b = torch.stack(clean), torch.stack(corrupted)
    n, seq = clean_b.shape
    rows = torch.arange(n)
    print(f"torch {torch.__version__}, {args.threads} thread(s); SmolLM2-135M, {n} IOI pairs of {seq} tokens, "
          f"resid_pre sweep ({model.cfg.n_layers} x {seq} cells), logit difference at the last position")

    def plain(logits):
        return (logits[rows, -1, answers] - logits[rows, -1, wrongs]).mean()

    declared = metrics.logit_diff(answers, wrongs)
    with torch.inference_mode():
        _, cache = model.run_with_cache(clean_b)
        patching.get_act_patch_resid_pre(model, corrupted_b, cache, declared)
        ours, t_ours = timed(lambda: patching.get_act_patch_resid_pre(model, corrupted_b, cache, declared), args.repeats)
        each, t_each = timed(lambda: patching.get_act_patch_resid_pre(model, corrupted_b, cache, declared, reduce="none"),
                             args.repeats)
        lam, t_lam = timed(lambda: patching.get_act_patch_resid_pre(model, corrupted_b, cache, plain), args.repeats)
    print(f"fxlens             {t_ours:7.2f} s   (reduce='none': {t_each:.2f} s, same mean: "
          f"{(each.mean(0) - ours).abs().max().item():.1e}; plain lambda {t_lam:.2f} s)")
    if args.stream_budget:
        with torch.inference_mode():
            streamed, t_stream = timed(lambda: patching.get_act_patch_resid_pre(model, corrupted_b, cache, declared, reduce="none",
                                                                               memory_budget=args.stream_budget), 1)
        print(f"fxlens streamed    {t_stream:7.2f} s   (memory_budget={args.stream_budget} GiB: "
              f"{model.last_sweep_stats.get('prompt_chunks', 1)} chunks of pairs; max |diff| to one batch "
              f"{(streamed - each).abs().max().item():.1e})")

    if "tl" not in args.skip:
        from transformer_lens import patching as tl_patching
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(tl_name, hf_model=copy.deepcopy(hf), tokenizer=saved_tokenizer(tok))
        with torch.inference_mode():
            _, tl_cache = bridge.run_with_cache(clean_b)
            tl_res, t_tl = timed(lambda: tl_patching.get_act_patch_resid_pre(bridge, corrupted_b, tl_cache, plain), 1)
        print(f"TransformerLens    {t_tl:7.2f} s   -> fxlens is {t_tl / t_ours:5.1f}x faster "
              f"(max |diff| {(tl_res.float() - ours).abs().max().item():.1e})")
    if "nnsight" not in args.skip:
        from nnsight import LanguageModel

        lm = LanguageModel(copy.deepcopy(hf), tokenizer=saved_tokenizer(tok))
        with torch.inference_mode():
            hidden = hf(clean_b, output_hidden_states=True).hidden_states

        def nn_sweep():
            # one batched trace per layer (one invoke per position): a single trace of every cell would
            # hold n_layers * seq * pairs rows at once (26880 rows of 14 tokens at 64 pairs)
            results = []
            for layer in range(model.cfg.n_layers):
                with lm.trace() as tracer:
                    for pos in range(seq):
                        with tracer.invoke(corrupted_b):
                            lm.model.layers[layer].input[:, pos] = hidden[layer][:, pos]
                            logits = lm.lm_head.output
                            results.append(plain(logits).save())
            return torch.tensor([float(r) for r in results]).view(model.cfg.n_layers, seq)

        with torch.inference_mode():
            nn_res, t_nn = timed(nn_sweep, 1)
        print(f"nnsight batched    {t_nn:7.2f} s   -> fxlens is {t_nn / t_ours:5.1f}x faster "
              f"(max |diff| {(nn_res - ours).abs().max().item():.1e})")

    # pairs of different lengths: one padded sweep against a loop of single-pair sweeps
    clean_v, corrupted_v, ans_v, wrong_v = prompts(tok, args.pairs, varied=True, seed=1)
    lengths = sorted({c.numel() for c in clean_v})
    with torch.inference_mode():
        _, cache_v = model.run_with_cache(clean_v)
        mask = model._inputs(clean_v)["attention_mask"].cpu()
        metric_v = metrics.logit_diff(ans_v, wrong_v, pos=mask.sum(1) - 1)
        patching.get_act_patch_resid_pre(model, corrupted_v, cache_v, metric_v, reduce="none")
        got, t_v = timed(lambda: patching.get_act_patch_resid_pre(model, corrupted_v, cache_v, metric_v, reduce="none"), 3)

        def loop():
            out = []
            for c, x, a, b in zip(clean_v, corrupted_v, ans_v, wrong_v):
                _, cc = model.run_with_cache(c[None])
                out.append(patching.get_act_patch_resid_pre(model, x[None], cc, metrics.logit_diff(int(a), int(b))))
            return out

        singles, t_loop = timed(loop, 1)
    diff = max((got[j][:, : s.shape[1]] - s).abs().max().item() for j, s in enumerate(singles))
    print(f"\n{len(clean_v)} pairs of {lengths[0]}-{lengths[-1]} tokens, right-padded, reduce='none': fxlens {t_v:.2f} s; "
          f"a loop of single-pair sweeps {t_loop:.2f} s ({t_loop / t_v:.1f}x); max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
