"""Evaluation: perplexity of a model on text, BLEU / ROUGE of generations against references.

Perplexity reports nats per token, perplexity (exp of it), nats per character and bits
per byte; the last two compare models with different tokenizers. A text file is
tokenized as one stream after an eos token (the document separator the pretraining
data uses), so every token of the text is predicted, and cut into windows of the
model's max_len that do not share context.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

from jaxgen.data import eval_batches, split_stats
from jaxgen.errors import JaxgenError
from jaxgen.metrics import perplexity_figures
from jaxgen.model.loss import projector, token_nll
from jaxgen.model.serving import ServingTransformer
from jaxgen.runtime.mesh import mesh_context


@functools.lru_cache(maxsize=8)
def _nll_fn(config, chunk: int):
    """jit(params, tokens, targets, positions, segment_ids, mask) -> summed NLL (float32) and count.

    The same `token_nll` as training's validation; `params` in either layout (a
    `LanguageModel` keeps the serving one).
    """
    model = ServingTransformer(config)

    def run(params, tokens, targets, positions, segment_ids, mask):
        hidden, _ = model.apply({"params": params}, tokens, positions, segment_ids, return_hidden=True)
        nll, _ = token_nll(projector(config, params), hidden, targets, mask.astype(jnp.float32), chunk)
        return nll, jnp.sum(mask)

    return jax.jit(run)


def _figures(nll: float, tokens: float, chars: int = 0, n_bytes: int = 0) -> dict:
    if tokens == 0:
        raise JaxgenError("perplexity: no tokens to score")
    return perplexity_figures(nll, tokens, chars, n_bytes)


def text_windows(ids: list[int], start_id: int, window: int, batch: int):
    """Yields (tokens, targets, mask) [batch, window] covering `ids` once, preceded by `start_id`."""
    stream = np.asarray([start_id, *ids], np.int32)
    n = len(stream) - 1  # predicted tokens
    rows = -(-n // window)
    inputs = np.zeros((rows * window,), np.int32)
    targets = np.zeros_like(inputs)
    mask = np.zeros(inputs.shape, np.float32)
    inputs[:n], targets[:n], mask[:n] = stream[:-1], stream[1:], 1.0
    inputs, targets, mask = (a.reshape(rows, window) for a in (inputs, targets, mask))
    for i in range(0, rows, batch):
        pad = batch - len(inputs[i : i + batch])  # a fixed batch shape: one compilation
        yield tuple(np.pad(a[i : i + batch], ((0, pad), (0, 0))) for a in (inputs, targets, mask))


def perplexity_of_text(lm, path: str | pathlib.Path, batch_size: int | None = None) -> dict:
    """Scores a UTF-8 text file with `lm` (a LanguageModel with a tokenizer)."""
    path = pathlib.Path(path)
    if lm.tokenizer is None:
        raise JaxgenError(f"{path}: scoring text needs the run's tokenizer (none found)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise JaxgenError(f"{path}: cannot read text ({getattr(e, 'strerror', None) or e})") from None
    start = lm.tokenizer.eos_id if lm.tokenizer.eos_id is not None else lm.tokenizer.bos_id
    if start is None:
        raise JaxgenError(f"{path}: the tokenizer has neither eos nor bos to start the text with")
    cfg = lm.config
    batch = batch_size or cfg.eval.batch_size
    fn = _nll_fn(cfg.model, cfg.train.loss_chunk)
    positions = np.broadcast_to(np.arange(cfg.model.max_len, dtype=np.int32), (batch, cfg.model.max_len))
    total, count = 0.0, 0

    with mesh_context(lm.mesh):
        for tokens, targets, mask in text_windows(lm.tokenizer.encode(text), start, cfg.model.max_len, batch):
            nll, n = fn(lm.serving_params, tokens, targets, positions, (mask > 0).astype(np.int32), mask)
            total, count = total + float(nll), count + int(n)
    return _figures(total, count, len(text), len(text.encode("utf-8")))


def perplexity_of_split(lm, split: str = "validation") -> dict:
    """Scores a prepared split (every token once, via `jaxgen.data.eval_batches`)."""

    cfg = lm.config
    stats = split_stats(cfg, split)
    fn = _nll_fn(cfg.model, cfg.train.loss_chunk)
    total, count = 0.0, 0

    with mesh_context(lm.mesh):
        for i, b in enumerate(eval_batches(cfg, lm.mesh, split)):
            if cfg.eval.max_batches is not None and i >= cfg.eval.max_batches:
                break
            nll, n = fn(
                lm.serving_params, b["tokens"], b["targets"], b["positions"], b["segment_ids"], b["loss_mask"]
            )
            total, count = total + float(nll), count + int(n)
    full = cfg.eval.max_batches is None
    return _figures(total, count, stats.chars if full else 0, stats.bytes if full else 0)


# ----------------------------------------------------------------------------- BLEU / ROUGE


def _read_jsonl(path: pathlib.Path, field_names: tuple[str, ...]) -> dict[str, list[str]]:
    """id -> list of texts from the first of `field_names` present on each line."""
    out: dict[str, list[str]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise JaxgenError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = json.dumps(record["id"])
            name = next(n for n in field_names if n in record)
        except (json.JSONDecodeError, KeyError, TypeError, StopIteration):
            raise JaxgenError(f'{path}:{number}: expected {{"id": ..., "{field_names[0]}": ...}}') from None
        value = record[name]
        texts = value if isinstance(value, list) else [value]
        if not all(isinstance(t, str) for t in texts):
            raise JaxgenError(f"{path}:{number}: {name} must be text")
        out[key] = texts
    return out


def paired(
    predictions: str | pathlib.Path, references: str | pathlib.Path
) -> tuple[list[str], list[list[str]]]:
    """(hypotheses, references per hypothesis) matched by id.

    Predictions are `jaxgen generate` output lines (the first completion; "" when the
    filters dropped them all); references lines hold "reference" or "references".
    """
    preds = _read_jsonl(pathlib.Path(predictions), ("completions", "prediction", "text"))
    refs = _read_jsonl(pathlib.Path(references), ("references", "reference", "text"))
    missing = [k for k in preds if k not in refs]
    if missing:
        raise JaxgenError(
            f"{references}: no reference for {len(missing)} prediction id(s), e.g. {missing[0]}"
        )
    if not preds:
        raise JaxgenError(f"{predictions}: no predictions")
    ids = list(preds)
    return [(preds[k] or [""])[0] for k in ids], [refs[k] for k in ids]


def _need(module: str):
    """An optional dependency (the `eval` extra), or one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise JaxgenError(f"{module} is not installed: pip install 'jaxgen[eval]'") from None


