"""One generation request: `GenerateConfig` options -> the decode program, prompts -> token rows.

The options type is `GenerateConfig` (config/schema.py): the config's `generate` section,
the CLI flags, `LanguageModel.generate(**options)` and the training loop's samples are
all that one type, validated here once (`resolve`). What the compiled loop needs of it is
the `DecodeSpec` (strategy, processors, stopping, buffer).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence

import pydantic

from jaxgen.config import GenerateConfig, ModelConfig
from jaxgen.decode import beam, loop, sampling, speculative
from jaxgen.errors import JaxgenError
from jaxgen.tokenizer.text import continuation, control_prefix, cut_at_stop

Prompt = str | Sequence[int]
# Options that are not sampling settings but may be passed to `generate`.
EXTRA_OPTIONS = ("max_length",)


@dataclasses.dataclass(frozen=True)
class Request:
    """Resolved options of one `generate` call."""

    options: GenerateConfig
    spec: loop.DecodeSpec
    max_new_tokens: int
    max_length: int | None  # when given, wins over max_new_tokens (HF: the prompt counts)
    stop_texts: tuple[str, ...]
    speculation: speculative.Speculation | None = None


def row_id(key) -> int:
    """A stable 31-bit row identity for sampling keys (the same for a prompt id on every run)."""
    return zlib.crc32(str(key).encode("utf-8")) & 0x7FFFFFFF


def sequence_key(key, index: int):
    """The row key of sample `index` of the prompt keyed `key` (`num_return_sequences` > 1).

    Sample 0 is the prompt's own key, so asking for more samples keeps the first one; sample
    j > 0 samples as a prompt keyed `(key, j)` would alone: `generate([p], row_ids=[(key, j)])`.
    """
    return key if index == 0 else (key, index)


def validate(defaults: GenerateConfig, **options) -> GenerateConfig:
    """`defaults` with `options` (None: unset) over them, validated by the schema; one-line errors."""
    unknown = set(options) - set(GenerateConfig.model_fields)
    if unknown:
        raise JaxgenError(f"generate: unknown option {sorted(unknown)[0]!r}")
    options = {k: v for k, v in options.items() if v is not None}
    try:
        return GenerateConfig.model_validate({**defaults.model_dump(), **options})
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        key = ".".join(map(str, err["loc"])) or "generate"
        value = err.get("input")
        given = f"{value!r} " if err["loc"] and isinstance(value, int | float | str) else ""
        raise JaxgenError(f"{key}: {given}{err['msg'].removeprefix('Value error, ')}") from None


def resolve(defaults: GenerateConfig, model: ModelConfig, tokenizer=None, draft=None, **options) -> Request:
    """Validates `options` over `defaults` and builds the decode program they describe.

    Args:
        draft: the draft model's ModelConfig when `speculative` is "draft" (loaded by the
            caller from `draft_run`).
    """
    max_length = options.pop("max_length", None)
    opts = validate(defaults, **options)
    strategy = sampling.make_strategy(opts)
    vocab_limit = None if tokenizer is None else tokenizer.vocab_size
    processors = sampling.Processors(
        opts.repetition_penalty,
        opts.no_repeat_ngram_size,
        tuple(encode_piece(tokenizer, b) for b in opts.banned),
        vocab_limit if vocab_limit is not None and vocab_limit < model.vocab_size else None,
    )
    sampling.check_processors(processors, model.vocab_size)
    eos = () if tokenizer is None or tokenizer.eos_id is None else (tokenizer.eos_id,)
    stopping = sampling.Stopping(eos, tuple(encode_piece(tokenizer, s) for s in opts.stop))
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise JaxgenError(f"max_length: {max_length!r} must be a positive integer")
    most = opts.max_new_tokens if max_length is None else max_length  # an upper bound of new tokens
    spec = loop.DecodeSpec(strategy, processors, stopping, buffer=loop.bucket(most))
    speculation = _speculation(opts, draft, None if tokenizer is None else tokenizer.bos_id)
    if speculation is not None:
        speculative.check(speculation, spec, model)
    return Request(opts, spec, opts.max_new_tokens, max_length, tuple(opts.stop), speculation)


def _speculation(
    opts: GenerateConfig, draft: ModelConfig | None, bos: int | None = None
) -> speculative.Speculation | None:
    k = {} if opts.num_speculative_tokens is None else {"num_tokens": opts.num_speculative_tokens}
    if opts.speculative == "prompt_lookup":
        return speculative.PromptLookup(max_ngram=opts.max_ngram, bos_id=bos, **k)
    if opts.speculative == "draft":
        if draft is None:
            raise JaxgenError("speculative: draft needs draft_run (a run or HF directory of a smaller model)")
        return speculative.DraftModel(draft, **k)
    return None


def encode_piece(tokenizer, text: str) -> tuple[int, ...]:
    if tokenizer is None:
        raise JaxgenError(f"stop/banned {text!r}: needs a tokenizer (this model has none)")
    ids = tuple(tokenizer.encode(text))
    if not ids:
        raise JaxgenError(f"stop/banned {text!r}: encodes to no tokens")
    return ids


def encode_prompt(
    tokenizer, model: ModelConfig, prompt: Prompt, opts: GenerateConfig, where: str, *, bos: bool = False
) -> list[int]:
    """[bos] + control prefix + prompt as token ids; an empty prompt becomes the bos token.

    `bos`: start with the bos token, as the SFT records a fine-tuned model learned from
    do (data/sft.py: bos, control tokens, then the text); a prompt that already starts
    with it keeps its own.
    """
    prefix = control_prefix(opts.control, opts.control_template)
    if isinstance(prompt, str):
        if tokenizer is None:
            raise JaxgenError(f"{where}: a text prompt needs a tokenizer (pass token ids instead)")
        ids = tokenizer.encode(prefix + prompt)
    else:
        ids = [int(t) for t in prompt]
        if any(not 0 <= t < model.vocab_size for t in ids):
            raise JaxgenError(f"{where}: token ids outside [0, {model.vocab_size})")
        if prefix:
            start = _bos(tokenizer, ids)  # a chat prompt's bos stays in front of the control tokens
            ids = ids[:start] + list(encode_piece(tokenizer, prefix)) + ids[start:]
    first = None if tokenizer is None else tokenizer.bos_id
    if first is not None and (bos or not ids) and ids[:1] != [first]:
        ids = [first, *ids]
    if not ids:
        raise JaxgenError(f"{where}: empty prompt and the tokenizer has no bos token to start from")
    return ids


def _bos(tokenizer, ids: list[int]) -> int:
    """1 when `ids` starts with the tokenizer's bos token, else 0."""
    return int(tokenizer is not None and tokenizer.bos_id is not None and ids[:1] == [tokenizer.bos_id])


