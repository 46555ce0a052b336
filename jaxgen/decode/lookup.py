"""Prompt lookup's drafter: the continuation of the row's last n-gram from earlier text.

Drafts cost no model call: the k tokens that followed the latest earlier occurrence of
the row's last n tokens (in its prompt or its text so far) are proposed, and the target
checks them in one pass (decode/speculative.py). Input-grounded generation (editing,
rewriting, answering from a passage) copies spans of its prompt, which this finds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.decode import sampling


def lookup(
    tokens: jax.Array,
    valid: jax.Array,
    end: jax.Array,
    k: int,
    max_ngram: int,
    resume=None,
    min_ngram: int = 1,
):
    """Prompt-lookup drafts: the k tokens after the latest earlier match of the row's last
    n tokens, for the longest n in [min_ngram, max_ngram] that matches; where nothing
    matches, the k tokens from slot `resume` (when it is in the text).

    Why `resume`: in a rewrite of the prompt (an edit, a translation of a few words) the
    target swaps a token of the source for one of its own, which occurs nowhere before, and
    then goes on copying. Replaying this lookup on the edit benchmark's greedy outputs
    (benchmarks/RESULTS.md), a fifth of the rounds found no match, and resuming the last
    copy one token further on raised the tokens kept per pass from 2.97 to 3.43 (k = 4).

    Args:
        tokens, valid: [B, W] rows from slot 0; end: [B] text lengths; resume: [B] int32
            slots (-1 or past the text: none), or None.
    Returns:
        drafts [B, k] int32 (slots past the text give whatever is there: they are only
        guesses), found [B] bool, and the slot of each row's first draft [B] int32.
    """
    b, w = tokens.shape
    found = jnp.zeros((b,), bool)
    start = jnp.zeros((b,), jnp.int32)
    for n in range(min(max_ngram, w), min_ngram - 1, -1):  # no n-gram is longer than the rows
        last, ok = sampling.last_tokens(tokens, valid, end, n)  # [B, n]
        width = w - n + 1  # n-gram start slots
        # A match must end before the row's last token, so that a continuation exists.
        match = ok[:, None] & sampling.before(width, end - n)  # [B, width]
        for i in range(n):
            match &= tokens[:, i : i + width] == last[:, i : i + 1]
        latest = jnp.max(jnp.where(match, jnp.arange(width), -1), axis=1)  # [B]
        hit = (latest >= 0) & ~found
        start = jnp.where(hit, latest + n, start)
        found |= hit
    if resume is not None:
        resumed = ~found & (resume >= 0) & (resume < end)
        start = jnp.where(resumed, resume, start)
        found |= resumed
    slots = jnp.minimum(start[:, None] + jnp.arange(k), w - 1)
    return jnp.take_along_axis(tokens, slots, axis=1), found, start
