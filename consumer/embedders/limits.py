"""Cutting texts into requests an embedding API accepts, without its tokenizer.

The exact tokenizer of a remote model is not available offline (OpenAI's BPE, a self-hosted model's
WordPiece), so tokens are over-estimated from UTF-8 bytes: BPE and WordPiece vocabularies average about
4 bytes of English prose per token and at least 3 per CJK character, so 2 bytes per token stays above
the real count for all but pathological inputs (long runs of digits or symbols), where the server's
own 400 then dead-letters the one input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

BYTES_PER_TOKEN = 2


def estimated_tokens(text: str) -> int:
    return max(math.ceil(len(text.encode()) / BYTES_PER_TOKEN), 1)


def truncate_to_tokens(text: str, max_tokens: int) -> str:
    """The text cut (at a character boundary) to at most `max_tokens` estimated tokens."""
    budget = max_tokens * BYTES_PER_TOKEN
    raw = text.encode()
    if len(raw) <= budget:
        return text
    return raw[:budget].decode(errors="ignore")


def plan_requests(texts: Sequence[str], max_inputs: int, max_tokens: int) -> list[list[int]]:
    """Indices of the texts, in order, cut into requests of at most `max_inputs` inputs and
    `max_tokens` estimated tokens (a text over the token budget goes alone)."""
    requests: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for index, text in enumerate(texts):
        cost = estimated_tokens(text)
        if current and (len(current) >= max_inputs or tokens + cost > max_tokens):
            requests.append(current)
            current, tokens = [], 0
        current.append(index)
        tokens += cost
    if current:
        requests.append(current)
    return requests
