"""Hugging Face `config.json` <-> gigajax config, for the LLaMA family: LLaMA 2/3/3.1/3.2,
Mistral, Qwen2/2.5 and Qwen3, and the mixtures of experts Mixtral and Qwen3-MoE.

Every field of an HF config is mapped (`MAPPED`), known to leave the math alone (`HARMLESS`), or
refused with a ConfigError naming it (an unknown activation, biases gigajax lacks, a RoPE type it
does not compute, ...). A field nobody has classified is refused too: the caller may accept it by
name (`ignore`) after checking that it changes nothing. RoPE settings are read from transformers
5's `rope_parameters` or from the older `rope_theta` + `rope_scaling` spelling.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_collections

from gigajax.config.schema import base_config, head_dim
from gigajax.errors import ConfigError

# architecture -> (model_type, what the model needs beyond LLaMA)
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
MOE_FAMILIES = ("mixtral", "qwen3_moe")
MAPPED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
          "rms_norm_eps", "tie_word_embeddings", "initializer_range", "rope_theta",
          "rope_scaling", "rope_parameters", "sliding_window", "use_sliding_window",
          "max_window_layers", "layer_types", "hidden_act", "attention_bias", "mlp_bias",
          "attention_dropout", "architectures", "model_type", "partial_rotary_factor",
          "use_mrope")
# the mixture-of-experts fields (Mixtral, Qwen3-MoE); refused in a dense family's config
MOE_MAPPED = ("num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
              "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef",
              "router_jitter_noise", "output_router_logits")
# fields that do not change the forward pass (token ids, bookkeeping, generation defaults)
HARMLESS = ("bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype",
            "transformers_version", "use_cache", "pretraining_tp", "_name_or_path",
            "return_dict", "output_hidden_states", "output_attentions", "torchscript",
            "use_bfloat16", "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward",
            "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
            "id2label", "label2id", "problem_type", "tokenizer_class", "prefix",
            "task_specific_params", "finetuning_task", "sep_token_id", "decoder_start_token_id",
            "bad_words_ids", "num_return_sequences", "max_length", "min_length",
            "do_sample", "early_stopping", "num_beams", "temperature", "top_k", "top_p",
            "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
            "output_scores", "return_dict_in_generate", "forced_bos_token_id",
            "forced_eos_token_id", "remove_invalid_values", "typical_p", "diversity_penalty",
            "num_beam_groups", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty",
            "suppress_tokens", "begin_suppress_tokens", "cross_attention_hidden_size",
            "keys_to_ignore_at_inference", "base_model_tp_plan", "base_model_pp_plan",
            "attn_implementation", "_attn_implementation_autoset")
ROPE_KEYS = {  # rope_type -> the keys of its parameters we read (others are refused)
    "default": (), "linear": ("factor",), "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate",
             "attention_factor", "mscale", "mscale_all_dim"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """`HF_DIR/config.json` as a dict (ConfigError naming the file when it is missing or bad)."""
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise ConfigError(f"{hf_dir} does not exist or is not a directory: pass a Hugging Face "
                          "model directory (config.json and *.safetensors).")
    if not path.is_file():
        raise ConfigError(f"{hf_dir} is not a Hugging Face model directory: it has no "
                          "config.json (save one with `model.save_pretrained(DIR)`).")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} holds {type(values).__name__}, not a JSON object.")
    if "architectures" not in values:
        gigajax_run = " (it is a gigajax run's config: `convert to-hf` exports a run)" if (
            "model" in values and "train" in values) else ""
        raise ConfigError(f"{hf_dir} is not a Hugging Face model directory: its config.json "
                          f"has no `architectures`{gigajax_run}.")
    return values


def is_hf_dir(path: str | Path) -> bool:
    """Whether `path` looks like a Hugging Face model directory (config.json + safetensors)."""
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def architecture(hf: Mapping[str, Any], where: str) -> str:
    """The one supported `architectures` entry of an HF config."""
    names = hf.get("architectures") or []
    supported = [n for n in names if n in ARCHITECTURES]
    if len(names) != 1 or not supported:
        raise ConfigError(f"{where}: architectures={names!r} is not supported; gigajax reads "
                          f"{', '.join(ARCHITECTURES)}.")
    return supported[0]


def from_hf_config(hf: Mapping[str, Any], where: str = "config.json",
                   ignore: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """The gigajax config (base_config() with the model section filled in) of an HF config;
    ConfigError naming the field for anything gigajax would compute differently."""
    arch = architecture(hf, where)
    family = ARCHITECTURES[arch]
    mapped = MAPPED + (MOE_MAPPED if family in MOE_FAMILIES else ())
    unknown = sorted(set(hf) - set(mapped) - set(HARMLESS) - set(ignore))
    if unknown:
        raise ConfigError(f"{where}: field {unknown[0]!r} is not one gigajax maps or knows to be "
                          "harmless" + (f" (also: {', '.join(unknown[1:])})" if unknown[1:] else "")
                          + ". If it does not change the model's math, accept it with "
                          f"--ignore-field {unknown[0]} (ignore=[...] from Python).")

    def refuse(field: str, why: str) -> None:
        raise ConfigError(f"{where}: {field}={hf.get(field)!r} is not supported: {why}.")

    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "gigajax's MLP is SwiGLU (silu)")
    if hf.get("mlp_bias"):
        refuse("mlp_bias", "gigajax's MLP has no biases")
    if hf.get("attention_bias"):  # Llama / Qwen3: biases on q, k, v *and* o
        refuse("attention_bias", "it adds a bias to o_proj too, which gigajax lacks (only "
               "Qwen2's q/k/v biases are supported)")
    if hf.get("attention_dropout"):
        refuse("attention_dropout", "gigajax has no attention dropout; set it to 0.0")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", "gigajax rotates the whole head dimension")
    if hf.get("use_mrope"):
        refuse("use_mrope", "multimodal RoPE sections are not implemented")
    cfg = base_config()
    m = cfg.model

    def value(key: str, kind: type = int, default: Any = None) -> Any:
        """hf[key] as `kind` (default when absent or null), else a ConfigError naming it."""
        raw = hf.get(key)
        if raw is None:
            if default is None:
                raise ConfigError(f"{where}: {key} is missing; a {arch} config.json has it.")
            return default
        if isinstance(raw, bool) != (kind is bool) or not isinstance(raw, int | float):
            raise ConfigError(f"{where}: {key}={raw!r} is not a {kind.__name__}.")
        if kind is int and raw != int(raw) or (kind is int and raw <= 0):
            raise ConfigError(f"{where}: {key}={raw!r} is not a positive integer.")
        return kind(raw)

    heads, hidden = value("num_attention_heads"), value("hidden_size")
    m.update(vocab_size=value("vocab_size"), d_model=hidden,
             n_layers=value("num_hidden_layers"), n_heads=heads,
             n_kv_heads=value("num_key_value_heads", default=heads),
             head_dim=value("head_dim", default=hidden // heads),
             mlp_dim=value("intermediate_size"),
             max_seq_len=value("max_position_embeddings", default=2048),
             norm_eps=value("rms_norm_eps", float, 1e-6),
             init_std=value("initializer_range", float, 0.02),
             tie_embeddings=value("tie_word_embeddings", bool, False),
             qkv_bias=family == "qwen2", qk_norm=family in ("qwen3", "qwen3_moe"),
             sliding_window=_sliding_window(hf, family, refuse))
    if family in MOE_FAMILIES:
        _read_moe(hf, m, family, value, refuse)
    _read_rope(hf, m, where)
    cfg.data.seq_len = min(cfg.data.seq_len, m.max_seq_len)
    return cfg


def _read_moe(hf: Mapping[str, Any], m: ml_collections.ConfigDict, family: str,
              value: Callable[..., Any], refuse: Callable[[str, str], None]) -> None:
    """model.moe of a Mixtral or Qwen3-MoE config: softmax routing over the experts, top-k,
    no shared experts; Qwen3-MoE's dense layers (`mlp_only_layers`) must be the first ones."""
    if "num_experts" in hf and "num_local_experts" in hf and (
            hf["num_experts"] != hf["num_local_experts"]):
        refuse("num_experts", f"it differs from num_local_experts={hf['num_local_experts']!r} "
               "(two spellings of the expert count)")
    experts = value("num_experts" if "num_experts" in hf else "num_local_experts")
    if hf.get("router_jitter_noise"):
        refuse("router_jitter_noise", "gigajax's router has no input jitter; set it to 0.0")
    moe = m.moe
    top_k = value("num_experts_per_tok")
    if top_k > experts:
        refuse("num_experts_per_tok", f"a token picks at most the {experts} experts there are")
    # transformers' balance loss is top_k when balanced, gigajax's 1: the same objective
    # takes top_k times the coefficient
    moe.update(n_routed_experts=experts, top_k=top_k, n_shared_experts=0, score="softmax",
               aux_loss_weight=top_k * value("router_aux_loss_coef", float, 0.001),
               z_loss_weight=0.0)
    if family == "mixtral":  # every layer sparse; intermediate_size is each expert's width
        moe.update(expert_mlp_dim=m.mlp_dim, renormalize=True, first_dense_layers=0)
        return
    if value("decoder_sparse_step", int, 1) != 1:
        refuse("decoder_sparse_step", "experts in every k-th layer only: gigajax's MoE layers "
               "are all the layers after the first model.moe.first_dense_layers")
    dense = hf.get("mlp_only_layers") or []
    if not isinstance(dense, list) or dense != list(range(len(dense))) or (
            len(dense) >= m.n_layers):
        refuse("mlp_only_layers", "gigajax's dense layers are the first ones, 0..k-1, and at "
               "least one layer has experts")
    moe.update(expert_mlp_dim=value("moe_intermediate_size"), first_dense_layers=len(dense),
               renormalize=value("norm_topk_prob", bool, False))


