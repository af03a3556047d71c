"""Tiny random MoE checkpoints of every supported architecture, built offline.

Tests build these in fixtures, and ``promoe chat`` falls back to one when the bundled
trained model is missing. Everything is seeded: the same arguments give the same bytes.
The tokenizer is a small byte-level BPE trained on a fixed text, so a tiny model also
has a real ``tokenizer.json`` (no download).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Small, but each exercises its architecture's particulars: shared experts and their
# gate (qwen2_moe), dense layers (qwen3_moe mlp_only_layers, deepseek first_k_dense_replace),
# group-limited routing and score-correction bias (deepseek_v3), sparsemixer (phimoe),
# interleaved gate/up with biases in the fused on-disk layout (gpt_oss).
_COMMON: dict[str, Any] = dict(
    vocab_size=320, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, tie_word_embeddings=False,
)  # fmt: skip

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": dict(intermediate_size=96, num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=64,
        num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        intermediate_size=128, moe_intermediate_size=48, num_hidden_layers=4, num_experts=8,
        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1], head_dim=16, norm_topk_prob=True,
    ),
    "olmoe": dict(intermediate_size=48, num_hidden_layers=4, num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(
        intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4, num_key_value_heads=4,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_group=2, topk_group=1, topk_method="group_limited_greedy", kv_lora_rank=32, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, routed_scaling_factor=1.0,
    ),
    "deepseek_v3": dict(
        intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4, num_key_value_heads=4,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_group=4, topk_group=2, kv_lora_rank=32, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, routed_scaling_factor=2.5, norm_topk_prob=True,
    ),
    "phimoe": dict(intermediate_size=96, num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2),
    "gpt_oss": dict(
        intermediate_size=64, num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
        sliding_window=32, layer_types=["sliding_attention", "full_attention"] * 2,
        max_position_embeddings=131072,  # what its YaRN rope scaling expects
    ),
}  # fmt: skip

_TOKENIZER_TEXT = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
    "The quick brown fox jumps over the lazy dog. Mixture of experts models route each token "
    "to a few experts; promoe keeps the experts in host memory and caches them on the device.\n"
    "import os\nimport sys\nclass Cache:\n    def __init__(self, size):\n        self.size = size\n"
)


def build_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on a fixed text, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TOKENIZER_TEXT] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def tiny_config(model_type: str, **overrides: Any):
    from transformers import AutoConfig

    if model_type not in TINY_CONFIGS:
        raise KeyError(f"no tiny config for {model_type}; have {sorted(TINY_CONFIGS)}")
    kwargs = {**_COMMON, **TINY_CONFIGS[model_type], "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    return AutoConfig.for_model(model_type, **{**kwargs, **overrides})


def build_tiny_model(
    model_type: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    """Write a random tiny checkpoint of ``model_type`` (safetensors + tokenizer) to ``out_dir``.

    Written to a temporary directory first and renamed into place, so an interrupted
    build never leaves a half-written model behind.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    cfg = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    with torch.no_grad():
        # random routers are nearly uniform: sharpen them so routing is decisive, and give
        # DeepSeek-V3's score-correction bias values so that it matters
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("gate.weight", "router.weight")) and t.dim() == 2 and t.shape[0] > 1:
                t.normal_(0.0, 0.5)
            elif name.endswith("e_score_correction_bias"):
                t.normal_(0.0, 0.1)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent if out.parent.exists() else None))
    try:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(tmp, **kwargs)
        build_tokenizer(cfg.vocab_size).save_pretrained(tmp)
        (tmp / "promoe_tiny.json").write_text(json.dumps({"model_type": model_type, "seed": seed}))
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