def bleu(hypotheses: list[str], references: list[list[str]]) -> dict:
    """Corpus BLEU (sacrebleu defaults: 13a tokenization, exponential smoothing)."""
    sacrebleu = _need("sacrebleu")
    width = max(len(r) for r in references)
    streams = [[r[i] if i < len(r) else None for r in references] for i in range(width)]
    result = sacrebleu.corpus_bleu(hypotheses, streams)
    return {"bleu": result.score, "precisions": list(result.precisions), "brevity_penalty": result.bp,
            "examples": len(hypotheses), "signature": "sacrebleu corpus_bleu 13a"}  # fmt: skip


def rouge(hypotheses: list[str], references: list[list[str]]) -> dict:
    """Mean ROUGE-1/2/L F1 (rouge-score with stemming; the best reference per example)."""
    rouge_scorer = _need("rouge_score.rouge_scorer")
    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for hyp, refs in zip(hypotheses, references, strict=True):
        scores = scorer.score_multi(refs, hyp)
        for k in kinds:
            totals[k] += scores[k].fmeasure
    return {k: 100.0 * v / len(hypotheses) for k, v in totals.items()} | {"examples": len(hypotheses)}


def write_json(path: str | pathlib.Path, data: dict) -> None:
    """Writes `data` atomically (temp file + rename): never a half-written result."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def print_table(title: str, data: dict) -> None:

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in data.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        elif isinstance(value, list):
            value = ", ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in value)
        table.add_row(key, str(value))
    Console().print(table)
