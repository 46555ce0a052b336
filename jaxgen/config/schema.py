"""The config schema: frozen pydantic models, one per section of an experiment.

One `Config` describes a whole experiment (model, mesh, data, tokenizer, optimizer,
schedule, train, checkpoint, generate, eval). Every section forbids unknown keys,
so a typo is an error that names the full dotted key and the closest valid one.
"""

from __future__ import annotations

import difflib
import math
import typing
from typing import Any, Literal

import pydantic

from jaxgen.config.presets import PRESETS

# The largest integer a setting may hold: what numpy, JAX and TensorStore index with. A
# larger count is a typo or a hostile file, and would fail later, far from its key.
INT_LIMIT = 2**63 - 1


def _out_of_range(value: Any) -> str | None:
    """Why a value (or an item of it) is no number a setting can hold, else None."""
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else None
    if items is not None:
        return next(filter(None, map(_out_of_range, items)), None)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_LIMIT:
        return f"{value} is out of range (at most 2**63 - 1)"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not a finite number"
    return None


def plain_name(value: str) -> str:
    """`value` when it is one plain path component: names become directories (`runs/<name>`,
    `<data_dir>/<data.name>`), and a name such as `../../x` or `/etc` would write outside them."""
    if value in ("", ".", "..") or any(c in value for c in "/\\\0"):
        raise ValueError(f"{value!r} is a path, not a plain name (it names a directory jaxgen writes)")
    return value


class _Section(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    @pydantic.field_validator("*", mode="after")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        problem = _out_of_range(value)
        if problem:
            raise ValueError(problem)
        return value


PositiveInt = pydantic.PositiveInt
NonNegInt = pydantic.NonNegativeInt
DType = Literal["float32", "bfloat16", "float16"]


class ModelConfig(_Section):
    """Decoder-only transformer hyper-parameters.

    `preset` fills every field it knows; keys given next to it override the preset.
    """

    preset: str | None = None
    family: Literal["gpt2", "llama"] = "gpt2"
    vocab_size: PositiveInt = 512
    num_layers: PositiveInt = 2
    d_model: PositiveInt = 64
    num_heads: PositiveInt = 4
    num_kv_heads: PositiveInt | None = None  # None: same as num_heads (no GQA)
    head_dim: PositiveInt | None = None  # None: d_model // num_heads
    mlp_dim: PositiveInt | None = None  # None: 4 * d_model
    max_len: PositiveInt = 64  # learned positions (gpt2) / RoPE horizon (llama)
    rope_theta: pydantic.PositiveFloat = 10000.0
    norm_eps: pydantic.PositiveFloat = 1e-5
    tie_embeddings: bool = True
    attention_bias: bool | None = None  # None: family default (gpt2 True, llama False)
    mlp_bias: bool | None = None
    dropout: float = pydantic.Field(0.0, ge=0.0, lt=1.0)
    # Same params either way (see README). None: by platform — scanned on TPU (flat
    # compile time in depth), unrolled elsewhere (GPT-2 124M on an H100: 457k vs 314k
    # tokens/s; the CPU quickstart: ~57 vs ~84 ms per step).
    scan_layers: bool | None = None
    remat: Literal["none", "dots_saveable", "full"] = "none"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    param_dtype: DType = "float32"
    attention_impl: Literal["auto", "xla", "cudnn"] = "auto"

    @pydantic.model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if not isinstance(name, str):
                raise ValueError(f"preset: expected a preset name, got {type(name).__name__}")
            if name not in PRESETS:
                raise ValueError(unknown_value("preset", name, PRESETS))
            data = {**PRESETS[name], **data}
        return data

    @pydantic.model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"num_heads: {self.num_heads} does not divide d_model={self.d_model}"
                " (set head_dim explicitly or pick a divisor)"
            )
        if self.kv_heads > self.num_heads or self.num_heads % self.kv_heads:
            raise ValueError(f"num_kv_heads: {self.kv_heads} does not divide num_heads={self.num_heads}")
        return self

    # Resolved views of the optional fields, so layers never repeat the defaulting.
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def hidden_dim(self) -> int:
        return self.mlp_dim or 4 * self.d_model

    @property
    def use_attention_bias(self) -> bool:
        return self.family == "gpt2" if self.attention_bias is None else self.attention_bias

    @property
    def use_mlp_bias(self) -> bool:
        return self.family == "gpt2" if self.mlp_bias is None else self.mlp_bias


