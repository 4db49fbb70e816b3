"""Model keys of well-known models, for `hpcpipe plan --preset NAME` (and `hpcpipe train`).

Each preset is [model] keys plus the [train] keys the model was trained with that change the
plan (dtype, sequences per step). Sources: GPT-3 175B from Brown et al. 2020, table 2.1
(96 layers, d_model 12288, 96 heads, 2048 tokens, batch 3.2M tokens = 1536 sequences; the
GPT-2 vocabulary and learned positions, tied embeddings); Llama 3 from Meta's model cards and
"The Llama 3 Herd of Models" (2024), table 3 (8B: 32 layers, 4096, 32 heads, 8 kv heads, FFN
14336; 70B: 80, 8192, 64, 8, 28672; 405B: 126, 16384, 128, 8, 53248; vocabulary 128256,
RoPE base 500000, 8192 tokens, untied). The global batches follow the papers' early phases
(Llama 3 405B: 4M tokens = 512 sequences of 8192).
"""

from __future__ import annotations

PRESETS: dict[str, dict[str, dict]] = {
    "gpt3-175b": {
        "model": {"arch": "gpt2", "n_layers": 96, "d_model": 12288, "n_heads": 96,
                  "seq_len": 2048, "vocab_size": 50257, "tie_embeddings": True},
        "train": {"dtype": "bfloat16", "global_batch": 1536},
    },
    "llama3-8b": {
        "model": {"arch": "llama", "n_layers": 32, "d_model": 4096, "n_heads": 32,
                  "n_kv_heads": 8, "ffn_hidden": 14336, "vocab_size": 128256,
                  "seq_len": 8192, "rope_theta": 500000.0},
        "train": {"dtype": "bfloat16", "global_batch": 512},
    },
    "llama3-70b": {
        "model": {"arch": "llama", "n_layers": 80, "d_model": 8192, "n_heads": 64,
                  "n_kv_heads": 8, "ffn_hidden": 28672, "vocab_size": 128256,
                  "seq_len": 8192, "rope_theta": 500000.0},
        "train": {"dtype": "bfloat16", "global_batch": 512},
    },
    "llama3-405b": {
        "model": {"arch": "llama", "n_layers": 126, "d_model": 16384, "n_heads": 128,
                  "n_kv_heads": 8, "ffn_hidden": 53248, "vocab_size": 128256,
                  "seq_len": 8192, "rope_theta": 500000.0},
        "train": {"dtype": "bfloat16", "global_batch": 512},
    },
}  # fmt: skip


def preset_overrides(name: str) -> dict[str, object]:
    """The preset's keys as dotted overrides ({"model.n_layers": 96, ...})."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    tables = PRESETS[name].items()
    return {f"{section}.{key}": value for section, table in tables for key, value in table.items()}
