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
