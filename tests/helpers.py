"""Shared test helpers: a reference transformers model, a budget holding N slots per layer,
and a Ctrl-C at a chosen line."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch

from quant import get_format
from runtime.checkpoint import Checkpoint
from runtime.loader import DEFAULT_CONTEXT, LoadOptions, load_model
from runtime.memory_plan import plan_memory
from runtime.model_spec import describe_model


def reference_model(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # compare fixed-length greedy runs
    return model


def budget_for_slots(path: Path, quant: str, slots_per_layer: int, context: int | None = None) -> int:
    """The --vram that leaves room for exactly ``slots_per_layer`` experts per MoE layer."""
    spec = describe_model(Checkpoint(path))
    ctx = context or min(spec.config.max_position_embeddings, DEFAULT_CONTEXT)
    fmt = get_format(quant)
    free = plan_memory(spec, fmt, budget=None, dtype=torch.float32, context=ctx)
    fixed = free.non_expert + free.kv_cache + free.workspace
    return fixed + slots_per_layer * len(spec.moe_layers) * free.expert_bytes


def load_small(path: Path, quant: str = "none", slots_per_layer: int = 2, **kw):
    vram = budget_for_slots(path, quant, slots_per_layer)
    return load_model(str(path), LoadOptions(quant=quant, vram=vram, device="cpu", **kw))


def greedy_ids(model, prompt: list[int], n: int) -> list[int]:
    x = torch.tensor([prompt])
    # An explicit mask: without one, generate() masks every token equal to pad_token_id,
    # and the bundled model's BOS is its pad token (<|endoftext|>), as in GPT-2.
    out = model.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


@contextmanager
def interrupt_at_line(n: int, filename: str) -> Iterator[SimpleNamespace]:
    """Raise KeyboardInterrupt at the ``n``-th line run in files whose name ends with
    ``filename`` inside the block, as a Ctrl-C landing there would; the interrupt ends the
    block, and the yielded object's ``finished`` says whether the block ran to its end
    first (then ``n`` is past the last line it reaches)."""
    run = SimpleNamespace(finished=False, lines=0)

    def tracer(frame, event, arg):
        if not frame.f_code.co_filename.endswith(filename):
            return None
        if event == "line":
            run.lines += 1
            if run.lines == n:
                raise KeyboardInterrupt
        return tracer

    sys.settrace(tracer)
    try:
        yield run
        run.finished = True
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
