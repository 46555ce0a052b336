"""The Python API: `jaxgen.load(path)` -> `LanguageModel` with `.logits` and `.generate`.

    lm = jaxgen.load("runs/tiny")                  # a run directory (or an HF model directory)
    [r] = lm.generate(["Once upon a time"], max_new_tokens=32, temperature=0.8, top_p=0.9)
    r.text, r.tokens, r.finish_reason

Options mirror `GenerateConfig` (the run config's `generate` section gives the defaults).
The CLI is a thin layer over this module.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import zlib
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pydantic

from jaxgen.config import Config, GenerateConfig
from jaxgen.decode import beam, loop, sampling
from jaxgen.errors import JaxgenError

Prompt = str | Sequence[int]
# Options that are not sampling settings but may be passed to `generate`.
_EXTRA_OPTIONS = ("max_length",)


@dataclasses.dataclass
class GenerationResult:
    """One prompt's output: `num_return_sequences` completions, best first for beams."""

    prompt_tokens: list[int]
    completions: list[list[int]]  # token ids (final eos / stop sequence excluded)
    texts: list[str] | None  # None without a tokenizer
    finish_reasons: list[str]  # "length", "eos" or "stop"
    scores: list[float] | None = None  # beam search: HF's sequences_scores

    @property
    def tokens(self) -> list[int]:
        return self.completions[0]

    @property
    def text(self) -> str | None:
        return None if self.texts is None else self.texts[0]

    @property
    def finish_reason(self) -> str:
        return self.finish_reasons[0]


def row_id(key) -> int:
    """A stable 31-bit row identity for sampling keys (the same for a prompt id on every run)."""
    return zlib.crc32(str(key).encode("utf-8")) & 0x7FFFFFFF


@dataclasses.dataclass(frozen=True)
class Plan:
    """Resolved options of one `generate` call."""

    options: GenerateConfig
    spec: loop.DecodeSpec
    max_new_tokens: int
    max_length: int | None  # when given, wins over max_new_tokens (HF: the prompt counts)
    stop_texts: tuple[str, ...]


