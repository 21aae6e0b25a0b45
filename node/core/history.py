"""Which earlier turns of a conversation a model is sent (pure logic; the brain counts the tokens).

The rule: the system prompt and the new user message always go. Then the earlier turns of the session
(a user message and its answer, as a pair), newest first, for as long as the whole prompt stays within
the budget: the model's context minus the room kept for the answer (the request's max_tokens, at most
half the context). A turn goes whole or not at all; the turns sent keep their order, oldest first, between
the system prompt and the new message. Tokens are counted with the model's own tokenizer and prompt
format for local models; for a peer's or a cloud model, whose tokenizer this node does not have, they are
estimated at one token per ESTIMATE_CHARS characters plus MESSAGE_OVERHEAD per message.
"""

from __future__ import annotations

ESTIMATE_CHARS = 3  # conservative: English runs ~4 characters per token, code and other scripts fewer
MESSAGE_OVERHEAD = 8  # role markers and separators of a chat template


def answer_reserve(n_ctx: int, max_tokens: int) -> int:
    return max(0, min(max_tokens, n_ctx // 2))


def estimate_tokens(messages: list[dict]) -> int:
    return sum(len(str(m.get("content") or "")) // ESTIMATE_CHARS + MESSAGE_OVERHEAD for m in messages)


def turn_messages(turn: tuple[str, str]) -> list[dict]:
    return [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]


def keep_newest(turn_tokens: list[int], base_tokens: int, budget: int) -> int:
    """How many of the newest turns fit (`turn_tokens` oldest first, each turn's tokens)."""
    total, kept = base_tokens, 0
    for n in reversed(turn_tokens):
        if total + n > budget:
            break
        total += n
        kept += 1
    return kept


def with_history(messages: list[dict], turns: list[tuple[str, str]]) -> list[dict]:
    """`messages` with the turns placed after its leading system messages."""
    lead = 0
    while lead < len(messages) and messages[lead].get("role") in ("system", "developer"):
        lead += 1
    earlier = [m for turn in turns for m in turn_messages(turn)]
    return [*messages[:lead], *earlier, *messages[lead:]]
