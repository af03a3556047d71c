"""Learned expert predictors (ProMoE, arXiv 2410.22134): look several layers ahead.

For each MoE layer i, a small MLP reads the hidden state entering layer i's router and
predicts which experts layers i+1 .. i+d will route to (multi-label, one sigmoid per
expert and offset). Looking d > 1 layers ahead gives a copy several layers of compute
to hide behind, where the cross-layer gate only has one.

Training data is recorded on the user's own prompts (:func:`record_routing`): every MoE
layer's router input and every layer's routed experts, at prefill and decode. The
predictors are saved beside the model's expert stores
(``$PROMOE_HOME/stores/<model>-<hash>/predictor.safetensors`` plus a JSON of settings and
validation recall) and loaded by ``--prefetch learned``. The JSON holds an xxh3-128
checksum of the safetensors file, checked at load: damaged weights (NaN where bytes were
overwritten) are refused as a damaged file rather than used for worse predictions.
"""

# Shape key: N = recorded tokens, D = hidden size, E = experts, L = MoE layers, A = lookahead

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from safetensors.torch import load, save
from torch import nn

from runtime.errors import StoreError, UsageError
from runtime.prefetch import Predictor
from runtime.store_paths import PREDICTOR_FILE, PREDICTOR_META

MIN_PROMPT_TOKENS = 8  # the least --max-prompt-tokens allows: prompts cut shorter all start alike


class LayerPredictor(nn.Module):
    """``h [T, D] -> logits [T, A, E]``: which experts the next A MoE layers will use."""

    def __init__(self, hidden: int, num_experts: int, lookahead: int, width: int) -> None:
        super().__init__()
        self.lookahead, self.num_experts = lookahead, num_experts
        self.net = nn.Sequential(
            nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, lookahead * num_experts)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).view(h.shape[0], self.lookahead, self.num_experts)


class LearnedPredictor(Predictor):
    name = "learned"

    def __init__(
        self, nets: dict[int, LayerPredictor], moe_layers: list[int], top_k: int, extra: int = 0
    ) -> None:
        self.nets = nets
        self.moe_layers = moe_layers
        self._pos = {layer: i for i, layer in enumerate(moe_layers)}
        self.top_k = top_k
        self.extra = extra

    def predict(self, layer, hidden):
        net = self.nets.get(layer)
        if net is None:
            return []
        pos = self._pos[layer]
        probs = torch.sigmoid(net(hidden.to(net.net[0].weight.dtype)).float()).sum(
            dim=0
        )  # [A, E] over tokens
        k = self.top_k + self.extra
        out = []
        ranked_all = probs.argsort(dim=-1, descending=True)[
            :, : max(k * hidden.shape[0], k)
        ].tolist()  # host sync
        for a, ranked in enumerate(ranked_all, start=1):
            if pos + a < len(self.moe_layers):
                out.append((self.moe_layers[pos + a], ranked))
        return out


# -- recording --------------------------------------------------------------------------


def prompt_room(context: int, new_tokens: int, positions: int | None = None) -> int:
    """Prompt tokens a context of ``context`` leaves beside ``new_tokens`` generated ones.

    Refused below :data:`MIN_PROMPT_TOKENS`: prompts cut to a token or two (a chat template's
    first tokens, often) are all alike, so every one records the same greedy sequence. The
    hint suggests a larger context only up to the model's ``positions``.
    """
    room = context - new_tokens - 1  # generation keeps one position back
    if room < MIN_PROMPT_TOKENS:
        left = (
            f"room for only {room} prompt token{'' if room == 1 else 's'}"
            if room > 0
            else "no room for a prompt"
        )
        fewer, more = context - MIN_PROMPT_TOKENS - 1, new_tokens + MIN_PROMPT_TOKENS + 1
        tips = [f"--new-tokens {fewer} or less"] if fewer >= 0 else []
        tips += [f"--context {more} or more"] if positions is None or more <= positions else []
        raise UsageError(
            f"--new-tokens {new_tokens} leaves {left} in a context of {context} tokens (which holds the prompt, "
            f"the new tokens and one more); prompts need at least {MIN_PROMPT_TOKENS} to differ from one another",
            hint="use " + ", or ".join(tips) if tips else f"this model has only {positions} positions",
        )
    return room