def fit_prompt(model: ModelConfig, ids: list[int], new: int, opts: GenerateConfig, where: str) -> list[int]:
    """The prompt, its oldest tokens dropped if `truncate_prompt` and it leaves no room."""
    room = model.max_len - new
    if len(ids) <= room:
        return ids
    if opts.truncate_prompt and room > 0:
        return ids[-room:]
    loop.check_room(model, len(ids), new, where)
    return ids


def new_tokens(request: Request, prompts: list[list[int]]) -> int:
    """How many tokens to generate for this batch of prompts."""
    if request.max_length is None:
        return request.max_new_tokens
    longest = max(len(p) for p in prompts)
    if request.max_length <= longest:  # HF: max_length counts the (padded) prompt
        raise JaxgenError(f"max_length: {request.max_length} leaves no room after a {longest}-token prompt")
    return request.max_length - longest


def run_batch(
    model: ModelConfig,
    params,
    prompts: list[list[int]],
    row_ids: list,
    request: Request,
    mesh,
    draft_params=None,
) -> tuple[list[list[int]], list[list[loop.Completion]], speculative.Stats | None]:
    """Fits and decodes one batch (beam search or sampling): the prompts as run, each
    prompt's `num_return_sequences` completions (beams best first, samples in key order),
    and what speculation did (None without it).

    Samples of one prompt are rows of their own, each keyed by `sequence_key`: a sample
    depends only on (seed, prompt key, its index), not on the batch or on how many are asked.
    With `request.speculation`, rows decode speculatively (`draft_params`: the draft model's).
    """
    new = new_tokens(request, prompts)
    prompts = [
        fit_prompt(model, p, new, request.options, f"prompt {r}")
        for p, r in zip(prompts, row_ids, strict=True)
    ]
    kw = dict(max_new_tokens=new, mesh=mesh, buckets=request.options.prompt_buckets)
    if isinstance(request.spec.strategy, sampling.BeamSearch):
        return prompts, beam.beam_ids(model, params, prompts, request.spec, **kw), None
    n = request.options.num_return_sequences
    ids = [row_id(sequence_key(r, j)) for r in row_ids for j in range(n)]
    rows_in = [p for p in prompts for _ in range(n)]
    stats = None
    if request.speculation is not None:
        rows, stats = speculative.generate_ids(
            model, params, rows_in, request.spec, request.speculation, draft_params=draft_params,
            seed=request.options.seed, row_ids=ids, **kw,
        )  # fmt: skip
    else:
        rows = loop.generate_ids(
            model, params, rows_in, request.spec, seed=request.options.seed, row_ids=ids, **kw
        )
    return prompts, [rows[i : i + n] for i in range(0, len(rows), n)], stats


def complete_text(
    model: ModelConfig, params, tokenizer, prompt: str, defaults: GenerateConfig, mesh, **options
):
    """What `LanguageModel.generate([prompt], **options)[0].text` gives, for a caller that holds
    raw params (the training loop's samples): the first completion, stop strings cut."""
    req = resolve(defaults, model, tokenizer, **options)
    ids = encode_prompt(tokenizer, model, prompt, req.options, "prompt 0")
    prompts, rows, _ = run_batch(model, params, [ids], [0], req, mesh)
    return cut_at_stop(continuation(tokenizer, prompts[0], rows[0][0].tokens), req.stop_texts)[0]