class MeshConfig(_Section):
    """Device mesh sizes within a slice; -1 takes the remaining devices (at most one axis).

    `dcn_data` / `dcn_fsdp` > 1 spread the job over that many TPU slices joined by the data
    center network: the mesh's data (fsdp) axis is then dcn_data x data (dcn_fsdp x fsdp)
    long, each slice holding a contiguous block of it, so only the gradient reduction
    (and fsdp's gathers) cross slices (runtime/mesh.py).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: PositiveInt = 1
    dcn_fsdp: PositiveInt = 1

    @pydantic.model_validator(mode="after")
    def _check(self) -> MeshConfig:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise ValueError(f"{name}: {size} is not a positive size or -1 (the rest)")
        if sum(s == -1 for s in sizes.values()) > 1:
            raise ValueError("only one mesh axis may be -1")
        return self


class TokenizerConfig(_Section):
    """SentencePiece tokenizer: load `path`, or train one into the data directory."""

    path: str | None = None  # an existing tokenizer.model; None: train one
    kind: Literal["bpe", "unigram", "char"] = "bpe"
    vocab_size: PositiveInt = 1024
    character_coverage: float = pydantic.Field(1.0, gt=0.0, le=1.0)
    byte_fallback: bool = False
    pad_id: int = 0
    unk_id: int = 1
    bos_id: int = 2
    eos_id: int = 3
    control_tokens: tuple[str, ...] = ()  # e.g. ["<style=formal>"], kept as single pieces
    max_sentence_length: PositiveInt = 16384
    train_sentences: PositiveInt = 2_000_000  # lines sampled for training (bounds memory)
    vocab_multiple: PositiveInt = 128  # model vocab = tokenizer vocab rounded up to this


class DataConfig(_Section):
    """Where text comes from and how it becomes batches."""

    name: typing.Annotated[str, pydantic.AfterValidator(plain_name)] = "default"  # dataset dir in data_dir
    data_dir: str = "data/prepared"
    format: Literal["text", "jsonl", "sft", "preference"] = "text"
    train_files: tuple[str, ...] = ()  # paths or globs; "tfds:NAME/CONFIG" for a catalog set
    validation_files: tuple[str, ...] = ()
    validation_fraction: float = pydantic.Field(0.1, ge=0.0, lt=1.0)  # tail of the train text
    documents: Literal["blank_lines", "file", "line"] = "file"
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    turn_header: str = "{role}: "  # chat: text before each turn's content (never trained)
    turn_separator: str = "\n"  # chat: text after each turn's content
    trained_role: str = "assistant"  # chat: the role whose turns carry the loss
    # sft records: {"style": "formal", ...} -> control tokens (generate.control_template)
    # prepended to the record, never trained on as targets
    attributes_field: str = "attributes"
    # preference records: {"prompt", "chosen", "rejected"} (each text or a messages list)
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    strict_utf8: bool = False  # False: invalid UTF-8 becomes U+FFFD (counted); True: an error
    # a bad JSONL line (invalid JSON, wrong or missing fields, ...): skip: skipped, counted and
    # listed by `data prepare` (which then exits non-zero unless --allow-bad-lines); strict: stop
    bad_lines: Literal["skip", "strict"] = "skip"
    overlong: Literal["truncate", "drop"] = "truncate"  # sft records longer than seq_len + 1
    # tokenizing processes; 0: all cores for inputs over 16 MB (char tokenizers: 1), else 1
    prepare_workers: NonNegInt = 0
    shuffle_seed: int = 0
    num_epochs: PositiveInt | None = None  # None: repeat forever
    worker_count: NonNegInt = 0  # >0: grain worker processes; 0: reader threads in-process
    # seconds to wait for a worker's next batch before stopping with the worker's stack
    worker_timeout: pydantic.PositiveFloat = 300.0
    read_threads: PositiveInt = 2
    prefetch: PositiveInt = 4  # batches read ahead


class OptimizerConfig(_Section):
    name: Literal["adamw", "adafactor", "lion", "sgd"] = "adamw"
    learning_rate: pydantic.PositiveFloat = 3e-4
    b1: float = pydantic.Field(0.9, ge=0.0, lt=1.0)
    b2: float = pydantic.Field(0.95, ge=0.0, lt=1.0)
    eps: pydantic.PositiveFloat = 1e-8
    momentum: float = pydantic.Field(0.9, ge=0.0, lt=1.0)  # sgd
    weight_decay: float = pydantic.Field(0.1, ge=0.0)
    decay_norms: bool = False
    decay_biases: bool = False
    decay_embeddings: bool = False
    clip_norm: float | None = pydantic.Field(1.0, gt=0.0)


class ScheduleConfig(_Section):
    name: Literal["cosine", "linear", "constant", "wsd", "rsqrt"] = "cosine"
    warmup_steps: NonNegInt = 0
    decay_steps: PositiveInt | None = None  # None: train.steps
    min_lr_ratio: float = pydantic.Field(0.1, ge=0.0, le=1.0)
    decay_fraction: float = pydantic.Field(0.2, gt=0.0, le=1.0)  # wsd: final share spent decaying


class TrainConfig(_Section):
    steps: PositiveInt = 100
    batch_size: PositiveInt = 8  # global, in sequences
    seq_len: PositiveInt = 64
    grad_accum: PositiveInt = 1
    seed: int = 0
    z_loss: float = pydantic.Field(0.0, ge=0.0)
    loss_chunk: PositiveInt = 256  # sequence positions per chunk of the vocab projection + CE
    nan_policy: Literal["skip", "stop"] = "stop"
    # a loss above this x the median of the last 100 is logged with its batch (None: off)
    spike_factor: float | None = pydantic.Field(3.0, gt=1.0)
    log_every: PositiveInt = 10
    eval_every: PositiveInt | None = None  # None: only at the end
    eval_batches: PositiveInt = 20
    sample_every: PositiveInt | None = None  # None: no samples during training
    sample_prompt: str = ""
    sample_tokens: PositiveInt = 64
    peak_tflops: pydantic.PositiveFloat | None = None  # overrides the per-device table


class CheckpointConfig(_Section):
    every: PositiveInt | None = 1000
    keep: PositiveInt = 3
    keep_every: PositiveInt | None = None
    async_save: bool = True


class GenerateConfig(_Section):
    """Sampling defaults; every field is also a `generate` option and CLI flag."""

    max_new_tokens: PositiveInt = pydantic.Field(128, description="new tokens per completion")
    temperature: float = pydantic.Field(1.0, ge=0.0, description="0 = greedy")
    top_k: NonNegInt = pydantic.Field(0, description="keep the k most probable tokens (0 = off)")
    top_p: float = pydantic.Field(
        1.0, gt=0.0, le=1.0, description="keep the smallest set of tokens whose mass reaches p"
    )
    min_p: float = pydantic.Field(
        0.0, ge=0.0, le=1.0, description="drop tokens below min_p x the top probability"
    )
    repetition_penalty: pydantic.PositiveFloat = pydantic.Field(
        1.0, description="HF repetition penalty (1 = off)"
    )
    no_repeat_ngram_size: NonNegInt = pydantic.Field(
        0, description="never repeat an n-gram of this size (0 = off)"
    )
    banned: tuple[str, ...] = pydantic.Field((), description="text that must not be generated")
    num_beams: PositiveInt = pydantic.Field(1, description="beam search with this many beams (1 = sampling)")
    num_return_sequences: PositiveInt = pydantic.Field(
        1, description="completions per prompt: beams (<= num_beams) or independent samples"
    )
    length_penalty: float = pydantic.Field(1.0, description="beam score = sum log-probs / length ** penalty")
    early_stopping: bool | Literal["never"] = pydantic.Field(
        False, description="beam search: true, false or never"
    )  # as in Hugging Face
    stop: tuple[str, ...] = pydantic.Field((), description="stop string")
    seed: int = pydantic.Field(
        0, description="sampling seed (a line's text depends only on the seed and its id)"
    )
    control: dict[str, str] = pydantic.Field({}, description="control attribute")
    control_template: str = "<{key}={value}>"
    speculative: Literal["none", "prompt_lookup", "draft"] = pydantic.Field(
        "none", description="draft tokens and verify them in one pass (same text as without)"
    )
    num_speculative_tokens: int | None = pydantic.Field(
        None, ge=1, le=16, description="tokens drafted per pass (default: 5 for prompt_lookup, 4 for draft)"
    )
    max_ngram: int = pydantic.Field(
        3, ge=1, le=8, description="prompt lookup: longest n-gram matched in the text so far"
    )
    draft_run: str | None = pydantic.Field(
        None, description="speculative draft: a run or HF directory with the same tokenizer"
    )
    weights: Literal["float32", "bfloat16", "int8", "int8-head"] | None = pydantic.Field(
        None, description="decode with weights stored as (default: as loaded; int8-head: embedding/head too)"
    )
    batch_size: PositiveInt = pydantic.Field(32, description="prompts per batch")
    prompt_buckets: tuple[PositiveInt, ...] = ()  # () : powers of two
    truncate_prompt: bool = False  # True: drop the oldest tokens of an over-long prompt
    strip: bool = True
    min_length: NonNegInt = 0
    banned_words: tuple[str, ...] = ()
    deduplicate: bool = False

    @pydantic.model_validator(mode="after")
    def _check(self) -> GenerateConfig:
        if self.num_return_sequences > self.num_beams and self.num_beams > 1:
            raise ValueError(
                f"num_return_sequences: {self.num_return_sequences} exceeds num_beams={self.num_beams}"
            )
        return self


LORA_TARGETS = ("q", "k", "v", "o", "mlp_in", "mlp_gate", "mlp_out")


class LoraConfig(_Section):
    """Low-rank adapters W + (alpha / rank) A B on the named projections (see model/lora.py)."""

    rank: PositiveInt = 8
    alpha: pydantic.PositiveFloat = 16.0
    dropout: float = pydantic.Field(0.0, ge=0.0, lt=1.0)  # on the adapter's input, as in PEFT
    # q k v o: attention projections; mlp_in (gpt2 c_fc, llama up), mlp_gate (llama only), mlp_out
    targets: tuple[str, ...] = ("q", "v")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class DpoConfig(_Section):
    """Direct preference optimisation (Rafailov et al. 2023) and its IPO / hinge variants."""

    beta: pydantic.PositiveFloat = 0.1  # strength of the pull toward the reference model
    label_smoothing: float = pydantic.Field(0.0, ge=0.0, lt=0.5)  # cDPO: assumed label noise
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"


class FinetuneConfig(_Section):
    """`jaxgen finetune`: where the weights come from and which of them train."""

    # a jaxgen run directory (DIR or DIR@STEP) or a Hugging Face model directory; read
    # only when the run directory has no checkpoint yet
    init_from: str | None = None
    method: Literal["full", "freeze", "lora"] = "full"
    # freeze: parameter paths (fnmatch, or a prefix): embed, layers/0-5, */attn/*, final_norm
    freeze: tuple[str, ...] = ()
    lora: LoraConfig = LoraConfig()
    # {pattern: factor}: the schedule's learning rate times factor for matching parameters
    lr_multipliers: dict[str, pydantic.PositiveFloat] = {}
    # sft: next-token loss on the loss mask; dpo: preference pairs (data.format: preference)
    objective: Literal["sft", "dpo"] = "sft"
    dpo: DpoConfig = DpoConfig()


class DistributedConfig(_Section):
    """How a multi-process job forms and how fast it gives up on a lost process.

    Both map onto `jax.distributed.initialize`: JAX's runtime stops every survivor once
    a process has missed heartbeats for `heartbeat_timeout` seconds (JAX's own default,
    100 s, left a CPU job waiting for minutes), and a process that cannot reach the
    coordinator, or a coordinator whose peers do not all join, stops after
    `initialization_timeout` seconds. Ignored by single-process runs.
    """

    heartbeat_timeout: PositiveInt = 30
    initialization_timeout: PositiveInt = 300


class EvalConfig(_Section):
    batch_size: PositiveInt = 8
    max_batches: PositiveInt | None = None


class Config(_Section):
    """A whole experiment."""

    name: typing.Annotated[str, pydantic.AfterValidator(plain_name)] = "default"  # runs/<name>
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    generate: GenerateConfig = GenerateConfig()
    eval: EvalConfig = EvalConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    distributed: DistributedConfig = DistributedConfig()


def unknown_value(key: str, value: Any, valid: Any) -> str:
    close = difflib.get_close_matches(str(value), list(valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key}: unknown value {value!r}{hint}"