def _sliding_window(hf: Mapping[str, Any], family: str, refuse) -> int:
    """The window of every layer (0: none); mixed full and sliding layers are refused."""
    window = int(hf.get("sliding_window") or 0)
    if family in ("mistral", "mixtral"):
        return window
    if family == "qwen3_moe":  # transformers windows every layer when use_sliding_window
        return window if hf.get("use_sliding_window") else 0
    if family in ("qwen2", "qwen3"):
        layer_types = hf.get("layer_types") or []
        if hf.get("use_sliding_window") or "sliding_attention" in layer_types:
            if layer_types and set(layer_types) == {"sliding_attention"}:
                return window
            refuse("use_sliding_window", "sliding windows on some layers only "
                   "(max_window_layers / layer_types): gigajax uses one window for all layers")
        return 0
    if window or hf.get("layer_types") and set(hf["layer_types"]) != {"full_attention"}:
        refuse("sliding_window", f"{family} has no sliding window")
    return 0


def _rope_parameters(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """RoPE settings in transformers 5's form: `rope_parameters`, else `rope_theta` plus the
    legacy `rope_scaling` (with `type` or `rope_type`)."""
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None and not isinstance(hf[key], Mapping):
            raise ConfigError(f"{where}: {key}={hf[key]!r} is not a JSON object.")
    if isinstance(hf.get("rope_parameters"), Mapping):
        params = dict(hf["rope_parameters"])
        if any(isinstance(v, Mapping) for v in params.values()):
            raise ConfigError(f"{where}: rope_parameters per layer type is not supported: "
                              "gigajax uses one RoPE for all layers.")
    else:
        params = dict(hf.get("rope_scaling") or {})
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
        params.pop("type", None)
    params.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
    params.setdefault("rope_type", "default")
    return params


def _read_rope(hf: Mapping[str, Any], m: ml_collections.ConfigDict, where: str) -> None:
    params = _rope_parameters(hf, where)
    kind = params.pop("rope_type")
    m.rope_theta = float(params.pop("rope_theta"))
    if kind not in ROPE_KEYS:
        raise ConfigError(f"{where}: rope_type={kind!r} is not supported; gigajax computes "
                          f"{', '.join(ROPE_KEYS)} as transformers does.")
    if params.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{where}: partial_rotary_factor is not supported: gigajax rotates "
                          "the whole head dimension.")
    extra = sorted(k for k, v in params.items() if k not in ROPE_KEYS[kind] and v is not None)
    if extra:
        raise ConfigError(f"{where}: rope parameter {extra[0]!r} is not used by rope_type="
                          f"{kind!r} as gigajax computes it; remove it or use a type that "
                          "reads it.")
    for key, v in params.items():
        if v is not None and key != "truncate" and (
                isinstance(v, bool) or not isinstance(v, int | float)):
            raise ConfigError(f"{where}: rope parameter {key}={v!r} is not a number.")
    rs = m.rope_scaling
    if kind == "default":
        return
    rs.type = {"default": "none"}.get(kind, kind)
    original = params.get("original_max_position_embeddings") or m.max_seq_len
    factor = params.get("factor")
    if factor is None and kind == "yarn":  # as transformers: the ratio of the two contexts
        factor = m.max_seq_len / original
    rs.factor = float(factor)
    rs.original_max_seq_len = int(original)
    for key in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim",
                "low_freq_factor", "high_freq_factor"):
        if params.get(key) is not None:
            rs[key] = float(params[key])
    if "truncate" in params:  # transformers reads get("truncate", True): null is false
        rs.truncate = bool(params["truncate"])


