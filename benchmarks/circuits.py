"""Path patching over every head as sender: fxlens against the textbook hooked algorithm and TransformerLens.

For each model (GPT-2-small shape with random weights; SmolLM2-135M from its GGUF), 1x16 tokens, a
logit-difference metric at the last position, in one process and on the same weights:

  path patching, every head upstream of one receiver (a late head's query, or an induction head's
  key for SmolLM2) as sender (Wang et al.: sender from the corrupted run, other heads frozen, MLPs
  recomputed):
    naive     the textbook algorithm with plain HF forward hooks: per sender, one forward with the
              heads frozen and the sender patched (recording the receiver's input), one forward with
              the receiver patched
    fxlens    circuits.path_patch: all senders as rows of batched programs

  direct path patching from one source head into every later head's query (the edge alone), as
  TransformerLens 4.x does it (get_act_patch_direct_path: one forward per destination), against
  fxlens' circuits.edge_sweep (one row per edge).

The results are checked to agree before the times are compared.

Run: python benchmarks/circuits.py [--models gpt2 smollm2] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import warnings
import logging

import torch

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

from sweep import SEQ, inputs, load, saved_tokenizer, timed  # noqa: E402  (benchmarks/sweep.py)

RECEIVER = {"gpt2": ("q", 9, 6), "llama": ("k", 18, 2)}  # (input, layer, head): SmolLM2's a18.h2<k> feeds induction heads


def _mod(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


class HF:
    """Where the textbook algorithm hooks the HF modules of a family."""

    def __init__(self, hf):
        self.hf = hf
        cfg = hf.config
        self.gpt2 = cfg.model_type == "gpt2"
        self.layers = hf.transformer.h if self.gpt2 else hf.model.layers
        self.n_heads = cfg.n_head if self.gpt2 else cfg.num_attention_heads
        self.d = cfg.n_embd if self.gpt2 else cfg.hidden_size
        self.d_head = self.d // self.n_heads
        self.kv_heads = self.n_heads if self.gpt2 else cfg.num_key_value_heads

    def o_proj(self, layer):
        return self.layers[layer].attn.c_proj if self.gpt2 else self.layers[layer].self_attn.o_proj

    def qkv(self, layer, kind):
        """(module, slice of its output) holding the layer's q, k or v."""
        if self.gpt2:
            i = "qkv".index(kind)
            return self.layers[layer].attn.c_attn, slice(i * self.d, (i + 1) * self.d)
        return getattr(self.layers[layer].self_attn, f"{kind}_proj"), slice(None)


def naive_path_patch(hf, clean, corrupted, senders, receiver, metric):
    """Wang et al.'s algorithm, hook by hook: two forwards per sender."""
    m = HF(hf)
    kind, r_layer, r_head = receiver
    dh = m.d_head
    z = {"clean": {}, "corrupt": {}}
    with torch.inference_mode():
        for name, toks in (("clean", clean), ("corrupt", corrupted)):
            hooks = [m.o_proj(l).register_forward_pre_hook(lambda mod, a, l=l, name=name: z[name].__setitem__(l, a[0].clone())) for l in range(len(m.layers))]
            hf(toks)
            for h in hooks:
                h.remove()
        out = {}
        r_mod, r_slice = m.qkv(r_layer, kind)
        cols = slice(r_head * dh, (r_head + 1) * dh)
        for s_layer, s_head in senders:
            def freeze(mod, args, l):
                new = z["clean"][l].clone()
                if l == s_layer:
                    new[..., s_head * dh : (s_head + 1) * dh] = z["corrupt"][l][..., s_head * dh : (s_head + 1) * dh]
                return (new,)
            recorded = {}
            hooks = [m.o_proj(l).register_forward_pre_hook(lambda mod, a, l=l: freeze(mod, a, l)) for l in range(len(m.layers))]
            hooks.append(r_mod.register_forward_hook(lambda mod, a, o: recorded.__setitem__("x", o[..., r_slice][..., cols].clone())))
            hf(clean)
            for h in hooks:
                h.remove()

            def put(mod, a, o):
                o = o.clone()
                block = o[..., r_slice]
                block[..., cols] = recorded["x"]
                o[..., r_slice] = block
                return o
            hook = r_mod.register_forward_hook(put)
            logits = hf(clean).logits
            hook.remove()
            out[f"a{s_layer}.h{s_head}"] = float(metric(logits))
    return out


def run(name, args):
    import fxlens
    from fxlens import circuits, metrics

    hf, tok, tl_name = load(name)
    model = fxlens.Model.from_hf(hf, tok)
    family = "gpt2" if hf.config.model_type == "gpt2" else "llama"
    kind, r_layer, r_head = RECEIVER[family]
    receiver = f"a{r_layer}.h{r_head}<{kind}>"
    clean, corrupted = inputs(model.cfg.d_vocab, "swap")
    a, b = 1234, 4321
    metric = metrics.logit_diff(a, b)
    senders = [(l, h) for l in range(r_layer) for h in range(model.cfg.n_heads)]
    print(f"\n== {name}: path patching into {receiver} from {len(senders)} sender heads")
    with torch.inference_mode():
        circuits.path_patch(model, clean, corrupted, metric, receivers=[receiver], senders=["a0.h0"])  # builds programs
    fx_res, t_fx = timed(lambda: circuits.path_patch(model, clean, corrupted, metric, receivers=[receiver]), args.repeats)
    nv_res, t_nv = timed(lambda: naive_path_patch(hf, clean, corrupted, senders, (kind, r_layer, r_head), metric), 1)
    diff = max(abs(fx_res[k] - nv_res[k]) for k in nv_res)
    print(f"  naive hooks {t_nv:7.2f} s   fxlens {t_fx:6.2f} s   -> {t_nv / t_fx:5.1f}x faster   (max |diff| {diff:.1e})")
    if "tl" in args.skip:
        return
    # direct path patching from a0.h0 into every later head's query, on the corrupted run
    from transformer_lens import patching as tl_patching
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(tl_name, hf_model=copy.deepcopy(hf), tokenizer=saved_tokenizer(tok))

    def tl_metric(logits):
        return (logits[:, -1, a] - logits[:, -1, b]).mean()

    with torch.inference_mode():
        _, clean_tl = bridge.run_with_cache(clean)
        _, corr_tl = bridge.run_with_cache(corrupted)
        tl_res, t_tl = timed(lambda: tl_patching.get_act_patch_direct_path(bridge, corrupted, clean_tl, corr_tl, tl_metric, 0, 0, "q", verbose=False), 1)
    dests = [(l, h) for l in range(1, model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    sets = [{("a0.h0", f"a{l}.h{h}<q>")} for l, h in dests]
    with torch.inference_mode():
        circuits.edge_sweep(model, corrupted, sets[:1], metric, ablation="corrupted", reference=clean)
    ours, t_ours = timed(lambda: circuits.edge_sweep(model, corrupted, sets, metric, ablation="corrupted", reference=clean), args.repeats)
    theirs = torch.stack([tl_res[l, h] for l, h in dests])
    print(f"  direct path a0.h0 -> every later query ({len(dests)} edges): TransformerLens {t_tl:6.2f} s   fxlens edge_sweep {t_ours:6.2f} s"
          f"   -> {t_tl / t_ours:5.1f}x faster   (max |diff| {(theirs - ours).abs().max():.1e})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2", "smollm2"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), 1x{SEQ} tokens, logit-difference metric at the last position")
    for name in args.models:
        run(name, args)


if __name__ == "__main__":
    main()
