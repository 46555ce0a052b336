"""Vocabulary rows: growing the embedding for tokens a fine-tuning run adds, and the rows it trains.

The token embedding [V, D] and the untied output head [D, V] hold one row (column) per
id. Tokens added after pretraining (control tokens such as `<style=formal>`) take the
ids from the old tokenizer's size on; their rows start at the mean of the old tokens'
rows (as transformers' `resize_token_embeddings` does), so a new token starts as an
"average" input and its logit at the average of the old ones, rather than at a random
point the model has never seen. Old rows are never touched.

Under LoRA and freezing the rest of the embedding stays frozen, but the added rows
must train (otherwise two control tokens could never be told apart). They are then a
small trainable tree of their own (`take_rows`), written over the frozen matrix on each
forward pass (`put_rows`), as PEFT's trainable token indices are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.config import ModelConfig


def grow(params, config: ModelConfig, vocab_size: int, first_new: int, count: int):
    """Params for a vocab of `vocab_size` with `count` new tokens from id `first_new`.

    The new tokens' rows, and rows beyond the old vocab (new padding, as transformers
    pads), start at the mean of rows [0, first_new) (the old tokenizer's pieces). Every
    other row (old tokens and old padding) is kept bit for bit.
    """
    if vocab_size < config.vocab_size or first_new + count > vocab_size:
        raise ValueError(f"grow: {first_new} + {count} new rows do not fit a vocab of {vocab_size}")
    out = dict(params)
    grown = lambda table: _grow_rows(table, config.vocab_size, vocab_size, first_new, count)  # noqa: E731
    out["embed"] = {"embedding": grown(params["embed"]["embedding"])}
    if not config.tie_embeddings:
        out["lm_head"] = grown(params["lm_head"].T).T
    return out


def _grow_rows(table: jax.Array, old: int, new: int, first: int, count: int) -> jax.Array:
    """[old, D] -> [new, D]: rows [first, first + count) and [old, new) set to the mean row."""
    mean = jnp.mean(table[:first].astype(jnp.float32), axis=0).astype(table.dtype)  # [D]
    padded = jnp.concatenate([table, jnp.broadcast_to(mean, (new - old, table.shape[1]))], axis=0)
    fresh = (jnp.arange(new) >= first) & (jnp.arange(new) < first + count)  # [V]
    return jnp.where(fresh[:, None], mean, padded)


def take_rows(params, config: ModelConfig, first: int, count: int) -> dict:
    """The rows of ids [first, first + count): {"embed": [n, D], "lm_head": [D, n] (untied)}."""
    rows = {"embed": params["embed"]["embedding"][first : first + count]}
    if not config.tie_embeddings:
        rows["lm_head"] = params["lm_head"][:, first : first + count]
    return rows


def put_rows(params, rows: dict, first: int):
    """`params` with `rows` (from `take_rows`) written at ids [first, ...)."""
    out = dict(params)
    table = params["embed"]["embedding"]
    out["embed"] = {
        "embedding": jax.lax.dynamic_update_slice(table, rows["embed"].astype(table.dtype), (first, 0))
    }
    if "lm_head" in rows:
        head = params["lm_head"]
        out["lm_head"] = jax.lax.dynamic_update_slice(head, rows["lm_head"].astype(head.dtype), (0, first))
    return out