def hf_family(qk_norm: bool, qkv_bias: bool, sliding_window: int, moe: bool) -> str:
    """The HF family a gigajax model exports as: Qwen3(-MoE) with q/k norms, Qwen2 with q/k/v
    biases, Mixtral for other MoE models, Mistral with a sliding window, LLaMA otherwise."""
    if moe:
        return "qwen3_moe" if qk_norm else "mixtral"
    return "qwen3" if qk_norm else "qwen2" if qkv_bias else (
        "mistral" if sliding_window else "llama")


def to_hf_config(cfg: ml_collections.ConfigDict, dtype: str,
                 token_ids: Mapping[str, int | None]) -> dict[str, Any]:
    """The HF config.json of a gigajax model: LLaMA, or Mistral with a sliding window, Qwen2 with
    q/k/v biases, Qwen3 with q/k norms; Mixtral or Qwen3-MoE (q/k norms) for a mixture of
    experts. RoPE is written in both spellings (transformers 5's `rope_parameters`, and
    `rope_theta` + `rope_scaling` for 4.x)."""
    m = cfg.model
    if m.qk_norm and m.qkv_bias:
        raise ConfigError("model.qkv_bias and model.qk_norm together match no Hugging Face "
                          "family (Qwen2 has biases, Qwen3 has norms): cannot export.")
    moe = bool(m.moe.n_routed_experts)
    family = hf_family(m.qk_norm, m.qkv_bias, m.sliding_window, moe)
    if moe:
        _check_moe_export(m, family)
    arch = next(a for a, f in ARCHITECTURES.items() if f == family)
    rope, max_positions = _rope_out(m)
    hf: dict[str, Any] = {
        "architectures": [arch], "model_type": family, "hidden_size": m.d_model,
        "intermediate_size": m.mlp_dim, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
        "head_dim": head_dim(m), "vocab_size": m.vocab_size,
        "max_position_embeddings": max_positions, "rms_norm_eps": m.norm_eps,
        "initializer_range": m.init_std, "tie_word_embeddings": m.tie_embeddings,
        "hidden_act": "silu", "attention_dropout": 0.0, "rope_parameters": rope,
        "rope_theta": m.rope_theta,
        "rope_scaling": None if rope["rope_type"] == "default" else
        {k: v for k, v in rope.items() if k != "rope_theta"},
        "dtype": dtype, "torch_dtype": dtype, "use_cache": True, **token_ids,
    }
    if family in ("llama", "qwen3", "qwen3_moe"):
        hf["attention_bias"] = False
    if family == "llama":
        hf["mlp_bias"] = False
    if family in ("mistral", "mixtral"):
        hf["sliding_window"] = m.sliding_window or None
    if family in ("qwen2", "qwen3", "qwen3_moe"):
        window = m.sliding_window or None
        hf.update(use_sliding_window=bool(window), sliding_window=window, max_window_layers=0,
                  layer_types=["sliding_attention" if window else "full_attention"]
                  * m.n_layers)
    if moe:
        hf.update(num_local_experts=m.moe.n_routed_experts,
                  num_experts_per_tok=m.moe.top_k,
                  router_aux_loss_coef=float(m.moe.aux_loss_weight) / m.moe.top_k,
                  output_router_logits=False)
    if family == "mixtral":
        hf.update(intermediate_size=m.moe.expert_mlp_dim or m.mlp_dim, router_jitter_noise=0.0)
    if family == "qwen3_moe":
        hf.update(num_experts=m.moe.n_routed_experts,
                  moe_intermediate_size=m.moe.expert_mlp_dim or m.mlp_dim,
                  norm_topk_prob=bool(m.moe.renormalize), decoder_sparse_step=1,
                  mlp_only_layers=list(range(m.moe.first_dense_layers)))
    return hf