class LanguageModel:
    """A model ready to score and sample text.

    Args:
        config: the run's Config (model shape, generate defaults).
        params: the unboxed param tree, stacked or in the serving layout (placed with the
            model's shardings on `mesh`).
        tokenizer: optional; without one, prompts and outputs are token ids.
        mesh: shard generation batches over its data axes (None: one device).
    """

    def __init__(self, config: Config, params, tokenizer=None, mesh=None):
        from jaxgen.model.serving import unstack_layers

        self.config, self.tokenizer, self.mesh = config, tokenizer, mesh
        # The one copy of the weights this object keeps, in the serving layout (one array
        # per layer, jaxgen/model/serving.py) that decoding needs and scoring accepts.
        self.serving_params = unstack_layers(params, config.model)

    @property
    def params(self):
        """The stacked (checkpoint-layout) param tree, rebuilt from `serving_params` on each
        access (a copy: for export, not for the hot path)."""
        from jaxgen.model.serving import stack_layers

        return stack_layers(self.serving_params)

    # ------------------------------------------------------------------ scoring

    @functools.cached_property
    def _forward(self):
        from jaxgen.model.serving import ServingTransformer

        model = ServingTransformer(self.config.model)

        def run(params, tokens):
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
            return model.apply({"params": params}, tokens, positions)[0].astype(jnp.float32)

        return jax.jit(run)

    def logits(self, token_ids) -> np.ndarray:
        """Next-token logits of every position: int token ids [B, T] -> float32 [B, T, V]."""
        tokens = np.asarray(token_ids, dtype=np.int32)
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise JaxgenError(
                f"token_ids: expected a non-empty [batch, length] array, got shape {tokens.shape}"
            )
        if tokens.shape[1] > self.config.model.max_len:
            raise JaxgenError(
                f"token_ids: length {tokens.shape[1]} exceeds max_len={self.config.model.max_len}"
            )
        with loop.mesh_context(self.mesh):
            return np.asarray(self._forward(self.serving_params, tokens))

    # ------------------------------------------------------------------ generation

    def plan(self, **options) -> Plan:
        """Validates options over the config's `generate` defaults."""
        unknown = set(options) - set(GenerateConfig.model_fields) - set(_EXTRA_OPTIONS)
        if unknown:
            raise JaxgenError(f"generate: unknown option {sorted(unknown)[0]!r}")
        options = {k: v for k, v in options.items() if v is not None}
        max_length = options.pop("max_length", None)
        try:
            opts = GenerateConfig.model_validate({**self.config.generate.model_dump(), **options})
        except pydantic.ValidationError as e:
            err = e.errors()[0]
            key = ".".join(map(str, err["loc"])) or "generate"
            raise JaxgenError(f"{key}: {err['msg'].removeprefix('Value error, ')}") from None
        strategy = sampling.make_strategy(
            temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p, min_p=opts.min_p,
            num_beams=opts.num_beams, num_return_sequences=opts.num_return_sequences,
            length_penalty=opts.length_penalty, early_stopping=opts.early_stopping,
        )  # fmt: skip
        vocab_limit = None if self.tokenizer is None else self.tokenizer.vocab_size
        processors = sampling.Processors(
            opts.repetition_penalty,
            opts.no_repeat_ngram_size,
            tuple(self._encode_piece(b) for b in opts.banned),
            vocab_limit if vocab_limit is not None and vocab_limit < self.config.model.vocab_size else None,
        )
        sampling.check_processors(processors, self.config.model.vocab_size)
        eos = () if self.tokenizer is None or self.tokenizer.eos_id is None else (self.tokenizer.eos_id,)
        stopping = sampling.Stopping(eos, tuple(self._encode_piece(s) for s in opts.stop))
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise JaxgenError(f"max_length: {max_length!r} must be a positive integer")
        most = opts.max_new_tokens if max_length is None else max_length  # an upper bound of new tokens
        spec = loop.DecodeSpec(strategy, processors, stopping, buffer=loop.bucket(most))
        return Plan(opts, spec, opts.max_new_tokens, max_length, tuple(opts.stop))

    def _encode_piece(self, text: str) -> tuple[int, ...]:
        if self.tokenizer is None:
            raise JaxgenError(f"stop/banned {text!r}: needs a tokenizer (this model has none)")
        ids = tuple(self.tokenizer.encode(text))
        if not ids:
            raise JaxgenError(f"stop/banned {text!r}: encodes to no tokens")
        return ids

    def encode_prompt(self, prompt: Prompt, opts: GenerateConfig, where: str) -> list[int]:
        """Control prefix + prompt as token ids; an empty prompt becomes the bos token."""
        prefix = "".join(opts.control_template.format(key=k, value=v) for k, v in opts.control.items())
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise JaxgenError(f"{where}: a text prompt needs a tokenizer (pass token ids instead)")
            ids = self.tokenizer.encode(prefix + prompt)
        else:
            ids = [int(t) for t in prompt]
            if prefix:
                ids = list(self._encode_piece(prefix)) + ids
            if any(not 0 <= t < self.config.model.vocab_size for t in ids):
                raise JaxgenError(f"{where}: token ids outside [0, {self.config.model.vocab_size})")
        if not ids:
            bos = None if self.tokenizer is None else self.tokenizer.bos_id
            if bos is None:
                raise JaxgenError(f"{where}: empty prompt and the tokenizer has no bos token to start from")
            ids = [bos]
        return ids

    def _fit(self, ids: list[int], new: int, opts: GenerateConfig, where: str) -> list[int]:
        room = self.config.model.max_len - new
        if len(ids) <= room:
            return ids
        if opts.truncate_prompt and room > 0:
            return ids[-room:]
        loop.check_room(self.config.model, len(ids), new, where)
        return ids

    def generate(self, prompts: Sequence[Prompt], *, row_ids=None, **options) -> list[GenerationResult]:
        """Completes every prompt; results in the prompts' order.

        Args:
            prompts: strings (needs a tokenizer) or token-id lists.
            row_ids: per-prompt identities seeding sampling (default: the prompt's index),
                so a prompt's text depends only on (seed, row id), not on its batch.
            **options: any `GenerateConfig` field (max_new_tokens, temperature, top_k, top_p,
                min_p, repetition_penalty, no_repeat_ngram_size, banned, num_beams,
                num_return_sequences, length_penalty, early_stopping, stop, seed, control)
                or `max_length` (prompt included, as in Hugging Face).
        """
        if isinstance(prompts, str):
            raise JaxgenError("prompts: expected a list of prompts, got one string (wrap it in a list)")
        plan = self.plan(**options)
        row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
        encoded = [
            self.encode_prompt(p, plan.options, f"prompt {r}") for p, r in zip(prompts, row_ids, strict=True)
        ]
        results: list[GenerationResult | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
        size = plan.options.batch_size
        for start in range(0, len(order), size):
            idx = order[start : start + size]
            batch = self._generate_batch([encoded[i] for i in idx], [row_ids[i] for i in idx], plan)
            for i, result in zip(idx, batch, strict=True):
                results[i] = result
        return results

    def _resolve_new(self, plan: Plan, prompts: list[list[int]]) -> int:
        if plan.max_length is None:
            return plan.max_new_tokens
        longest = max(len(p) for p in prompts)
        if plan.max_length <= longest:  # HF: max_length counts the (padded) prompt
            raise JaxgenError(f"max_length: {plan.max_length} leaves no room after a {longest}-token prompt")
        return plan.max_length - longest

    def _generate_batch(self, prompts, row_ids, plan: Plan) -> list[GenerationResult]:
        new = self._resolve_new(plan, prompts)
        prompts = [
            self._fit(p, new, plan.options, f"prompt {r}") for p, r in zip(prompts, row_ids, strict=True)
        ]
        kw = dict(max_new_tokens=new, mesh=self.mesh, buckets=plan.options.prompt_buckets)
        if isinstance(plan.spec.strategy, sampling.BeamSearch):
            rows = beam.beam_ids(self.config.model, self.serving_params, prompts, plan.spec, **kw)
        else:
            ids = [row_id(r) for r in row_ids]
            rows = loop.generate_ids(
                self.config.model,
                self.serving_params,
                prompts,
                plan.spec,
                seed=plan.options.seed,
                row_ids=ids,
                **kw,
            )
            rows = [[c] for c in rows]
        return [self._result(p, cs, plan) for p, cs in zip(prompts, rows, strict=True)]

    def _result(self, prompt: list[int], completions: list[loop.Completion], plan: Plan) -> GenerationResult:
        tokens = [c.tokens for c in completions]
        reasons = [c.finish_reason for c in completions]
        texts = None
        if self.tokenizer is not None:
            texts = [continuation(self.tokenizer, prompt, t) for t in tokens]
            for j, text in enumerate(texts):  # a stop string the token match missed (other tokenization)
                texts[j], stopped = cut_at_stop(text, plan.stop_texts)
                reasons[j] = "stop" if stopped else reasons[j]
        scores = [c.score for c in completions] if completions[0].score is not None else None
        return GenerationResult(prompt, tokens, texts, reasons, scores)

    def stream(self, prompt: Prompt, *, chunk: int = 8, **options) -> Iterator[str | list[int]]:
        """Yields the completion of one prompt piece by piece (text with a tokenizer, else ids).

        Decoding runs `chunk` steps inside jit between yields; sampling only (no beams).
        The pieces add up to `generate`'s text: text that could begin a stop string is held
        back until it is decided.
        """
        plan = self.plan(**options)
        if isinstance(plan.spec.strategy, sampling.BeamSearch):
            raise JaxgenError("num_beams: streaming needs num_beams=1")
        ids = self.encode_prompt(prompt, plan.options, "prompt")
        new = self._resolve_new(plan, [ids])
        ids = self._fit(ids, new, plan.options, "prompt")
        tokens: list[int] = []
        shown = text = ""
        for pieces in loop.stream_ids(
            self.config.model, self.serving_params, [ids], plan.spec, max_new_tokens=new, chunk=chunk,
            seed=plan.options.seed, row_ids=[row_id(0)], mesh=self.mesh, buckets=plan.options.prompt_buckets,
        ):  # fmt: skip
            tokens += pieces[0]
            if self.tokenizer is None:
                yield pieces[0]
                continue
            text, stopped = cut_at_stop(continuation(self.tokenizer, ids, tokens), plan.stop_texts)
            visible = text if stopped else text[: len(text) - _stop_text_prefix(text, plan.stop_texts)]
            if visible.startswith(shown) and len(visible) > len(shown):
                yield visible[len(shown) :]
                shown = visible
            if stopped:
                return
        if text.startswith(shown) and len(text) > len(shown):  # a held tail that began no stop string
            yield text[len(shown) :]


def continuation(tokenizer, prompt: Sequence[int], tokens: Sequence[int]) -> str:
    """The text `tokens` add after `prompt`.

    Decoded with the prompt, as Hugging Face's pipelines do: decoding the completion alone
    drops its leading space with SentencePiece tokenizers that add a dummy prefix (Llama's).
    """
    head = tokenizer.decode(list(prompt))
    whole = tokenizer.decode([*prompt, *tokens])
    return whole[len(head) :] if whole.startswith(head) else tokenizer.decode(list(tokens))


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop string in it, and whether there was one."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _stop_text_prefix(text: str, stops: Sequence[str]) -> int:
    """The length of the longest tail of `text` that begins some stop string."""
    return max((h for s in stops for h in range(1, len(s)) if text.endswith(s[:h])), default=0)


def load(
    path: str | pathlib.Path, *, step: int | None = None, dtype: str | None = None, mesh=None
) -> LanguageModel:
    """Loads a run directory (config.yaml + checkpoints) or a Hugging Face model directory.

    Args:
        step: checkpoint step (default: the latest).
        dtype: cast params, e.g. "bfloat16" for serving.
        mesh: where to place params and shard batches (default: all devices, data parallel).
    """
    from jaxgen.convert.hf import find_tokenizer

    path = pathlib.Path(path)
    if not path.is_dir():
        raise JaxgenError(f"{path}: not a run directory")
    if (path / "config.json").exists() and not (path / "config.yaml").exists():
        from jaxgen.convert.hf import default_mesh, load_hf

        mesh = mesh or default_mesh()
        config, params, tokenizer = load_hf(path, dtype=dtype, mesh=mesh, serving=True)
        return LanguageModel(config, params, tokenizer, mesh)
    from jaxgen.checkpoint import load_params
    from jaxgen.config import MeshConfig
    from jaxgen.runtime.mesh import make_mesh

    mesh = mesh or make_mesh(MeshConfig())
    config, params = load_params(path, step=step, mesh=mesh, dtype=dtype)
    return LanguageModel(config, params, find_tokenizer(path), mesh)
