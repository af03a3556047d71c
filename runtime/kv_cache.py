"""The KV cache a transformers model's forward takes, under the name its version uses, and
the one a chat keeps from answer to answer (:class:`PromptCache`).

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


@functools.cache
def sliding_past_recording_works() -> bool:
    """Whether this transformers' sliding-window layers can record their past across forwards.

    From some 5.x on, a layer recording its past returns only the window (and the new
    tokens) to attention, whatever it holds; before (5.17, the lent GPU machines'), it
    returns everything it holds, which the attention mask, sized to the window, refuses.
    Tried once on a layer of 4 tokens' window.
    """
    try:
        from transformers.cache_utils import DynamicSlidingWindowLayer

        layer = DynamicSlidingWindowLayer(sliding_window=4)
        layer.activate_past_recording()
        layer.update(torch.zeros(1, 1, 6, 2), torch.zeros(1, 1, 6, 2))
        keys, _ = layer.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
        return keys.shape[-2] == 4  # the window less one, and the new token
    except Exception:  # another layer API: do without
        return False


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
    hold different lengths.

    A sliding-window layer (gpt-oss) needs only its last ``window - 1`` tokens, but to be cut
    back it must still hold the tokens before the cut. So its past is recorded
    (``activate_past_recording``) and trimmed to the window after every prefill forward and
    whenever the tokens decoded since pass ``decode_room`` (the prefill chunk the memory plan
    leaves room for beside the window): the cache can then be cut back anywhere in the last
    answer, where templates re-render differently (gpt-oss's drops its analysis channel).
    Cutting back further than a layer holds starts afresh, and so does any cut past the window
    where this transformers cannot record a layer's past (:func:`sliding_past_recording_works`).
    """

    def __init__(self, model: torch.nn.Module, decode_room: int | None = None) -> None:
        from runtime.memory_plan import DEFAULT_PREFILL_CHUNK

        self.model = model
        self.decode_room = DEFAULT_PREFILL_CHUNK if decode_room is None else decode_room
        self.ids: list[int] = []  # the tokens whose keys and values the cache holds, in order
        self.kv: object | None = None
        self.kv_args: dict = {}
        self._sliding: list = []  # the cache's sliding-window layers, recording their past

    def reusable(self, prompt_ids: list[int]) -> int:
        """How many leading tokens of ``prompt_ids`` :meth:`begin` would take from the cache."""
        n = 0
        for a, b in zip(self.ids, prompt_ids, strict=False):
            if a != b:
                break
            n += 1
        n = min(n, len(prompt_ids) - 1)
        cut = len(self.ids) - n  # tokens the cache would drop
        if cut and not all(self._can_remove(lay, cut) for lay in self._sliding):
            return 0
        return n

    @staticmethod
    def _can_remove(layer, count: int) -> bool:
        """Whether ``layer`` can drop its last ``count`` tokens and still hold the window before
        them (every token before them, where they are fewer)."""
        if not layer.is_initialized:
            return True
        kept = layer.keys.shape[-2] - count
        return kept >= min(layer.sliding_window - 1, layer.get_seq_length() - count)

    def begin(self, prompt_ids: list[int]) -> int:
        """Hold exactly the reusable prefix of ``prompt_ids``; returns its length (0: a fresh cache)."""
        n = self.reusable(prompt_ids)
        if n > 0 and n < len(self.ids):
            try:
                self.kv.crop(n - len(self.ids))  # a negative count: tokens removed, in every transformers 5.x
            except (RuntimeError, ValueError):  # never expected: reusable() checked every layer can
                n = 0
        if n > 0 and any(layer.get_seq_length() != n for layer in getattr(self.kv, "layers", ())):
            n = 0  # not what it should hold: never guess
        if n == 0:
            self.reset()
            self.kv, self.kv_args = new_kv_cache(self.model)
            self._sliding = [
                lay for lay in getattr(self.kv, "layers", ()) if getattr(lay, "is_sliding", False)
            ]
            if sliding_past_recording_works():
                for lay in self._sliding:
                    lay.activate_past_recording()
        else:
            del self.ids[n:]
        return n

    def fed(self, ids: list[int]) -> None:
        self.ids.extend(ids)
        for lay in self._sliding:  # keep the window, the tokens decoded since (up to decode_room)
            room = 0 if len(ids) > 1 else self.decode_room
            if (
                lay.get_seq_length() >= lay.sliding_window
                and lay.keys.shape[-2] > lay.sliding_window - 1 + room
            ):
                lay.crop(0)  # back to the window: the past before it is gone

    def reset(self) -> None:
        self.ids = []
        self.kv, self.kv_args = None, {}
        self._sliding = []
