"""Mixture-of-experts: router statistics and an expert-ablation sweep, on a small random Mixtral.

No mixture-of-experts model ships offline in a PyPI package here, so this runs on a 4-layer Mixtral
with random weights: the numbers show what the API gives, not anything about a trained model. With a
real MoE model (`fxlens.Model.from_pretrained("mistralai/Mixtral-8x7B-v0.1")`, OLMoE, Qwen-MoE, ...)
the same code applies unchanged.

    python examples/moe_experts.py
"""

import torch
import transformers as T

import fxlens
from fxlens import metrics, patching


def main():
    torch.manual_seed(0)
    config = T.MixtralConfig(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2,
                             max_position_embeddings=128)
    hf = T.MixtralForCausalLM(config).eval()
    model = fxlens.Model.from_hf(hf)
    c = model.cfg
    print(f"{model}\n{c.num_experts} experts per layer, {c.experts_per_token} per token")

    tokens = torch.randint(0, 512, (8, 24), generator=torch.Generator().manual_seed(1))
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: "expert" in n or n.endswith("mlp_out"))

    print("\nrouter statistics: share of (token, slot) assignments per expert, and mean routing probability")
    for layer in range(c.n_layers):
        chosen = cache["expert_indices", layer].flatten()
        share = torch.bincount(chosen, minlength=c.num_experts).float() / chosen.numel()
        probs = cache["expert_weights", layer].mean((0, 1))
        row = " ".join(f"{s:4.2f}" for s in share.tolist())
        print(f"  layer {layer}: share {row}   max prob {probs.max():.3f} (expert {int(probs.argmax())})")
    out = cache["blocks.3.mlp.hook_expert_out"]  # [batch, pos, expert, d_model]
    print(f"\nexpert outputs {tuple(out.shape)} sum to hook_mlp_out: max difference "
          f"{(out.sum(2) - cache['mlp_out', 3]).abs().max():.1e}")

    # zero-ablate each expert's output in turn (patching in zeros), as one batched sweep
    answer, wrong = 7, 11
    metric = metrics.logit_diff(answer, wrong)
    zeros = {f"blocks.{layer}.mlp.hook_expert_out": torch.zeros_like(cache[f"blocks.{layer}.mlp.hook_expert_out"])
             for layer in range(c.n_layers)}
    base = float(metric(model(tokens)))
    effect = patching.get_act_patch_expert_out_all_pos(model, tokens, zeros, metric) - base
    print(f"\nchange of the logit difference when one expert is ablated at every position (base {base:+.3f}):")
    for layer in range(c.n_layers):
        print(f"  layer {layer}: " + " ".join(f"{v:+.3f}" for v in effect[layer].tolist()))
    layer, expert = divmod(int(effect.abs().argmax()), c.num_experts)
    print(f"largest effect: layer {layer}, expert {expert}")

    # the same ablation as one intervention, checked against the sweep
    ablated = model.run_with_interventions(tokens, [fxlens.Ablate(f"blocks.{layer}.mlp.hook_expert_out", expert=expert)])
    print(f"as an intervention: {float(metric(ablated)) - base:+.3f}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
