"""A chat conversation, and fitting it into the context the memory plan made room for.

The REPL keeps a :class:`Conversation` (a system prompt and the turns since) and, before
each answer, asks :func:`fit_to_context` which turns still fit: a turn is a user message
and the answer to it. The oldest turns are dropped first, a quarter of the context's worth
beyond what is needed where possible (so the next turns extend the KV cache the chat keeps
instead of computing the conversation again); the system prompt and the new message are
always kept. Room is left for the answer: ``max_new_tokens``, or half the
context if that is smaller (so a small context keeps some history); the answer is then
capped at whatever room is left, so prompt + answer never exceed the plan's KV cache.

Nothing here knows about terminals: the caller passes an ``encode(messages) -> ids``
function (the model's chat template, see :func:`encoder`) and renders what comes back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from runtime.errors import PromoeError, UsageError

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}
Encode = Callable[[Sequence[Message]], list[int]]


class PromptTooLongError(UsageError):
    """The new message alone (with the system prompt) leaves no room for an answer."""

    def __init__(self, prompt_tokens: int, limit: int, model_max: int | None = None) -> None:
        if model_max is not None and limit >= model_max:
            hint = f"send a shorter message: {model_max} tokens is all this model can attend to"
        else:
            most = f", up to {model_max}" if model_max else ""
            hint = f"send a shorter message, or start promoe with a larger --context{most} (it costs KV-cache memory)"
        super().__init__(f"the prompt is {prompt_tokens} tokens; the context holds {limit}", hint=hint)
        self.prompt_tokens = prompt_tokens
        self.limit = limit


class ChatTemplateError(PromoeError):
    """The model's chat template refused the conversation (e.g. it has no system role)."""


@dataclass(frozen=True)
class Fit:
    messages: list[Message]  # what the model will see
    prompt_ids: list[int]  # ``encode(messages)``
    dropped_turns: int  # oldest turns left out
    max_new_tokens: int  # the answer's cap: the asked-for one, or the room left if smaller


def split_turns(messages: Sequence[Message]) -> tuple[list[Message], list[list[Message]]]:
    """Leading system messages, and the rest grouped into turns each starting at a user message."""
    head = 0
    while head < len(messages) and messages[head]["role"] == "system":
        head += 1
    turns: list[list[Message]] = []
    for m in messages[head:]:
        if m["role"] == "user" or not turns:
            turns.append([])
        turns[-1].append(m)
    return list(messages[:head]), turns


def answer_room(limit: int, max_new_tokens: int) -> int:
    """Tokens kept free for the answer when deciding what history fits."""
    return max(1, min(max_new_tokens, limit // 2))


#: when turns must go, enough go to leave this share of the context free beyond the answer's
#: room (where that is possible), so the next turns extend the KV cache kept from answer to
#: answer: dropping one turn at every turn would compute the whole conversation each time
DROP_SLACK = 0.25


def fit_to_context(
    messages: Sequence[Message], encode: Encode, limit: int, max_new_tokens: int, model_max: int | None = None
) -> Fit:
    """Drop the oldest turns until the prompt plus room for the answer fits in ``limit`` tokens.

    When any must go, as many go as leave :data:`DROP_SLACK` of ``limit`` free too, if that
    can be done, else the fewest that fit. The system messages and the last turn (the
    message being answered) are never dropped; if they alone leave no room for a single
    token, :class:`PromptTooLongError`.
    """
    system, turns = split_turns(messages)
    room = answer_room(limit, max_new_tokens)

    tried: dict[int, tuple[list[Message], list[int]]] = {}

    def attempt(drop: int) -> tuple[list[Message], list[int]]:
        if drop not in tried:
            kept = system + [m for turn in turns[drop:] for m in turn]
            tried[drop] = kept, encode(kept)
        return tried[drop]

    def fits(drop: int, slack: int = 0) -> bool:
        return len(attempt(drop)[1]) + room + slack <= limit

    def fewest(slack: int) -> int:
        # the prompt only shrinks as turns go: bisect for the fewest drops that fit
        lo, hi = 0, max(len(turns) - 1, 0)  # never drop the last turn
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(mid, slack):
                hi = mid
            else:
                lo = mid + 1
        return lo

    dropped = 0
    if not fits(0):
        slack = int(limit * DROP_SLACK)
        dropped = fewest(slack)
        if not fits(dropped, slack):
            dropped = fewest(0)
    kept, ids = attempt(dropped)
    if len(ids) >= limit:
        raise PromptTooLongError(len(ids), limit, model_max)
    return Fit(kept, ids, dropped, min(max_new_tokens, limit - len(ids)))


def encoder(tokenizer, chat_template: bool = True) -> Encode:
    """``encode(messages) -> ids`` with the model's chat template; template errors become ChatTemplateError."""
    from runtime.generate import encode_messages

    def encode(messages: Sequence[Message]) -> list[int]:
        try:
            return encode_messages(tokenizer, messages, chat_template)
        except Exception as exc:  # jinja2's TemplateError, raised by templates on purpose (raise_exception)
            if type(exc).__module__.startswith("jinja2"):
                raise ChatTemplateError(
                    f"the model's chat template refused this conversation: {exc}",
                    hint="drop the system prompt (/system none), or start with --no-chat-template",
                ) from None
            raise

    return encode


@dataclass
class Conversation:
    """The system prompt and the turns so far, as chat-template messages."""

    system: str | None = None
    turns: list[Message] = field(default_factory=list)  # user/assistant messages, oldest first

    def messages(self) -> list[Message]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + list(self.turns)

    def ask(self, text: str) -> None:
        self.turns.append({"role": "user", "content": text})

    def answer(self, text: str) -> None:
        self.turns.append({"role": "assistant", "content": text})

    def retract(self) -> None:
        """Take back the last user message (its answer never came)."""
        if self.turns and self.turns[-1]["role"] == "user":
            self.turns.pop()

    def drop_oldest(self, n: int) -> None:
        _, turns = split_turns(self.turns)
        self.turns = [m for turn in turns[n:] for m in turn]

    def reset(self) -> None:
        """Forget the turns; the system prompt stays."""
        self.turns.clear()

    @property
    def num_turns(self) -> int:
        return len(split_turns(self.turns)[1])

    def prepare(self, encode: Encode, limit: int, max_new_tokens: int, model_max: int | None = None) -> Fit:
        """Fit the conversation (last message included) to ``limit``, dropping old turns for good."""
        fit = fit_to_context(self.messages(), encode, limit, max_new_tokens, model_max)
        if fit.dropped_turns:
            self.drop_oldest(fit.dropped_turns)
        return fit


def model_positions(lm) -> int | None:
    """The most positions the model attends to (``max_position_embeddings``), if it says."""
    return getattr(lm.spec.config, "max_position_embeddings", None)


def context_limit(lm) -> int:
    """Tokens one turn may use: the plan's KV cache, and never more than the model's positions."""
    limit = lm.plan.context
    max_pos = model_positions(lm)
    return min(limit, max_pos) if max_pos else limit
