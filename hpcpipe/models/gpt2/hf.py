"""GPT-2 <-> Hugging Face's GPT2LMHeadModel: config keys, tensor names and layouts.

Two layouts differ. HF's Conv1D stores weights as (in, out), transposed against nn.Linear; and
its fused c_attn has the rows [all q | all k | all v], while hpcpipe groups them per head,
[q_h, k_h, v_h] for h = 0.. (so a tensor-parallel rank's heads are one block of rows). The
embeddings, the LayerNorms and lm_head are the same on both sides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from hpcpipe.models.gpt2.model import GPT2Config

# HF activation_function -> model.activation; "gelu_new" is GPT-2's own tanh form
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
# model.activation -> HF: "gelu_pytorch_tanh" is torch's own tanh GELU, exactly what hpcpipe runs
TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which hpcpipe's GPT-2 uses
# HF keys whose non-default values change the computation, with the value hpcpipe computes
FIXED = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
}
# Conv1D weights (transposed); c_attn is handled apart
_CONV1D = ("attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight")
_BLOCK = {
    "ln1.weight": "ln_1.weight",
    "ln1.bias": "ln_1.bias",
    "attn.qkv.weight": "attn.c_attn.weight",
    "attn.qkv.bias": "attn.c_attn.bias",
    "attn.proj.weight": "attn.c_proj.weight",
    "attn.proj.bias": "attn.c_proj.bias",
    "ln2.weight": "ln_2.weight",
    "ln2.bias": "ln_2.bias",
    "mlp.fc.weight": "mlp.c_fc.weight",
    "mlp.fc.bias": "mlp.c_fc.bias",
    "mlp.proj.weight": "mlp.c_proj.weight",
    "mlp.proj.bias": "mlp.c_proj.bias",
}


def _local(name: str) -> str:
    """'layers.3.attn.qkv.weight' -> 'attn.qkv.weight'."""
    return name.split(".", 2)[2]


@dataclass(frozen=True)
class GPT2Converter:
    """What hpcpipe/checkpoint/hf.py and hpcpipe/train/init_from.py need for GPT-2."""

    model_type: str = "gpt2"
    architectures: tuple[str, ...] = ("GPT2LMHeadModel", "GPT2Model")
    base_prefix: str = "transformer."

    def config_from_hf(self, hf_config: dict) -> dict:
        """[model] keys of a GPT-2 config.json (ValueError naming a key hpcpipe cannot run)."""
        c = hf_config
        for key, value in FIXED.items():
            if c.get(key, value) != value:
                raise ValueError(
                    f"{key}={json_value(c[key])}: hpcpipe's GPT-2 has no such feature (it "
                    f"computes {key}={json_value(value)})"
                )
        eps = c.get("layer_norm_epsilon", LAYER_NORM_EPS)
        if eps != LAYER_NORM_EPS:
            raise ValueError(
                f"layer_norm_epsilon={eps}: hpcpipe's GPT-2 LayerNorms use {LAYER_NORM_EPS}"
            )
        act = c.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ValueError(
                f"activation_function={act!r}: hpcpipe's GPT-2 runs {', '.join(ACTIVATIONS)}"
            )
        d = c.get("n_embd", 768)
        inner = c.get("n_inner") or 4 * d
        if inner % d:
            raise ValueError(
                f"n_inner={inner} is not a multiple of n_embd={d}; hpcpipe's GPT-2 MLP is "
                "model.mlp_ratio * d_model wide"
            )
        positions = c.get("n_positions", 1024)
        return {
            "arch": "gpt2",
            "vocab_size": c.get("vocab_size", 50257),
            "n_layers": c.get("n_layer", 12),
            "d_model": d,
            "n_heads": c.get("n_head", 12),
            "mlp_ratio": inner // d,
            "activation": ACTIVATIONS[act],
            "tie_embeddings": bool(c.get("tie_word_embeddings", True)),
            "init_std": c.get("initializer_range", 0.02),
            "max_positions": positions,
            "seq_len": positions,
        }

    def config_to_hf(self, model_config: GPT2Config, dtype: str = "float32") -> dict:
        """config.json of a GPT2LMHeadModel computing what model_config computes."""
        m = model_config
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": m.vocab_size,
            "n_positions": m.positions,
            "n_embd": m.d_model,
            "n_layer": m.n_layers,
            "n_head": m.n_heads,
            "n_inner": m.hidden,
            "activation_function": TO_HF_ACTIVATION[m.activation],
            "layer_norm_epsilon": LAYER_NORM_EPS,
            "initializer_range": m.init_std,
            "tie_word_embeddings": m.tie_embeddings,
            **FIXED,
            # hpcpipe trains without dropout
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "summary_first_dropout": 0.0,
            # the byte vocabulary has no special tokens
            "bos_token_id": None,
            "eos_token_id": None,
            "torch_dtype": dtype,
            "dtype": dtype,
        }

    def hf_names(self, model_config: GPT2Config) -> dict[str, str]:
        """hpcpipe global name -> HF tensor name, for every parameter (tied copies too)."""
        n = model_config.num_layers
        names = {
            "layers.0.tok.weight": "transformer.wte.weight",
            "layers.0.pos.weight": "transformer.wpe.weight",
            f"layers.{n - 1}.ln_f.weight": "transformer.ln_f.weight",
            f"layers.{n - 1}.ln_f.bias": "transformer.ln_f.bias",
            f"layers.{n - 1}.lm_head.weight": "lm_head.weight",
        }
        for i in range(1, n - 1):
            for ours, theirs in _BLOCK.items():
                names[f"layers.{i}.{ours}"] = f"transformer.h.{i - 1}.{theirs}"
        return names

    def to_hf(self, name: str, tensor: torch.Tensor, model_config: GPT2Config) -> torch.Tensor:
        """hpcpipe's tensor `name` in HF's layout."""
        local = _local(name)
        if local.startswith("attn.qkv."):
            tensor = _regroup(tensor, model_config.n_heads, per_head=False)
        if local == "attn.qkv.weight" or local in _CONV1D:
            tensor = tensor.t()
        return tensor.contiguous()

    def from_hf(self, name: str, tensor: torch.Tensor, model_config: GPT2Config) -> torch.Tensor:
        """HF's tensor for hpcpipe's `name`, in hpcpipe's layout (the whole c_attn is needed)."""
        local = _local(name)
        if local == "attn.qkv.weight" or local in _CONV1D:
            tensor = tensor.t()
        if local.startswith("attn.qkv."):
            tensor = _regroup(tensor, model_config.n_heads, per_head=True)
        return tensor.contiguous()


def _regroup(tensor: torch.Tensor, heads: int, per_head: bool) -> torch.Tensor:
    """qkv rows (dim 0) [q | k | v] -> [q_h, k_h, v_h]_h (per_head), or back."""
    rest = tensor.shape[1:]
    head_dim = tensor.shape[0] // (3 * heads)
    if per_head:  # (3, heads, hd, ...) -> (heads, 3, hd, ...)
        grouped = tensor.reshape(3, heads, head_dim, *rest).transpose(0, 1)
    else:  # (heads, 3, hd, ...) -> (3, heads, hd, ...)
        grouped = tensor.reshape(heads, 3, head_dim, *rest).transpose(0, 1)
    return grouped.reshape(tensor.shape)


def json_value(value) -> str:
    """A config value as config.json spells it (true, not True)."""
    return json.dumps(value)


CONVERTER = GPT2Converter()