@dataclass
class RoutingData:
    """Router inputs and routed experts of every MoE layer for N recorded tokens."""

    hidden: dict[int, torch.Tensor]  # layer -> [N, D] (float32, CPU)
    experts: dict[int, torch.Tensor]  # layer -> [N, K] (int64)

    @property
    def num_tokens(self) -> int:
        return next(iter(self.hidden.values())).shape[0]


def record_routing(lm, prompts: list[list[int]], new_tokens: int = 32, progress=None) -> RoutingData:
    """Run ``prompts`` (token ids) through the offloaded model, greedy ``new_tokens`` each, recording."""
    from runtime.generate import SamplingConfig, generate
    from runtime.offload import RoutingTracer

    rt = lm.runtime
    hidden: dict[int, list[torch.Tensor]] = {layer: [] for layer in lm.spec.moe_layers}
    experts: dict[int, list[torch.Tensor]] = {layer: [] for layer in lm.spec.moe_layers}
    tracer = RoutingTracer()

    def hook(layer: int, h: torch.Tensor) -> None:
        hidden[layer].append(h.detach().float().cpu())

    old_tracer = rt.tracer
    rt.tracer = tracer
    rt.hooks.append(hook)
    try:
        for i, ids in enumerate(prompts):
            tracer.discard()
            done = generate(
                lm, ids, SamplingConfig(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
            )
            if done.finish_reason == "interrupted":  # Ctrl-C: generate() stopped; so does the recording
                raise KeyboardInterrupt
            for layer, idx, _ in tracer.take():
                experts[layer].append(idx)
            if progress:
                progress("Recording routing", i + 1, len(prompts))
    finally:
        rt.hooks.remove(hook)
        rt.tracer = old_tracer
    return RoutingData(
        {layer: torch.cat(v) for layer, v in hidden.items()},
        {layer: torch.cat(v).long() for layer, v in experts.items()},
    )


# -- training -----------------------------------------------------------------------------


def _targets(
    data: RoutingData, moe_layers: list[int], pos: int, lookahead: int, num_experts: int
) -> torch.Tensor:
    """Multi-hot ``[N, A, E]`` of the experts the next A MoE layers used (zero past the last layer)."""
    n = data.num_tokens
    y = torch.zeros(n, lookahead, num_experts)
    for a in range(1, lookahead + 1):
        if pos + a < len(moe_layers):
            y[:, a - 1].scatter_(1, data.experts[moe_layers[pos + a]], 1.0)
    return y


def recall_at_k(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Per offset: fraction of used experts found among the top-k predicted, ``[A]``."""
    top = logits.topk(k, dim=-1).indices
    hit = y.gather(-1, top).sum(dim=(0, 2))
    return hit / y.sum(dim=(0, 2)).clamp_min(1)


def train_predictors(
    data: RoutingData,
    moe_layers: list[int],
    num_experts: int,
    top_k: int,
    lookahead: int = 2,
    width: int = 128,
    epochs: int = 30,
    seed: int = 0,
    progress=None,
) -> tuple[dict[int, LayerPredictor], dict]:
    """Fit one predictor per MoE layer (all but the last); 10% of tokens held out for recall."""
    torch.manual_seed(seed)
    n = data.num_tokens
    perm = torch.randperm(n)
    n_val = max(1, n // 10)
    val, train = perm[:n_val], perm[n_val:]
    nets: dict[int, LayerPredictor] = {}
    report: dict[str, dict] = {}
    t0 = time.perf_counter()
    sources = moe_layers[:-1]
    for i, layer in enumerate(sources):
        pos = moe_layers.index(layer)
        x = data.hidden[layer]  # [N, D]
        y = _targets(data, moe_layers, pos, lookahead, num_experts)  # [N, A, E]
        mask = torch.tensor([pos + a < len(moe_layers) for a in range(1, lookahead + 1)], dtype=torch.float32)
        net = LayerPredictor(x.shape[1], num_experts, lookahead, width)
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
        loss_fn = nn.BCEWithLogitsLoss(reduction="none")
        bs = 256
        for _ in range(epochs):
            for j in range(0, len(train), bs):
                b = train[j : j + bs]
                loss = (loss_fn(net(x[b]), y[b]).mean(dim=-1) * mask).sum() / mask.sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            rec = recall_at_k(net(x[val]), y[val], top_k)
        nets[layer] = net.eval().requires_grad_(False)
        report[str(layer)] = {f"recall@{top_k}_+{a + 1}": round(float(rec[a]), 4) for a in range(lookahead)
                              if mask[a] > 0}  # fmt: skip
        if progress:
            progress("Training predictors", i + 1, len(sources))
    meta = {
        "lookahead": lookahead,
        "width": width,
        "epochs": epochs,
        "seed": seed,
        "tokens": n,
        "validation_tokens": n_val,
        "train_seconds": round(time.perf_counter() - t0, 2),
        "validation": report,
    }
    return nets, meta


# -- persistence ----------------------------------------------------------------------------


def predictor_dir(store_path: Path) -> Path:
    """Beside the expert stores of the model (``stores/<model>-<hash>/``), shared by every quantization."""
    return Path(store_path).parent


def save_predictors(nets: dict[int, LayerPredictor], meta: dict, directory: Path, identity: dict) -> Path:
    """Write the weights and the JSON beside them, each to a temporary file renamed into place.

    The JSON holds the weights' checksum, so a crash between the two renames leaves a pair
    that the loader refuses as damaged, never old settings applied to new weights.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{layer}.{k}": v.contiguous() for layer, net in nets.items() for k, v in net.state_dict().items()
    }
    blob = save(tensors)
    info = {**meta, "layers": sorted(nets), "source": identity, "xxh3_128": xxhash.xxh3_128_hexdigest(blob)}
    weights, settings = directory / (PREDICTOR_FILE + ".tmp"), directory / (PREDICTOR_META + ".tmp")
    weights.write_bytes(blob)
    settings.write_text(json.dumps(info, indent=1))
    weights.replace(directory / PREDICTOR_FILE)
    settings.replace(directory / PREDICTOR_META)
    return directory / PREDICTOR_FILE


class _Damaged(ValueError):
    """The predictor's files parse but fail a check (checksum, finite weights)."""


def load_learned_predictor(
    store_path: Path | None,
    spec,
    extra: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    model_ref: str = "MODEL",
) -> LearnedPredictor:
    """``model_ref``: the model as the user named it, for the hints (train-predictor's argument)."""
    train = f"promoe train-predictor {model_ref}".rstrip()
    directory = predictor_dir(store_path) if store_path is not None else None
    present = [directory is not None and (directory / f).is_file() for f in (PREDICTOR_FILE, PREDICTOR_META)]
    if any(present) and not all(present):  # what `promoe stores` lists as a predictor, half gone
        missing = PREDICTOR_META if present[0] else PREDICTOR_FILE
        raise StoreError(
            f"the learned predictor in {directory} is damaged ({missing} is missing)",
            hint=f"train it again: {train} (or use --prefetch cross-layer)",
        )
    if not all(present):
        raise UsageError(
            "no learned predictor has been trained for this model",
            hint=f"train one on your own prompts: {train} --prompts FILE "
            "(or use --prefetch cross-layer, which needs no training)",
        )
    nets: dict[int, LayerPredictor] = {}
    try:  # reading only: a failure here is the files, not the device
        meta = json.loads((directory / PREDICTOR_META).read_text())
        blob = (directory / PREDICTOR_FILE).read_bytes()
        # written before checksums (no "xxh3_128"): accepted, its weights still checked below
        if "xxh3_128" in meta and xxhash.xxh3_128_hexdigest(blob) != meta["xxh3_128"]:
            raise _Damaged("its checksum does not match")
        tensors = load(blob)
        if not all(bool(t.isfinite().all()) for t in tensors.values()):
            raise _Damaged("some weights are not finite numbers")
        for layer in meta["layers"]:
            net = LayerPredictor(spec.expert_shape.hidden, spec.num_experts, meta["lookahead"], meta["width"])
            net.load_state_dict(
                {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(layer)}
            )
            nets[layer] = net
    except Exception as exc:  # noqa: BLE001 - a truncated file, bad JSON, shapes of another model...
        raise StoreError(
            f"the learned predictor in {directory} is "
            + (f"damaged ({exc})" if isinstance(exc, _Damaged) else f"unreadable ({type(exc).__name__})"),
            hint=f"train it again: {train} (or use --prefetch cross-layer)",
        ) from exc
    nets = {
        layer: net.to(device=device, dtype=dtype).eval().requires_grad_(False) for layer, net in nets.items()
    }
    return LearnedPredictor(nets, spec.moe_layers, spec.top_k, extra)