def _check_moe_export(m: ml_collections.ConfigDict, family: str) -> None:
    """ConfigError naming the field a Mixtral / Qwen3-MoE checkpoint cannot express."""
    moe = m.moe

    def refuse(field: str, value: Any, why: str) -> None:
        raise ConfigError(f"model.{field}={value!r}: cannot export to Hugging Face: {why}.")

    if m.qkv_bias:
        refuse("qkv_bias", m.qkv_bias, "no exported mixture-of-experts family (Mixtral, "
               "Qwen3-MoE) has q/k/v biases")
    if moe.n_shared_experts:
        refuse("moe.n_shared_experts", moe.n_shared_experts, "Mixtral and Qwen3-MoE have no "
               "shared experts")
    if moe.score != "softmax":
        refuse("moe.score", moe.score, "Mixtral and Qwen3-MoE route by softmax scores")
    if family == "mixtral" and moe.first_dense_layers:
        refuse("moe.first_dense_layers", moe.first_dense_layers, "Mixtral (a MoE model without "
               "q/k norms exports as Mixtral) has experts in every layer")
    if family == "mixtral" and not moe.renormalize:
        refuse("moe.renormalize", moe.renormalize, "Mixtral always divides the top-k weights "
               "by their sum")


def _rope_out(m: ml_collections.ConfigDict) -> tuple[dict[str, Any], int]:
    """(rope_parameters, max_position_embeddings) of a gigajax model section."""
    rs = m.rope_scaling
    original = rs.original_max_seq_len or int(m.max_seq_len / rs.factor)
    rope: dict[str, Any] = {"rope_type": "default" if rs.type == "none" else rs.type,
                            "rope_theta": m.rope_theta}
    if rs.type == "none":
        return rope, m.max_seq_len
    rope["factor"] = rs.factor
    if rs.type == "linear":
        return rope, m.max_seq_len
    if rs.type == "dynamic":  # transformers scales from max_position_embeddings on
        return rope, original
    rope["original_max_position_embeddings"] = original
    if rs.type == "llama3":
        rope.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor)
        return rope, m.max_seq_len
    rope.update(beta_fast=rs.beta_fast, beta_slow=rs.beta_slow, truncate=rs.truncate)
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        if rs[key]:
            rope[key] = rs[key]
    return rope, m.max_seq_len
