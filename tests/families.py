"""Small random-weight models of every family fxlens has a table for (and a few it has not).

``make(family, **dims)`` builds an eval-mode model from an HF config class; ``FAMILIES`` lists the
tabled families, ``UNTABLED`` families with no table (decoder-only and encoder).
"""

from __future__ import annotations

import torch
import transformers as T

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "neox", "gemma", "gemma2", "gemma3", "opt", "phi", "gptj", "bert")
UNTABLED = ("olmo", "starcoder2", "roberta", "electra")
ENCODERS = ("bert", "roberta", "electra")


def make(family: str, *, n_layers: int = 2, d_model: int = 64, n_heads: int = 4, n_kv_heads: int | None = None,
         d_mlp: int = 128, vocab: int = 100, n_ctx: int = 64, seed: int = 0, attn_implementation: str | None = None,
         perturb_norms: bool = True) -> torch.nn.Module:
    """An eval-mode model with random weights; norm weights and biases are perturbed so that they matter."""
    torch.manual_seed(seed)
    d_head = d_model // n_heads
    kv = n_kv_heads or n_heads
    common = dict(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                  intermediate_size=d_mlp, max_position_embeddings=n_ctx)
    builders = {
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_heads, n_inner=d_mlp,
                                                       vocab_size=vocab, n_positions=n_ctx, bos_token_id=1, eos_token_id=2)),
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**common, num_key_value_heads=kv)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**common, num_key_value_heads=kv)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**common, num_key_value_heads=kv)),
        "neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**common, rotary_pct=0.25)),
        "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**common, num_key_value_heads=kv, head_dim=d_head)),
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**common, num_key_value_heads=kv, head_dim=d_head)),
        "gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**common, num_key_value_heads=kv, head_dim=d_head)),
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers,
                                                   num_attention_heads=n_heads, ffn_dim=d_mlp, max_position_embeddings=n_ctx,
                                                   word_embed_proj_dim=d_model)),
        "phi": lambda: T.PhiForCausalLM(T.PhiConfig(**common, partial_rotary_factor=0.5)),
        "gptj": lambda: T.GPTJForCausalLM(T.GPTJConfig(vocab_size=vocab, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
                                                      n_inner=d_mlp, rotary_dim=max(2, d_head // 2), n_positions=n_ctx)),
        "bert": lambda: T.BertForMaskedLM(T.BertConfig(**common)),
        "olmo": lambda: T.OlmoForCausalLM(T.OlmoConfig(**common, num_key_value_heads=kv)),
        "starcoder2": lambda: T.Starcoder2ForCausalLM(T.Starcoder2Config(**common, num_key_value_heads=kv)),
        "roberta": lambda: T.RobertaForMaskedLM(T.RobertaConfig(**common)),
        "electra": lambda: T.ElectraForMaskedLM(T.ElectraConfig(vocab_size=vocab, embedding_size=d_model, hidden_size=d_model,
                                                                num_hidden_layers=n_layers, num_attention_heads=n_heads,
                                                                intermediate_size=d_mlp, max_position_embeddings=n_ctx)),
    }
    model = builders[family]()
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    model.eval()
    if perturb_norms:
        with torch.no_grad():
            for _, p in model.named_parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
    return model


def tokens(batch: int = 2, pos: int = 7, vocab: int = 100, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, pos), generator=g)


def hf_logits(model, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        kwargs = {"input_ids": ids}
        if mask is not None:
            kwargs["attention_mask"] = mask
        return model(**kwargs).logits
