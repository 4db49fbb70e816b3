"""Llama <-> Hugging Face's LlamaForCausalLM: config keys and tensor names.

hpcpipe's Llama keeps HF's layouts (q/k/v rows per head, rotary in the rotate_half convention),
so every tensor maps 1:1 by name, with no transform.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from hpcpipe.models.llama.model import LlamaConfig

# HF keys whose non-default values change the computation, with the value hpcpipe computes
FIXED = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu"}
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}


# HF's rope parameters of rope_type "llama3" (Llama 3.1/3.2) -> hpcpipe's [model] keys
LLAMA3_ROPE = {
    "factor": "rope_factor",
    "low_freq_factor": "rope_low_freq_factor",
    "high_freq_factor": "rope_high_freq_factor",
    "original_max_position_embeddings": "rope_original_max_positions",
}


def _rope_keys(c: dict, name: str) -> dict:
    """[model] keys of one of HF's rope dicts (rope_scaling or rope_parameters); {} = plain."""
    params = c.get(name) or {}
    kind = params.get("rope_type") or params.get("type") or "default"
    allowed = {"rope_type", "type", "rope_theta"}
    if kind == "default":
        keys = {}
    elif kind == "llama3":
        # as transformers' standardize_rope_params: a top-level original_max_position_embeddings
        # wins, and max_position_embeddings stands in for a missing one
        params = {"original_max_position_embeddings": c.get("max_position_embeddings"), **params}
        if "original_max_position_embeddings" in c:
            params["original_max_position_embeddings"] = c["original_max_position_embeddings"]
        missing = [k for k in LLAMA3_ROPE if params.get(k) is None]
        if missing:
            raise ValueError(
                f"{name}={json.dumps(c[name])}: rope_type 'llama3' needs {', '.join(missing)}"
            )
        allowed |= set(LLAMA3_ROPE)
        keys = {"rope_scaling": "llama3", **{ours: params[k] for k, ours in LLAMA3_ROPE.items()}}
    else:
        raise ValueError(
            f"{name}.rope_type={kind!r} ({name}={json.dumps(params)}): hpcpipe's Llama supports "
            "plain rotary positions and Llama 3.1's rope_type 'llama3' only (not linear, "
            "dynamic, yarn, longrope, ...)"
        )
    extra = sorted(set(params) - allowed)
    if extra:
        raise ValueError(
            f"{name} has {', '.join(extra)}: hpcpipe's Llama reads only rope_type, rope_theta "
            f"and, for rope_type 'llama3', {', '.join(LLAMA3_ROPE)}"
        )
    return keys


def _rope(c: dict) -> dict:
    """rope_theta and the rope scaling [model] keys, from transformers 5's rope_parameters or
    the older top-level rope_theta and rope_scaling (Llama 3.1's config.json on the hub)."""
    old, new = _rope_keys(c, "rope_scaling"), _rope_keys(c, "rope_parameters")
    if old and new and old != new:
        raise ValueError(
            f"rope_scaling={json.dumps(c['rope_scaling'])} and rope_parameters="
            f"{json.dumps(c['rope_parameters'])} disagree"
        )
    theta = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0))
    # rope_scaling always recorded, so a user's model.rope_scaling must agree with the folder
    return {"rope_theta": float(theta), "rope_scaling": "", **(new or old)}


@dataclass(frozen=True)
class LlamaConverter:
    """What hpcpipe/checkpoint/hf.py and hpcpipe/train/init_from.py need for Llama."""

    model_type: str = "llama"
    architectures: tuple[str, ...] = ("LlamaForCausalLM", "LlamaModel")
    base_prefix: str = "model."

    def config_from_hf(self, hf_config: dict) -> dict:
        """[model] keys of a Llama config.json (ValueError naming a key hpcpipe cannot run)."""
        c = hf_config
        for key, value in FIXED.items():
            if c.get(key, value) != value:
                raise ValueError(
                    f"{key}={json.dumps(c[key])}: hpcpipe's Llama has no such feature (it "
                    f"computes {key}={json.dumps(value)})"
                )
        d, heads = c.get("hidden_size", 4096), c.get("num_attention_heads", 32)
        head_dim = c.get("head_dim")
        if head_dim is not None and head_dim * heads != d:
            raise ValueError(
                f"head_dim={head_dim} with num_attention_heads={heads} is not hidden_size={d}; "
                "hpcpipe's Llama has head size hidden_size / num_attention_heads"
            )
        rope = _rope(c)
        positions = c.get("max_position_embeddings", 2048)
        return {
            "arch": "llama",
            "vocab_size": c.get("vocab_size", 32000),
            "n_layers": c.get("num_hidden_layers", 32),
            "d_model": d,
            "n_heads": heads,
            "n_kv_heads": c.get("num_key_value_heads") or heads,
            "ffn_hidden": c.get("intermediate_size", 11008),
            "norm_eps": c.get("rms_norm_eps", 1e-6),
            **rope,
            "init_std": c.get("initializer_range", 0.02),
            "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
            "max_positions": positions,
            "seq_len": positions,
        }

    def config_to_hf(self, model_config: LlamaConfig, dtype: str = "float32") -> dict:
        """config.json of a LlamaForCausalLM computing what model_config computes."""
        m = model_config
        rope = {"rope_type": "default", "rope_theta": m.rope_theta}
        if m.llama3_rope is not None:
            rope["rope_type"] = "llama3"
            rope.update(zip(LLAMA3_ROPE, m.llama3_rope, strict=True))
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": m.vocab_size,
            "hidden_size": m.d_model,
            "intermediate_size": m.hidden,
            "num_hidden_layers": m.n_layers,
            "num_attention_heads": m.n_heads,
            "num_key_value_heads": m.kv_heads,
            "head_dim": m.head_dim,
            "max_position_embeddings": m.positions,
            "rms_norm_eps": m.norm_eps,
            # transformers 5 reads rope_parameters; 4.x reads rope_theta (and not llama3 there)
            "rope_parameters": rope,
            "rope_theta": m.rope_theta,
            "initializer_range": m.init_std,
            "tie_word_embeddings": m.tie_embeddings,
            **FIXED,
            "attention_dropout": 0.0,
            "pretraining_tp": 1,
            # the byte vocabulary has no special tokens
            "bos_token_id": None,
            "eos_token_id": None,
            "torch_dtype": dtype,
            "dtype": dtype,
        }

    def hf_names(self, model_config: LlamaConfig) -> dict[str, str]:
        """hpcpipe global name -> HF tensor name, for every parameter (tied copies too)."""
        n = model_config.num_layers
        names = {
            "layers.0.tok.weight": "model.embed_tokens.weight",
            f"layers.{n - 1}.norm.weight": "model.norm.weight",
            f"layers.{n - 1}.lm_head.weight": "lm_head.weight",
        }
        for i in range(1, n - 1):
            for ours, theirs in _BLOCK.items():
                names[f"layers.{i}.{ours}"] = f"model.layers.{i - 1}.{theirs}"
        return names

    def to_hf(self, name: str, tensor: torch.Tensor, model_config: LlamaConfig) -> torch.Tensor:
        """Same layout on both sides."""
        return tensor

    def from_hf(self, name: str, tensor: torch.Tensor, model_config: LlamaConfig) -> torch.Tensor:
        """Same layout on both sides."""
        return tensor


CONVERTER = LlamaConverter()
