"""The KV cache a transformers model's forward takes, under the name its version uses.

transformers renamed forward's ``past_key_values`` to ``cache`` during 5.x: 5.24 still
takes the old name but warns that it goes in 5.40, while 5.17 (the lent GPU machines')
knows only the old one. The name is read from the model class's own forward signature,
once per class, so every version in ``pyproject.toml``'s range gets the one it takes.
"""

from __future__ import annotations

import functools
import inspect

import torch


@functools.cache
def _kv_name(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_kv_cache(model: torch.nn.Module) -> tuple[object, dict]:
    """A fresh DynamicCache for ``model`` and the keyword arguments that pass it to forward
    (with ``use_cache=True``): ``model(input_ids=x, **kwargs)``."""
    from transformers import DynamicCache

    kv = DynamicCache(config=model.config)
    return kv, {_kv_name(type(model)): kv, "use_cache": True}


class PromptCache:
    """One conversation's KV cache, kept from one answer to the next (prompt caching).

    A chat sends the whole conversation again at every turn, and all but the newest
    message was computed by the previous answer already: its prompt, then the answer as
    it was generated. :meth:`begin` keeps the longest prefix of the new prompt that the
    cache holds and crops the rest, so only the new tokens are computed; at least one
    token is always left to compute, as its logits choose the next token. Whatever the
    chat template re-renders differently (an answer tokenized another way, an old turn
    dropped to fit the context, a new system prompt) only shortens that prefix.

    :meth:`fed` records what a forward added; :meth:`reset` forgets it all, which the
    caller does when a forward did not finish (Ctrl-C, an error): its layers may then
    hold different lengths. A cache that cannot be cropped exactly (a sliding-window
    layer past its window) starts afresh.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.ids: list[int] = []  # the tokens whose keys and values the cache holds, in order
        self.kv: object | None = None
        self.kv_args: dict = {}

    def reusable(self, prompt_ids: list[int]) -> int:
        """How many leading tokens of ``prompt_ids`` :meth:`begin` would take from the cache."""
        n = 0
        for a, b in zip(self.ids, prompt_ids, strict=False):
            if a != b:
                break
            n += 1
        return min(n, len(prompt_ids) - 1)

    def begin(self, prompt_ids: list[int]) -> int:
        """Hold exactly the reusable prefix of ``prompt_ids``; returns its length (0: a fresh cache)."""
        n = self.reusable(prompt_ids)
        if n > 0 and n < len(self.ids):
            try:
                self.kv.crop(n - len(self.ids))  # a negative count: tokens removed, in every transformers 5.x
            except (RuntimeError, ValueError):  # a sliding-window layer past its window keeps no past
                n = 0
        if n > 0 and any(layer.get_seq_length() != n for layer in getattr(self.kv, "layers", ())):
            n = 0  # not what it should hold: never guess
        if n == 0:
            self.reset()
            self.kv, self.kv_args = new_kv_cache(self.model)
        else:
            del self.ids[n:]
        return n

    def fed(self, ids: list[int]) -> None:
        self.ids.extend(ids)

    def reset(self) -> None:
        self.ids = []
        self.kv, self.kv_args = None, {}
