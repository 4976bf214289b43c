"""Every text model family of the installed transformers, as a tiny random-weight model.

What it is: the model types of transformers' auto mappings for causal LMs, masked LMs and
sequence-to-sequence LMs (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, ``MODEL_FOR_MASKED_LM_MAPPING_NAMES``,
``MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES``), less those that are not text models (``SKIPPED``,
each with its reason), each built from its config class at a tiny size: 2 layers, d_model 64, 4 heads
(2 KV heads where the config has a KV-head count), d_head 16, d_mlp 128, vocabulary 128, 64 positions,
4 experts with top-2 routing. The config is set generically, by the names of its attributes
(``num_hidden_layers`` / ``n_layer`` / ``num_layers`` ..., ``hidden_size`` / ``d_model`` / ``n_embd`` ...),
and ``OVERRIDES`` holds the per-family exceptions. Weights are random (seeded); 1-D parameters (norm
weights, biases) are perturbed so that where a norm or bias sits matters, as in tests/families.py.

Example::

    from all_families import FAMILIES, build, BuildError
    for family in FAMILIES:
        try:
            hf = build(family)          # eval mode, built once per process
        except BuildError as err:       # "cannot build": our problem, not fxlens'
            print(family, err)

Which head class: the sequence-to-sequence class for an encoder-decoder, else the masked-LM class when
the family has one (encoders that also list a causal-LM head are used as encoders), else the causal-LM
class. A family whose causal-LM class is the text model of a multimodal config is built from that
text config (``Llama4ForCausalLM`` takes a ``Llama4TextConfig``); when another listed family already
builds that same class from that same config, the multimodal one is skipped as a duplicate.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch
import transformers as T
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

LAYERS, D_MODEL, HEADS, KV_HEADS, D_HEAD, D_MLP, VOCAB, N_CTX = 2, 64, 4, 2, 16, 128, 128, 64
EXPERTS, TOP_K, D_EXPERT = 4, 2, 32
SEED = 0

CAUSAL = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
MASKED = modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
SEQ2SEQ = modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

AUDIO = "an audio model (its inputs are audio features or audio codes, not text tokens)"
VISION = "a vision-language model (needs images; its text model is not listed on its own)"
SKIPPED = {
    # speech recognition and audio LMs: a text decoder fed by an audio encoder
    "audioflamingo3": AUDIO, "glmasr": AUDIO, "granite_speech": AUDIO, "granite_speech_plus": AUDIO,
    "moss_transcribe_diarize": AUDIO, "musicflamingo": AUDIO, "nemo_speechlm": AUDIO, "omniasr": AUDIO,
    "qwen2_audio": AUDIO, "qwen3_asr": AUDIO, "vibevoice_asr": AUDIO, "voxtral": AUDIO, "voxtral_realtime": AUDIO,
    "moshi": AUDIO + ": a speech-text foundation model whose decoder reads audio codebooks",
    "musicgen": AUDIO + ": the decoder predicts audio codebooks, input_ids are [batch * codebooks, seq]",
    "musicgen_melody": AUDIO + ": the decoder predicts audio codebooks, input_ids are [batch * codebooks, seq]",
    # image + text
    "fuyu": VISION, "git": VISION, "got_ocr2": VISION, "modernvbert": VISION, "ultravbert": VISION,
    "neomme": VISION + " (its masked-LM class takes pixel_values)",
    "t5gemma2": VISION + " (T5Gemma2's encoder takes images; text-only T5Gemma is covered as t5gemma)",
    "phi4_multimodal": "a vision + audio + text model: Phi4MultimodalForCausalLM builds its image and audio embedders",
    "gemma4_assistant": "a drafting head for speculative decoding: it reads the target Gemma-4 model's hidden states",
    "gemma4_unified_assistant": "a drafting head for speculative decoding: it reads the target model's hidden states",
}


def _class_name(names) -> str:
    return names if isinstance(names, str) else names[0]


def head_class(family: str) -> tuple[str, str]:
    """(mapping kind, class name) of the head class used for ``family``."""
    if family in SEQ2SEQ:
        return "seq2seq", _class_name(SEQ2SEQ[family])
    if family in MASKED and "ConditionalGeneration" not in _class_name(MASKED[family]):
        return "masked", _class_name(MASKED[family])
    if family in CAUSAL:
        return "causal", _class_name(CAUSAL[family])
    return "masked", _class_name(MASKED[family])


def _config_class(family: str):
    """The family's own config class, or the text config its head class takes when the family's is multimodal."""
    cls = getattr(T, head_class(family)[1])
    own = getattr(T, CONFIG_MAPPING_NAMES[family])
    takes = getattr(cls, "config_class", None) or own
    # LlamaForCausalLM serves exaone / internlm3 / iquestcoder with their own configs; Llama4ForCausalLM takes
    # Llama4TextConfig where llama4's own config is multimodal (a text_config beside a vision_config)
    multimodal = "text_config" in (getattr(own, "sub_configs", None) or {})
    return takes if multimodal and takes is not own else own


def _config_class_safe(family):
    try:
        return _config_class(family)
    except Exception:  # noqa: BLE001 - a missing class is reported when the family is built
        return None


def _duplicates() -> dict:
    """Families whose head class and config class another listed family builds as its own.

    ``llama4`` (multimodal) builds ``Llama4ForCausalLM`` on ``Llama4TextConfig``, which is ``llama4_text``'s
    own config; ``gpt-sw3`` is ``GPT2LMHeadModel`` on ``GPT2Config``, which is ``gpt2``.
    """
    everything = sorted(set(CAUSAL) | set(MASKED) | set(SEQ2SEQ))
    owner = {}
    for f in everything:
        cfg = _config_class_safe(f)
        if f not in SKIPPED and cfg is not None and cfg is getattr(T, CONFIG_MAPPING_NAMES[f], None):
            key = (head_class(f)[1], cfg)
            # the family the config is named for owns it (GPT2Config: gpt2, not gpt-sw3)
            if key not in owner or getattr(cfg, "model_type", None) == f:
                owner[key] = f
    dup = {}
    for f in everything:
        key = (head_class(f)[1], _config_class_safe(f))
        if f not in SKIPPED and key in owner and owner[key] != f:
            multimodal = key[1] is not getattr(T, CONFIG_MAPPING_NAMES[f], None)
            why = "the text model of a multimodal config" if multimodal else "the same model"
            dup[f] = f"{why}: {key[0]} on {key[1].__name__} is covered as {owner[key]}"
    return dup


def _multimodal_inputs() -> dict:
    """Families whose head class takes images or audio (pixel_values, input_features, input_values)."""
    out = {}
    for f in sorted(set(CAUSAL) | set(MASKED) | set(SEQ2SEQ)):
        if f in SKIPPED:
            continue
        try:
            params = inspect.signature(getattr(T, head_class(f)[1]).forward).parameters
        except (AttributeError, TypeError, ValueError):
            continue
        takes = [p for p in ("pixel_values", "input_features", "input_values") if p in params]
        if takes:
            text = [g for g in (f"{f}_text",) if g in CAUSAL]
            also = f"; its text model is covered as {text[0]}" if text else ""
            out[f] = f"a multimodal model: {head_class(f)[1]} takes {', '.join(takes)}{also}"
    return out


SKIPPED.update(_multimodal_inputs())
SKIPPED.update(_duplicates())
FAMILIES = tuple(f for f in sorted(set(CAUSAL) | set(MASKED) | set(SEQ2SEQ)) if f not in SKIPPED)


# ---- the generic tiny config ---------------------------------------------------------------------

GENERIC = {
    **dict.fromkeys(("num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_decoder_layers", "encoder_layers",
                     "decoder_layers", "num_encoder_layers"), LAYERS),
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embed_dim", "embedding_size", "word_embed_proj_dim",
                     "emb_dim", "hidden_size_global"), D_MODEL),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
                     "decoder_attention_heads", "num_attention_heads_decoder"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num",
                     "num_key_value_groups"), KV_HEADS),
    **dict.fromkeys(("head_dim", "d_kv", "kv_channels", "attention_head_dim", "dim_head", "attention_head_size",
                     "swa_head_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_head_dim"), D_HEAD),
    **dict.fromkeys(("swa_num_attention_heads", "linear_num_key_heads", "linear_num_value_heads", "linear_num_heads"), HEADS),
    **dict.fromkeys(("swa_num_key_value_heads",), KV_HEADS),
    **dict.fromkeys(("vocab_size_per_layer_input",), VOCAB),
    **dict.fromkeys(("hidden_size_per_layer_input", "laurel_rank", "entity_emb_size", "pronunciation_embed_dim",
                     "shape_embed_dim", "loop_gate_rank", "router_hidden_size", "adapter_rank"), 16),
    **dict.fromkeys(("encoder_hash_byte_group_vocab", "entity_vocab_size", "pronunciation_vocab_size", "shape_vocab_size", "position_bias_num_buckets"), 32),
    **dict.fromkeys(("position_bias_max_distance", "rel_extent", "sliding_window_size"), N_CTX),
    **dict.fromkeys(("intermediate_size", "n_inner", "ffn_dim", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim",
                     "ffn_hidden_size", "d_inner", "dff", "dim_ff", "feed_forward_size", "intermediate_size_mlp"), D_MLP),
    **dict.fromkeys(("vocab_size", "unpadded_vocab_size"), VOCAB),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length",
                     "seq_length"), N_CTX),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
                     "n_experts"), EXPERTS),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "moe_k",
                     "num_experts_per_token", "moe_top_k", "top_k_experts"), TOP_K),
    **dict.fromkeys(("moe_intermediate_size", "expert_intermediate_size", "moe_ffn_hidden_size", "expert_ffn_hidden_size"), D_EXPERT),
    **dict.fromkeys(("shared_expert_intermediate_size", "shared_intermediate_size"), D_EXPERT),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), 1),
    **dict.fromkeys(("n_group", "topk_group"), 1),
    **dict.fromkeys(("first_k_dense_replace", "num_dense_layers"), 1),
    "zero_expert_num": 2,
    # multi-head latent attention (DeepSeek-V2/V3 and their descendants)
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": D_HEAD,
    # state-space layers
    **dict.fromkeys(("state_size", "mamba_d_state", "ssm_state_size", "d_state"), 8),
    **dict.fromkeys(("mamba_n_heads", "mamba_num_heads"), 8),
    **dict.fromkeys(("mamba_d_head", "mamba_head_dim"), 16),
    **dict.fromkeys(("mamba_n_groups",), 1),
    "chunk_size": 8,
    "dt_rank": 8, "mamba_dt_rank": 8, "time_step_rank": 8,
    # sizes that default to thousands of entries
    "type_vocab_size": 2,
    "rotary_dim": D_HEAD // 2,
    "use_cache": False,
}


def _fields(cfg_cls, default) -> set:
    names = set(default.to_dict())
    try:
        names |= set(inspect.signature(cfg_cls.__init__).parameters)
    except (TypeError, ValueError):
        pass
    return names


LAYER_COUNTS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_decoder_layers", "encoder_layers",
                "decoder_layers", "num_encoder_layers")


def _per_layer(default: dict) -> tuple[int, dict]:
    """(layers, {name: list}): the default's per-layer lists cut down to a few layers that keep every kind.

    A hybrid's ``layer_types`` (``["linear_attention"] * 3 + ["full_attention"]`` ...) and an MoE's
    ``mlp_layer_types`` (``["dense", "sparse", ...]``) keep the first layer of each kind, in order, so that a
    2-layer model still has attention and a sparse MLP; more kinds than 2 keep more layers.
    """
    n = next((default[k] for k in LAYER_COUNTS if isinstance(default.get(k), int)), None)
    lists = {k: v for k, v in default.items() if isinstance(v, list) and n and len(v) == n and n > LAYERS
             and len({repr(x) for x in v}) <= 4}  # kinds, not layer indices (Llama-4's moe_layers is left to the class)
    if not lists:
        return LAYERS, {}
    chosen: list[int] = []
    for values in lists.values():
        for i, v in enumerate(values):
            if not any(repr(values[j]) == repr(v) for j in chosen):
                chosen.append(i)
    rest = (i for i in range(n or 0) if i not in chosen)
    while len(chosen) < LAYERS and n:
        chosen.append(next(rest))
    chosen.sort()
    return max(LAYERS, len(chosen)), {k: [v[i] for i in chosen] for k, v in lists.items()}


def tiny_kwargs(cfg_cls, extra: dict | None = None) -> dict:
    """The generic tiny settings that ``cfg_cls`` has, token ids kept inside the vocabulary, then ``extra``."""
    default = cfg_cls()
    d = default.to_dict()
    names = _fields(cfg_cls, default)
    kwargs = {k: v for k, v in GENERIC.items() if k in names}
    layers, lists = _per_layer(d)
    kwargs.update({k: v for k, v in lists.items() if k not in kwargs})
    for k in LAYER_COUNTS:
        if k in kwargs:
            kwargs[k] = layers
    for k, v in d.items():  # {"05": {...}, "11": {...}}: per-layer settings of layers that are no more
        if isinstance(v, dict) and v and all(isinstance(x, str) and x.isdigit() for x in v):
            kwargs[k] = {}
    vocab = (extra or {}).get("vocab_size", kwargs.get("vocab_size", VOCAB))
    for k, v in d.items():
        if k.endswith("token_id") and isinstance(v, int) and v >= vocab:
            kwargs[k] = vocab - 1
        elif k.endswith("token_id") and isinstance(v, list) and any(isinstance(x, int) and x >= vocab for x in v):
            kwargs[k] = [min(x, vocab - 1) for x in v]
    if "kv_lora_rank" in kwargs:  # multi-head latent attention: head_dim is the rotary part's width, no KV groups
        if "num_key_value_heads" in kwargs:
            kwargs["num_key_value_heads"] = HEADS
        for k in ("head_dim",):
            if k in kwargs:
                kwargs[k] = kwargs["qk_rope_head_dim"]
        if "qk_head_dim" in names:
            kwargs["qk_head_dim"] = kwargs["qk_rope_head_dim"] + kwargs["qk_nope_head_dim"]
    for k, sub in (getattr(cfg_cls, "sub_configs", None) or {}).items():  # T5Gemma's encoder and decoder, BLT's parts
        if k not in (extra or {}) and isinstance(sub, type) and sub is not T.AutoConfig:
            kwargs[k] = tiny_kwargs(sub)
    kwargs.update(extra or {})
    return {k: v for k, v in kwargs.items() if v is not DROP}


# family -> extra config kwargs (over the generic ones), or a function () -> config
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
DROP = object()  # an override value: leave the setting to the config class
OVERRIDES: dict = {
    # hybrids: one layer of each kind (the defaults put attention at layer 4 or later)
    "bamba": dict(attn_layer_indices=[1]),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=0, expert_layer_period=2, expert_layer_offset=1),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], lru_width=D_MODEL),
    "cohere_compass_text": dict(rope_parameters={"full_attention": ROPE, "sliding_attention": ROPE}),
    "dbrx": dict(attn_config=dict(kv_n_heads=KV_HEADS, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(hidden_size=D_MODEL, ffn_hidden_size=D_EXPERT, moe_num_experts=EXPERTS, moe_top_k=TOP_K)),
    "distilbert": dict(dim=D_MODEL, hidden_dim=D_MLP),
    "dory": dict(layer_types=DROP, num_hidden_layers=3, n_input_layers=1, n_output_layers=1),
    "dots3_note_text": dict(per_layer_config=DROP, layer_types=DROP, swa_num_attention_heads=HEADS, swa_num_key_value_heads=HEADS,
                            swa_q_lora_rank=32, swa_kv_lora_rank=16, swa_head_dim=16, swa_qk_nope_head_dim=8,
                            swa_v_head_dim=D_HEAD, index_head_dim=D_HEAD, index_n_heads=HEADS, index_topk=4),
    "esm": dict(pad_token_id=1, mask_token_id=2),
    "esmc": dict(num_key_value_heads=HEADS),
    "falcon_h1": dict(mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16, mamba_chunk_size=8),
    "fsmt": dict(src_vocab_size=VOCAB, tgt_vocab_size=VOCAB),
    "gemma3n_text": dict(num_kv_shared_layers=0, altup_num_inputs=2),
    "mamba2": dict(num_heads=8, head_dim=16, n_groups=1, expand=2),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "perceiver": dict(num_latents=16, d_latents=D_MODEL, num_self_attends_per_block=LAYERS, num_self_attention_heads=HEADS,
                      num_cross_attention_heads=HEADS),
    "reformer": dict(axial_pos_shape=[8, 8], axial_pos_embds_dim=[16, 48], attention_head_size=D_HEAD,
                     feed_forward_size=D_MLP),
    "qwen4_exp_text": dict(indexer_n_heads=HEADS, indexer_kv_heads=1, indexer_head_dim=D_HEAD, indexer_budget=4,
                           indexer_compress_ratio=2, hc_lowrank=16, ple_embed_dim=16),
    "encoder-decoder": lambda: T.EncoderDecoderConfig.from_encoder_decoder_configs(
        T.BertConfig(**tiny_kwargs(T.BertConfig)),
        T.BertConfig(**tiny_kwargs(T.BertConfig, dict(is_decoder=True, add_cross_attention=True))),
        decoder_start_token_id=1, pad_token_id=0),
    "xmod": dict(default_language="en_XX"),
    "zamba": dict(num_hidden_layers=3, layers_block_type=["linear_attention", "hybrid", "hybrid"],
                  attention_head_dim=DROP),
    "zamba2": dict(n_mamba_heads=8, attention_head_dim=DROP, kv_channels=DROP, layers_block_type=["linear_attention", "hybrid"], mamba_ngroups=1),
    "zaya": dict(num_experts_per_tok=1),
}


MAX_PARAMS = 2_000_000  # a tiny config has ~0.1M; millions mean a size the generic settings missed


class BuildError(RuntimeError):
    """The tiny model could not be built or does not run a plain HF forward: a gap in this file, not in fxlens."""


def make_config(family: str):
    cfg_cls = _config_class(family)
    extra = OVERRIDES.get(family, {})
    if callable(extra):
        return extra()
    return cfg_cls(**tiny_kwargs(cfg_cls, extra))


def probe_ids(batch: int = 1, seq: int = 5, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (batch, seq), generator=g)


@functools.cache
def _build(family: str):
    try:
        cls = getattr(T, head_class(family)[1])
        config = make_config(family)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.device("meta"):
                n = sum(p.numel() for p in cls(config).parameters())
            if n > MAX_PARAMS:
                raise BuildError(f"the tiny config still has {n / 1e6:.1f}M parameters: a size the generic settings do not reach")
            torch.manual_seed(SEED)
            model = cls(config)
        model.eval()
        with torch.no_grad():
            for _, p in model.named_parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
            ids = probe_ids()
            try:
                out = model(input_ids=ids)
            except Exception:
                if family not in SEQ2SEQ:
                    raise
                out = model(input_ids=ids, decoder_input_ids=ids)
        logits = out.logits
        if not torch.isfinite(logits).all():
            raise BuildError("the HF forward gives non-finite logits")
        return model, None
    except Exception as err:  # noqa: BLE001 - recorded as "cannot build" with the exception
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return None, f"{type(err).__name__}: {text}"[:300]


def build(family: str) -> torch.nn.Module:
    """The tiny eval-mode model of ``family`` (built once per process); BuildError if it cannot be built."""
    model, error = _build(family)
    if model is None:
        raise BuildError(error)
    return model
