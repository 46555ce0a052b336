"""`jaxgen bench generate --speculative MODE | --refill`: offline generation speed-ups,
each measured against plain decoding of the same prompts in the same run.

Speculative: batch 1, greedy, one prompt at a time; plain and speculative decoding take
turns (the first side alternates between rounds) and must give identical ids. Lines carry
tokens/s of each side, the speed-up, the drafts' acceptance rate and the tokens kept per
target forward pass.

Refill: a set of prompts whose requested lengths vary `spread`-fold, decoded with
`batch` rows by static batching (batches in file order, each running to its longest
row's length, as the decoding loop must) and by continuous refill (decode/refill.py).
"""

from __future__ import annotations

import json
import pathlib
import statistics
import time

import numpy as np

from jaxgen.decode import loop, refill, request, sampling, speculative


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def read_prompts(path) -> list[str]:
    """The "prompt" of each line of a JSONL file."""
    lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["prompt"] for line in lines if line.strip()]


def speculative_lines(lm, prompts, *, mode: str, new_tokens: int, num_tokens: int | None, max_ngram: int,
                      draft_run: str | None = None, rounds: int = 3):  # fmt: skip
    """One line per round, then a summary line."""
    options = dict(temperature=0.0, max_new_tokens=new_tokens, speculative=mode,
                   num_speculative_tokens=num_tokens, max_ngram=max_ngram, draft_run=draft_run)  # fmt: skip
    req = lm.resolve(**options)
    model, params = lm.config.model, lm.serving_params
    # The draft decodes in the target's weight format, as `jaxgen generate` runs it.
    draft = None if draft_run is None else lm.draft(draft_run).params_for(lm.weights)
    opts = req.options
    encoded = [
        request.fit_prompt(model, lm.encode_prompt(p, opts, "prompt"), new_tokens, opts, "prompt")
        for p in prompts
    ]

    # Both sides pad prompts as `jaxgen generate` would (the run's generate.prompt_buckets).
    kw = dict(max_new_tokens=new_tokens, buckets=opts.prompt_buckets)

    def plain(ids):
        return loop.generate_ids(model, params, [ids], req.spec, **kw)[0], None

    def spec(ids):
        rows, stats = speculative.generate_ids(
            model, params, [ids], req.spec, req.speculation, draft_params=draft, **kw
        )
        return rows[0], stats

    for ids in encoded:  # compile every prompt-length bucket on both sides
        plain(ids), spec(ids)
    speedups, identical = [], True
    for r in range(rounds):
        seconds = {"plain": 0.0, "speculative": 0.0}
        total = speculative.Stats()
        for ids in encoded:
            sides = [("plain", plain), ("speculative", spec)]
            outs = {}
            for name, fn in sides if (r % 2 == 0) else sides[::-1]:
                (row, stats), dt = _timed(lambda fn=fn, ids=ids: fn(ids))
                seconds[name] += dt
                outs[name] = (row, stats)
            identical &= outs["plain"][0].tokens == outs["speculative"][0].tokens
            total += outs["speculative"][1]
        speedups.append(seconds["plain"] / seconds["speculative"])
        yield {
            "setting": f"speculative {mode}",
            "round": r,
            "prompts": len(encoded),
            "new_tokens": new_tokens,
            "num_speculative_tokens": req.speculation.num_tokens,
            "weights": lm.weights or "as stored",
            "first": "plain" if r % 2 == 0 else "speculative",
            "plain_tokens_per_s": total.tokens / seconds["plain"],
            "speculative_tokens_per_s": total.tokens / seconds["speculative"],
            "speedup": speedups[-1],
            "acceptance": total.acceptance,
            "tokens_per_pass": total.tokens_per_pass,
        }
    yield {
        "setting": f"speculative {mode} summary",
        "speedup_median": statistics.median(speedups),
        "speedup_min": min(speedups),
        "speedup_max": max(speedups),
        "ids_identical": identical,
    }


def refill_lines(config, params, *, batch: int, count: int, prompt_len: int, new_tokens: int, spread: int,
                 rounds: int = 3):  # fmt: skip
    """Static batching vs continuous refill on `count` random prompts whose max new tokens
    spread from new_tokens / spread to new_tokens."""
    rng = np.random.default_rng(0)
    cfg = config.model
    prompts = [rng.integers(0, cfg.vocab_size, int(rng.integers(prompt_len // 2, prompt_len + 1))).tolist()
               for _ in range(count)]  # fmt: skip
    limits = rng.integers(max(new_tokens // spread, 1), new_tokens + 1, count).tolist()
    spec = loop.DecodeSpec(sampling.Greedy(), buffer=loop.bucket(new_tokens))

    def static():
        out = []
        for i in range(0, count, batch):
            part = slice(i, i + batch)
            rows = loop.generate_ids(cfg, params, prompts[part], spec, max_new_tokens=max(limits[part]),
                                     row_ids=list(range(i, i + len(prompts[part]))))  # fmt: skip
            out += [r.tokens[:n] for r, n in zip(rows, limits[part], strict=True)]
        return out

    def refilled():
        got = dict(refill.refill_ids(cfg, params, prompts, limits, spec, batch_size=batch))
        return [got[i].tokens for i in range(count)]

    static(), refilled()  # compile
    total = sum(limits)
    speedups, identical = [], True
    for r in range(rounds):
        sides = [("static", static), ("refill", refilled)]
        times, outs = {}, {}
        for name, fn in sides if r % 2 == 0 else sides[::-1]:
            outs[name], times[name] = _timed(fn)
        identical &= outs["static"] == outs["refill"]
        speedups.append(times["static"] / times["refill"])
        yield {
            "setting": "refill",
            "round": r,
            "batch": batch,
            "prompts": count,
            "new_tokens_total": total,
            "limits": f"{min(limits)}-{max(limits)}",
            "static_tokens_per_s": total / times["static"],
            "refill_tokens_per_s": total / times["refill"],
            "speedup": speedups[-1],
        }
    yield {
        "setting": "refill summary",
        "speedup_median": statistics.median(speedups),
        "speedup_min": min(speedups),
        "speedup_max": max(speedups),
        "ids_identical": identical,
    }
