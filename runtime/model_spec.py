"""What a checkpoint is, read off transformers' own module tree built on the meta device.

Nothing is allocated: :func:`describe_model` builds the model with ``torch.device("meta")``
and reads which layers are MoE layers, how many experts they have, the shape of one
expert, and how many non-expert weights there are. The loader later materializes that
same meta model, so what is planned is what is loaded.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from runtime.arch import ArchSpec, get_arch
from runtime.checkpoint import Checkpoint
from runtime.errors import CheckpointError
from runtime.expert_layout import ExpertShape


@dataclass
class ModelSpec:
    path: Path
    config: object  # transformers.PretrainedConfig
    arch: ArchSpec
    meta_model: nn.Module
    moe_layers: list[int]  # decoder-layer indices that have routed experts
    num_experts: int
    top_k: int
    expert_shape: ExpertShape
    transposed: bool  # fused on-disk layout stores [E, in, out] (GPT-OSS)
    num_layers: int

    def experts_module(self, layer: int) -> nn.Module:
        return self.meta_model.model.layers[layer].mlp.experts

    def router(self, model: nn.Module, layer: int) -> nn.Module:
        """The router of ``layer`` in ``model`` (``mlp.gate`` or ``mlp.router``)."""
        mlp = model.model.layers[layer].mlp
        for name in ("gate", "router"):
            mod = getattr(mlp, name, None)
            w = getattr(mod, "weight", None)
            if w is not None and w.dim() == 2 and w.shape[0] == self.num_experts:
                return mod
        raise CheckpointError(f"layer {layer} has experts but no router named gate or router")

    def load_dtype(self, name: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype a floating tensor named ``name`` is kept in when computing in ``dtype``.

        Follows transformers: modules in ``_keep_in_fp32_modules_strict`` stay fp32 for
        any half dtype, those in ``_keep_in_fp32_modules`` stay fp32 under fp16.
        """
        strict = getattr(self.meta_model, "_keep_in_fp32_modules_strict", None) or []
        loose = getattr(self.meta_model, "_keep_in_fp32_modules", None) or []
        keep = list(strict) + (list(loose) if dtype == torch.float16 else [])
        if dtype != torch.float32 and any(f".{m}." in f".{name}." or name.endswith(m) for m in keep):
            return torch.float32
        return dtype

    def non_expert_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of every parameter and persistent buffer that is not a routed expert."""
        total = 0
        seen: set[int] = set()
        non_persistent = {n for n, _ in self.meta_model.named_non_persistent_buffers()}
        for name, t in [*self.meta_model.named_parameters(), *self.meta_model.named_buffers()]:
            if ".mlp.experts." in name or id(t) in seen or name in non_persistent:
                continue
            seen.add(id(t))
            d = self.load_dtype(name, dtype) if t.is_floating_point() else t.dtype
            total += t.numel() * d.itemsize
        return total

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def total_experts(self) -> int:
        return self.num_experts * len(self.moe_layers)


def _reject_quantized(config: dict) -> None:
    qc = config.get("quantization_config")
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        method = method or "a quantized format"
        raise CheckpointError(
            f"this checkpoint is stored in {method}; promoe converts bf16, fp16 or fp32 checkpoints",
            hint="use the unquantized release (for gpt-oss-20b: unsloth/gpt-oss-20b-BF16), "
            "promoe quantizes the experts itself (--quant int4)",
        )


def describe_model(ckpt: Checkpoint, *, weights: bool = True) -> ModelSpec:
    """The spec of ``ckpt``. Without ``weights`` (a shipped config.json, nothing else) the
    experts' dtype is the one config.json declares, instead of the one the shards store."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = get_arch(ckpt.config.get("model_type"))
    _reject_quantized(ckpt.config)
    try:
        config = AutoConfig.from_pretrained(ckpt.path)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:  # a field transformers cannot take
        first = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CheckpointError(f"transformers cannot read {ckpt.path / 'config.json'} ({first})",
                              hint="re-download or repair config.json") from None  # fmt: skip
    # transformers takes any torch attribute for a dtype ("dtype": "e" is the number torch.e)
    if getattr(config, "dtype", None) is not None and not isinstance(config.dtype, torch.dtype):
        name = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype")
        raise CheckpointError(
            f"config.json names an unknown dtype '{name}'", hint="use bfloat16, float16 or float32"
        )
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        meta = AutoModelForCausalLM.from_config(config)
    layers = meta.model.layers
    moe_layers = [i for i, layer in enumerate(layers) if hasattr(getattr(layer, "mlp", None), "experts")]
    if not moe_layers:
        raise CheckpointError(
            f"{ckpt.path} has no MoE layers (no mlp.experts in any decoder layer)",
            hint="promoe offloads the experts of Mixture-of-Experts models; a dense model needs no promoe",
        )
    experts = layers[moe_layers[0]].mlp.experts
    transposed = bool(getattr(experts, "is_transposed", False))
    num_experts, a, b = experts.gate_up_proj.shape
    hidden, two_inter = (a, b) if transposed else (b, a)
    has_bias = getattr(experts, "gate_up_proj_bias", None) is not None
    src_dtype = _expert_dtype(ckpt, arch, moe_layers[0]) if weights else _config_dtype(ckpt.config)
    top_k = int(config.num_experts_per_tok)
    if not 1 <= top_k <= num_experts:
        raise CheckpointError(
            f"config.json routes each token to {top_k} experts, but the model has {num_experts}",
            hint="num_experts_per_tok must be between 1 and the number of experts",
        )
    spec = ModelSpec(
        path=ckpt.path,
        config=config,
        arch=arch,
        meta_model=meta,
        moe_layers=moe_layers,
        num_experts=num_experts,
        top_k=top_k,
        expert_shape=ExpertShape(hidden, two_inter // 2, has_bias, src_dtype),
        transposed=transposed,
        num_layers=len(layers),
    )
    spec.router(meta, moe_layers[0])  # fail early if the router cannot be found
    return spec


def _config_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"config.json names an unknown dtype '{name}'")
    return dtype


def _expert_dtype(ckpt: Checkpoint, arch: ArchSpec, layer: int) -> torch.dtype:
    for prefix in (arch.disk_experts_prefix(layer), f"model.layers.{layer}.mlp.experts"):
        for key in (f"{prefix}.gate_up_proj", f"{prefix}.0.{arch.expert_names[0]}.weight"):
            if key in ckpt:
                return ckpt.dtype(key)
    raise CheckpointError(
        f"no expert weights for layer {layer} in {ckpt.path}",
        hint=f"expected {arch.disk_experts_prefix(layer)}.0.{arch.expert_names[0]}.weight or a fused gate_up_proj",
    )
