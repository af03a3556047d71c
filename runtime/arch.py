"""Supported architectures, chosen by ``model_type`` in config.json (never by a name).

transformers (v5) builds every one of these with an ``mlp.experts`` module whose
``forward(hidden_states, top_k_index, top_k_weights)`` promoe replaces. What differs is
only how the checkpoint on disk names things, which :class:`ArchSpec` records:

* where the experts sit on disk (``block_sparse_moe`` for Mixtral and PhiMoE, ``mlp``
  elsewhere) and their per-expert names (``w1/w3/w2`` or ``gate/up/down_proj``);
* renames from disk keys to module keys for the non-expert weights.

Fused on-disk layouts (``experts.gate_up_proj [E, ...]``, as GPT-OSS ships) are found by
key, for any architecture; whether they are transposed is read from the transformers
experts module itself (its ``is_transposed`` flag).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from runtime.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    name: str
    #: on-disk module name of the MoE block under ``model.layers.N``
    disk_block: str = "mlp"
    #: on-disk per-expert projection names: (gate, up, down)
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    #: (regex, replacement) applied in order to non-expert disk keys -> module keys
    renames: tuple[tuple[str, str], ...] = field(default=())

    def disk_experts_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.disk_block}.experts"

    def to_module_key(self, disk_key: str) -> str:
        for pattern, repl in self.renames:
            disk_key = re.sub(pattern, repl, disk_key)
        return disk_key


_MIXTRAL_STYLE = dict(
    disk_block="block_sparse_moe",
    expert_names=("w1", "w3", "w2"),
    renames=((r"\.block_sparse_moe\.", ".mlp."),),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in [
        ArchSpec("mixtral", "Mixtral", **_MIXTRAL_STYLE),
        ArchSpec("qwen2_moe", "Qwen2-MoE"),
        ArchSpec("qwen3_moe", "Qwen3-MoE"),
        ArchSpec("olmoe", "OLMoE"),
        ArchSpec("deepseek_v2", "DeepSeek-V2"),
        ArchSpec("deepseek_v3", "DeepSeek-V3"),
        ArchSpec(
            "phimoe",
            "PhiMoE",
            disk_block="block_sparse_moe",
            expert_names=("w1", "w3", "w2"),
            renames=((r"\.block_sparse_moe\.", ".mlp."), (r"\.mlp\.gate\.weight$", ".mlp.router.weight")),
        ),
        ArchSpec("gpt_oss", "GPT-OSS"),
    ]
}


def get_arch(model_type: str | None) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type or ""]
    except KeyError:
        supported = ", ".join(ARCHITECTURES)
        what = (
            f"model_type '{model_type}' is not supported" if model_type else "config.json has no model_type"
        )
        raise UnsupportedArchitectureError(
            what,
            hint=f"promoe runs these architectures (config.json model_type): {supported}",
        ) from None
