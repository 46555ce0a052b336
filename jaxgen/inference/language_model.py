"""The Python API: `jaxgen.load(path)` -> `LanguageModel` with `.logits` and `.generate`.

    lm = jaxgen.load("runs/tiny")                  # a run directory (or an HF model directory)
    [r] = lm.generate(["Once upon a time"], max_new_tokens=32, temperature=0.8, top_p=0.9)
    r.text, r.tokens, r.finish_reason
    [r] = lm.chat([[{"role": "user", "content": "Hi"}]])  # rendered by the model's chat template

Options mirror `GenerateConfig` (the run config's `generate` section gives the defaults).
The CLI is a thin layer over this module.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.config import Config, GenerateConfig, MeshConfig
from jaxgen.convert.hf import default_mesh, find_tokenizer, load_hf
from jaxgen.data import chat
from jaxgen.decode import loop, refill, request, sampling, speculative
from jaxgen.decode.request import Prompt
from jaxgen.errors import JaxgenError
from jaxgen.model import quant
from jaxgen.model.serving import ServingTransformer, stack_layers, unstack_layers
from jaxgen.runtime.mesh import make_mesh, mesh_context
from jaxgen.tokenizer.text import continuation, cut_at_stop, stop_prefix
from jaxgen.train.finetune import load_run_params, trained_attributes


@dataclasses.dataclass
class GenerationResult:
    """One prompt's output: `num_return_sequences` completions, best first for beams, in
    sample order (`decode.request.sequence_key`) for sampling; the lists are aligned."""

    prompt_tokens: list[int]
    completions: list[list[int]]  # token ids (final eos / stop sequence excluded)
    texts: list[str] | None  # None without a tokenizer
    finish_reasons: list[str]  # "length", "eos" or "stop"
    # Beam search: HF's sequences_scores (sum of log-probs / length ** length_penalty).
    # Sampling and greedy: the sum of the generated tokens' log-probs (eos and stop sequence
    # included) under the distribution each was drawn from, i.e. after the processors and
    # warpers (temperature, top-k/p, min-p), as HF's compute_transition_scores gives them.
    scores: list[float] | None = None

    @property
    def tokens(self) -> list[int]:
        return self.completions[0]

    @property
    def text(self) -> str | None:
        return None if self.texts is None else self.texts[0]

    @property
    def finish_reason(self) -> str:
        return self.finish_reasons[0]


class LanguageModel:
    """A model ready to score and sample text.

    Args:
        config: the run's Config (model shape, generate defaults).
        params: the unboxed param tree, stacked or in the serving layout (placed with the
            model's shardings on `mesh`).
        tokenizer: optional; without one, prompts and outputs are token ids.
        mesh: shard generation batches over its data axes (None: one device).
    """

    def __init__(self, config: Config, params, tokenizer=None, mesh=None, attributes=None, weights=None):

        self.config, self.tokenizer, self.mesh = config, tokenizer, mesh
        # {attribute: values} the model was fine-tuned with (finetune.json); None: unknown.
        self.attributes = attributes
        # The one copy of the weights this object keeps, in the serving layout (one array
        # per layer, jaxgen/model/serving.py) that decoding needs and scoring accepts,
        # stored as `weights` (model/quant.py; None: as given).
        self.weights = weights or config.generate.weights
        # None keeps the weights' dtypes; "float32" does too (model/quant.py), and both put
        # block kernels in the CPU kernel's tiles where it reads them.
        self.serving_params = unstack_layers(params, config.model)
        self._tiles = quant.tiles_for(config.model)
        if quant.converts(self.weights, self._tiles):
            self.serving_params = _convert_weights(
                self.serving_params, self.weights or "float32", self._tiles
            )
        self._other_weights: dict[str, object] = {}
        # What speculative decoding has done since this model was loaded (`jaxgen generate`
        # reports it: whether the drafts pay is the user's question).
        self.speculation_stats = speculative.Stats()

    def params_for(self, weights: str | None):
        """The serving params stored as `weights` (None: as loaded), converted once from the
        loaded ones (a second copy: for comparing, not for serving two formats)."""
        if weights is None or weights == (self.weights or "float32"):
            return self.serving_params
        if weights not in self._other_weights:
            self._other_weights[weights] = _convert_weights(self.serving_params, weights, self._tiles)
        return self._other_weights[weights]

    @property
    def params(self):
        """The stacked (checkpoint-layout) param tree, rebuilt from `serving_params` on each
        access (a copy: for export, not for the hot path)."""

        if self.weights in ("int8", "int8-head"):
            raise JaxgenError(
                "params: loaded with int8 weights for decoding; load without weights= to export"
            )
        return stack_layers(quant.plain_layout(self.serving_params))

    # ------------------------------------------------------------------ scoring

    @functools.cached_property
    def _forward(self):

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
        with mesh_context(self.mesh):
            return np.asarray(self._forward(self.serving_params, tokens))

    # ------------------------------------------------------------------ generation

    def resolve(self, **options) -> request.Request:
        """Validates options over the config's `generate` defaults (loading a speculative draft
        model named by `draft_run` once)."""
        draft = None
        opts = request.validate(
            self.config.generate, **{k: options.get(k) for k in ("speculative", "draft_run")}
        )
        if opts.speculative == "draft" and opts.draft_run is not None:
            draft = self.draft(opts.draft_run).config.model
        req = request.resolve(self.config.generate, self.config.model, self.tokenizer, draft, **options)
        _check_control(req.options.control, self.attributes)
        return req

    def draft(self, path: str) -> LanguageModel:
        """The speculative draft model at `path` (loaded once, on this model's mesh)."""
        drafts = self.__dict__.setdefault("_drafts", {})
        if path not in drafts:
            draft = load(path, mesh=self.mesh)
            _check_same_tokenizer(self.tokenizer, draft.tokenizer, path)
            drafts[path] = draft
        return drafts[path]

    def encode_prompt(self, prompt: Prompt, opts: GenerateConfig, where: str) -> list[int]:
        """Control prefix + prompt as token ids; an empty prompt becomes the bos token."""
        # Fine-tuned on SFT records, the model saw bos first: prompt it the same way.
        bos = self.config.data.format in ("sft", "preference")
        return request.encode_prompt(self.tokenizer, self.config.model, prompt, opts, where, bos=bos)

    def generate(self, prompts: Sequence[Prompt], *, row_ids=None, **options) -> list[GenerationResult]:
        """Completes every prompt; results in the prompts' order.

        Args:
            prompts: strings (needs a tokenizer) or token-id lists.
            row_ids: per-prompt identities seeding sampling (default: the prompt's index),
                so a prompt's text depends only on (seed, row id), not on its batch.
            **options: any `GenerateConfig` field (max_new_tokens, temperature, top_k, top_p,
                min_p, repetition_penalty, no_repeat_ngram_size, banned, num_beams,
                num_return_sequences, length_penalty, early_stopping, stop, seed, control)
                or `max_length` (prompt included, as in Hugging Face). With sampling,
                `num_return_sequences` draws that many independent samples per prompt
                (sample j > 0 of the prompt keyed r samples as the prompt keyed (r, j) would).
        """
        if isinstance(prompts, str):
            raise JaxgenError("prompts: expected a list of prompts, got one string (wrap it in a list)")
        req = self.resolve(**options)
        row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
        encoded = [
            self.encode_prompt(p, req.options, f"prompt {r}") for p, r in zip(prompts, row_ids, strict=True)
        ]
        results: list[GenerationResult | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
        size = req.options.batch_size
        for start in range(0, len(order), size):
            idx = order[start : start + size]
            batch = self._generate_batch([encoded[i] for i in idx], [row_ids[i] for i in idx], req)
            for i, result in zip(idx, batch, strict=True):
                results[i] = result
        return results

    def generate_each(
        self, prompts: Sequence[Prompt], *, row_ids=None, limits=None, sized_for=None, **options
    ):
        """Like `generate`, yielding (prompt index, result) as each prompt completes.

        Plain greedy or sampled decoding of one sequence per prompt runs with continuous
        refill (decode/refill.py: `batch_size` rows, a finished row takes the next prompt at
        once), so prompts of very different lengths keep the batch full; each result is the
        one `generate` gives. Beams, several sequences, `max_length` and speculative
        decoding run `generate` in batches.

        Args:
            limits: each prompt's own `max_new_tokens` (default: the option's, for all).
            sized_for: (prompts, limits) decoded elsewhere that the rows are sized for too
                (rows, prompt and output widths), e.g. the lines of a file's group already
                written: a resumed job then rounds as the whole job did.
        """
        other_prompts, other_limits = ([], []) if sized_for is None else sized_for
        if limits is not None:
            limits = [request.validate(self.config.generate, max_new_tokens=n).max_new_tokens for n in limits]
            # the buffer every row fits in
            options = options | {"max_new_tokens": max([*limits, *other_limits])}
        req = self.resolve(**options)
        row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
        limits = [req.max_new_tokens] * len(prompts) if limits is None else limits
        opts = req.options
        plain = req.speculation is None and req.max_length is None and opts.num_return_sequences == 1
        if not plain or isinstance(req.spec.strategy, sampling.BeamSearch):
            for limit in sorted(set(limits)):  # batches need one length
                idx = [i for i, n in enumerate(limits) if n == limit]
                results = self.generate([prompts[i] for i in idx], row_ids=[row_ids[i] for i in idx],
                                        **options | {"max_new_tokens": limit})  # fmt: skip
                yield from zip(idx, results, strict=True)
            return
        model = self.config.model
        encoded = [
            request.fit_prompt(model, self.encode_prompt(p, opts, f"prompt {r}"), n, opts, f"prompt {r}")
            for p, r, n in zip(prompts, row_ids, limits, strict=True)
        ]
        others = [
            request.fit_prompt(model, self.encode_prompt(p, opts, "prompt"), n, opts, "prompt")
            for p, n in zip(other_prompts, other_limits, strict=True)
        ]
        rows = refill.refill_ids(
            model, self.params_for(opts.weights), encoded, limits, req.spec, batch_size=opts.batch_size,
            seed=opts.seed, row_ids=[request.row_id(r) for r in row_ids],
            shape=(len(encoded) + len(others), max(len(x) for x in encoded + others)),
        )  # fmt: skip
        for i, completion in rows:
            yield i, self._result(encoded[i], [completion], req)

    def _generate_batch(self, prompts, row_ids, req: request.Request) -> list[GenerationResult]:
        model = self.config.model
        draft = None
        if isinstance(req.speculation, speculative.DraftModel):
            # The draft decodes in the format asked of the target (`weights=`): int8 for
            # the one means int8 for both, and a smaller draft costs less per pass.
            draft = self.draft(req.options.draft_run).params_for(req.options.weights)
        params = self.params_for(req.options.weights)
        prompts, rows, stats = request.run_batch(model, params, prompts, row_ids, req, self.mesh, draft)
        if stats is not None:
            self.speculation_stats += stats
        return [self._result(p, cs, req) for p, cs in zip(prompts, rows, strict=True)]

    def _result(
        self, prompt: list[int], completions: list[loop.Completion], req: request.Request
    ) -> GenerationResult:
        tokens = [c.tokens for c in completions]
        reasons = [c.finish_reason for c in completions]
        texts = None
        if self.tokenizer is not None:
            texts = [continuation(self.tokenizer, prompt, t) for t in tokens]
            for j, text in enumerate(texts):  # a stop string the token match missed (other tokenization)
                texts[j], stopped = cut_at_stop(text, req.stop_texts)
                reasons[j] = "stop" if stopped else reasons[j]
        scores = [c.score for c in completions] if completions[0].score is not None else None
        return GenerationResult(prompt, tokens, texts, reasons, scores)

    def stream(self, prompt: Prompt, *, chunk: int = 8, row_id=0, **options) -> Iterator[str | list[int]]:
        """Yields the completion of one prompt piece by piece (text with a tokenizer, else ids).

        Decoding runs `chunk` steps inside jit between yields; one sequence, sampled or
        greedy (no beams). The pieces add up to `generate([prompt], row_ids=[row_id])`'s
        text: text that could begin a stop string is held back until it is decided.
        """
        req = self.resolve(**options)
        if isinstance(req.spec.strategy, sampling.BeamSearch):
            raise JaxgenError("num_beams: streaming needs num_beams=1 (generate returns the beams)")
        if req.options.num_return_sequences > 1:
            raise JaxgenError("num_return_sequences: streaming shows one sequence (generate returns several)")
        if req.speculation is not None:  # one piece: the speculative loop runs to the end in jit
            [result] = self.generate([prompt], row_ids=[row_id], **options)
            yield result.tokens if self.tokenizer is None else result.text
            return
        ids = self.encode_prompt(prompt, req.options, "prompt")
        new = request.new_tokens(req, [ids])
        ids = request.fit_prompt(self.config.model, ids, new, req.options, "prompt")
        tokens: list[int] = []
        shown = text = ""
        for pieces in loop.stream_ids(
            self.config.model, self.params_for(req.options.weights), [ids], req.spec, max_new_tokens=new,
            chunk=chunk,
            seed=req.options.seed, row_ids=[request.row_id(row_id)], mesh=self.mesh,
            buckets=req.options.prompt_buckets,
        ):  # fmt: skip
            tokens += pieces[0]
            if self.tokenizer is None:
                yield pieces[0]
                continue
            text, stopped = cut_at_stop(continuation(self.tokenizer, ids, tokens), req.stop_texts)
            visible = text if stopped else text[: len(text) - stop_prefix(text, req.stop_texts)]
            if visible.startswith(shown) and len(visible) > len(shown):
                yield visible[len(shown) :]
                shown = visible
            if stopped:
                return
        if text.startswith(shown) and len(text) > len(shown):  # a held tail that began no stop string
            yield text[len(shown) :]

    # ------------------------------------------------------------------ chat

    @functools.cached_property
    def chat_format(self) -> chat.ChatTemplate | chat.PlainChat:
        """How conversations become text: the chat template of the tokenizer's directory (a run
        directory or HF model directory), else the run's `data.turn_header` / `turn_separator`."""
        return chat.for_tokenizer(self.tokenizer) or chat.PlainChat.from_data(self.config.data)

    def chat_prompt(self, messages: list[dict], where: str = "messages") -> list[int]:
        """A conversation as the token ids that prompt the next assistant turn.

        Encoded as SFT records are (jaxgen/data/sft.py): the bos id, then each part of the
        render tokenized on its own, so the model is prompted with the tokens it was tuned on.
        """
        if self.tokenizer is None:
            raise JaxgenError(f"{where}: chat needs a tokenizer")
        messages = chat.check_messages(messages, where)
        parts = self.chat_format.parts(messages, self.config.data.trained_role, add_generation_prompt=True)
        ids = [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]
        for piece in self.tokenizer.encode_batch([text for text, _ in parts]):
            ids += piece
        return ids

    def chat(self, conversations: Sequence[list[dict]], *, row_ids=None, **options) -> list[GenerationResult]:
        """Replies to each conversation (a list of {"role", "content"} messages); results in order.

        The conversation is rendered with the generation prompt (`chat_format`) and completed
        as `generate` does; `row_ids` and `options` are `generate`'s.
        """
        if not isinstance(conversations, list | tuple) or any(isinstance(c, dict) for c in conversations):
            raise JaxgenError(
                "conversations: expected a list of conversations, each a list of messages"
                " (wrap one conversation in a list)"
            )
        prompts = [self.chat_prompt(m, f"conversation {i}") for i, m in enumerate(conversations)]
        return self.generate(prompts, row_ids=row_ids, **options)


def load(
    path: str | pathlib.Path, *, step: int | None = None, dtype: str | None = None, mesh=None, weights=None
) -> LanguageModel:
    """Loads a run directory (config.yaml + checkpoints) or a Hugging Face model directory.

    Args:
        step: checkpoint step (default: the latest).
        dtype: cast params, e.g. "bfloat16" for serving.
        mesh: where to place params and shard batches (default: all devices, data parallel).
        weights: "float32", "bfloat16", "int8" or "int8-head": how decoding stores the weights
            (model/quant.py; default: the config's generate.weights, else as stored).
    """

    path = pathlib.Path(path)
    if not path.is_dir():
        raise JaxgenError(f"{path}: not a run directory")
    if (path / "config.json").exists() and not (path / "config.yaml").exists():
        mesh = mesh or default_mesh()
        config, params, tokenizer = load_hf(path, dtype=dtype, mesh=mesh, serving=True)
        return LanguageModel(config, params, tokenizer, mesh, weights=weights)

    mesh = mesh or make_mesh(MeshConfig())
    # A LoRA run's adapters are folded into its base here, once: decoding then runs at
    # the base model's speed (merged == unmerged within float32 rounding, tested).
    config, params = load_run_params(path, step=step, mesh=mesh, dtype=dtype)
    return LanguageModel(config, params, find_tokenizer(path), mesh, trained_attributes(path), weights)


def _check_control(control: dict[str, str], known: dict[str, list[str]] | None) -> None:
    """A control value the model was never tuned on is one line listing the ones it was."""
    if not known:
        return
    for key, value in control.items():
        if value not in known.get(key, []):
            listed = ", ".join(f"{k}={v}" for k, values in known.items() for v in values)
            raise JaxgenError(f"control: {key}={value} was never seen in fine-tuning (known: {listed})")


_convert_weights = jax.jit(quant.serving_weights, static_argnums=(1, 2))


def _check_same_tokenizer(ours, theirs, path) -> None:
    """A speculative draft must turn text into the same ids as the model it drafts for."""
    probe = "The quick brown fox, 1234 times: éß 日本 \n\t end."
    if ours is None or theirs is None:
        if ours is not theirs:
            raise JaxgenError(f"draft_run: {path}: one of the draft and the model has no tokenizer")
        return
    same = (ours.vocab_size, ours.bos_id, ours.eos_id, ours.encode(probe)) == (
        theirs.vocab_size, theirs.bos_id, theirs.eos_id, theirs.encode(probe),
    )  # fmt: skip
    if not same:
        raise JaxgenError(
            f"draft_run: {path}: its tokenizer differs from the model's (vocab {theirs.vocab_size} vs"
            f" {ours.vocab_size}); a draft model must share the target's tokenizer"
        )
