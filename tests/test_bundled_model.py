"""The bundled default model: present, small, the default, and exact through promoe."""

from __future__ import annotations

import json

import torch

from runtime.generate import SamplingConfig, encode_prompt, generate
from runtime.resolve import BUNDLED_MODEL, resolve_model
from tests.helpers import greedy_ids, load_small, reference_model


def test_bundled_model_is_the_default_and_small():
    assert (BUNDLED_MODEL / "model.safetensors").is_file(), "the bundled model's weights are missing"
    assert resolve_model(None).path == BUNDLED_MODEL
    size = sum(f.stat().st_size for f in BUNDLED_MODEL.iterdir())
    assert size <= 50 * 10**6, size
    cfg = json.loads((BUNDLED_MODEL / "config.json").read_text())
    assert (
        cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 8 and cfg["num_experts_per_tok"] == 2
    )
    assert cfg["num_hidden_layers"] >= 8
    log = json.loads((BUNDLED_MODEL / "training_log.json").read_text())
    assert log["settings"]["seed"] is not None and len(log["train_curve"]) > 10


def test_greedy_generation_equals_transformers():
    ref = reference_model(BUNDLED_MODEL)
    lm = load_small(BUNDLED_MODEL, quant="none", slots_per_layer=3, predictor="cross-layer")
    try:
        ids = encode_prompt(lm.tokenizer, "def fibonacci(n):", chat_template=False)
        want = greedy_ids(ref, ids, 32)
        done = generate(lm, ids, SamplingConfig(max_new_tokens=32, temperature=0, ignore_eos=True))
        assert done.token_ids == want
        assert lm.cache.stats.total().misses > 0  # really offloaded
        with torch.no_grad():
            x = torch.tensor([ids + want])
            a, b = ref(x).logits, lm.model(x).logits
        assert ((a - b).norm() / a.norm()).item() < 1e-4
    finally:
        lm.close()
