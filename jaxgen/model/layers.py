"""Building blocks: einsum projections, norms, MLPs, rotary embeddings.

Every parameter is created with logical axis names (see jaxgen/runtime/mesh.py for the
rules that map them to the mesh); layers never name mesh axes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.config import LoraConfig, ModelConfig
from jaxgen.runtime import cpu_kernels

Names = tuple[str | None, ...]

# GPT-2's init: N(0, 0.02) everywhere; residual output projections are additionally
# scaled by 1/sqrt(2 * layers) (see `Einsum.init_scale`).
INIT_STD = 0.02


def compute_dtype(config: ModelConfig) -> jnp.dtype:
    """float32 on CPU (bf16 matmuls are emulated there and slower), bfloat16 elsewhere."""
    if config.dtype != "auto":
        return jnp.dtype(config.dtype)
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)


def constrain(x: jax.Array, names: Names) -> jax.Array:
    """Shards an activation by logical names (a no-op outside `sharding.activate`)."""
    return nn.with_logical_constraint(x, names)


def kernel_einsum(eq: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`jnp.einsum(eq, x, kernel)` as one `dot_general` that contracts in the kernel's order.

    `jnp.einsum` may list the contracted dims in any order ("BTNH,NHD->BTD" contracts H
    then N), and XLA on CPU then copies the kernel into that order on every call: in a
    decoding loop, one transposed copy of each attention output kernel per token
    (benchmarks/RESULTS.md, "HF interop"). Contracting in the kernel's own dim order
    keeps its row-major layout; only the (small) activation is ever rearranged.

    Args:
        eq: "XS,KS->OS" with single letters, no letter repeated within an operand and
            every letter of the output in exactly one operand or both (batch dims).
    """
    inputs, out = eq.split("->")
    lhs, rhs = inputs.split(",")
    batch = [c for c in rhs if c in lhs and c in out]
    contract = [c for c in rhs if c in lhs and c not in out]
    if any(c not in rhs and c not in out for c in lhs) or any(c not in lhs and c not in out for c in rhs):
        raise ValueError(f"kernel_einsum: {eq!r} sums a dim of one operand only")
    dims = (
        (tuple(lhs.index(c) for c in contract), tuple(rhs.index(c) for c in contract)),
        (tuple(lhs.index(c) for c in batch), tuple(rhs.index(c) for c in batch)),
    )
    y = jax.lax.dot_general(x, kernel, dims)
    # dot_general's result order: batch dims, then the lhs's free dims, then the rhs's.
    order = batch + [c for c in lhs if c not in rhs] + [c for c in rhs if c not in lhs]
    perm = tuple(order.index(c) for c in out)
    return y if perm == tuple(range(len(perm))) else jnp.transpose(y, perm)


def weight_einsum(
    eq: str,
    x: jax.Array,
    kernel: jax.Array,
    scale: jax.Array | None,
    tiles: bool = False,
    few_rows: bool = False,
) -> jax.Array:
    """`kernel_einsum(eq, x, kernel)` times `scale` (an int8 kernel's per-output scale, or
    None), in x's dtype, for a kernel stored in any format (model/quant.py); `tiles`: the
    kernel holds its [K, N] view in the CPU kernel's tiles (`kernel_tiles`, model/quant.py).

    On a CPU, int8 and bfloat16 kernels with float32 activations go through the
    weight-streaming kernel (runtime/cpu_kernels.py), where XLA's dot would convert them
    slower than it reads float32, and so do float32 kernels in its tiles (the serving
    layout); everything else is XLA's dot on the widened kernel.

    `few_rows` (serving only: the kernel has no gradient): a float32 [N, K] kernel (the
    tied head) with FEW_ROWS[0]..FEW_ROWS[1] input rows goes through the kernel too. XLA's
    dot reads one row's head fastest, but for 2-8 rows it runs a YNN fusion that took
    1.4-2x as long as the kernel (4096 x 512 at 5 rows: 0.60 vs 0.40 ms; GPT-2's 50304 x
    768: 10.9 vs 7.0 ms; benchmarks/RESULTS.md, "Speculative decoding at a shape bound by
    its weights"), and a speculative verify pass is 5 rows.
    """
    y = _streamed_einsum(eq, x, kernel, scale, tiles, few_rows)
    if y is None:
        if tiles:  # not streamed after all (activations not float32): back to plain, each call
            kernel = cpu_kernels.from_tiles(kernel, math.prod(kernel.shape[: adapter_input_dims(eq)]))
        y = kernel_einsum(eq, x, kernel.astype(x.dtype))
        y = y if scale is None else y * scale.astype(x.dtype)
    return y


FEW_ROWS = (2, 8)


def _streamed_einsum(
    eq: str,
    x: jax.Array,
    kernel: jax.Array,
    scale: jax.Array | None,
    tiles: bool = False,
    few_rows: bool = False,
) -> jax.Array | None:
    """`weight_einsum` through the CPU kernel, or None where it does not apply (other
    dtypes or backend, no compiler, a layout whose output is not the input's free dims
    followed by the kernel's).

    The kernel must contract its leading dims against the input's trailing ones, as every
    projection does ("BTD,DNH->BTNH", "BTNH,NHD->BTD"), or (tied output head,
    "BTD,VD->BTV") its trailing dim.
    """
    inputs, out = eq.split("->")
    lhs, rhs = inputs.split(",")
    nk = len(rhs) == 2 and rhs[1] == lhs[-1] and out == lhs[:-1] + rhs[0]  # [N, K]: contracts its last dim
    rows = math.prod(x.shape[:-1])
    streamed = (
        kernel.dtype in (jnp.int8, jnp.bfloat16)
        or (tiles and kernel.dtype == jnp.float32)
        or (few_rows and nk and kernel.dtype == jnp.float32 and FEW_ROWS[0] <= rows <= FEW_ROWS[1])
    )
    if not streamed or x.dtype != jnp.float32 or not cpu_kernels.available():
        return None
    if few_rows and kernel.dtype == jnp.float32 and not cpu_kernels.reads_tiles():
        return None  # faster than XLA's dot with register tiles only
    if nk:
        layout, n_in = "nk", 1
    else:
        try:
            n_in = adapter_input_dims(eq)
        except ValueError:
            return None
        layout = "kn_tiles" if tiles else "kn"
        if out != lhs[: len(lhs) - n_in] + rhs[n_in:]:
            return None
    lead, k = x.shape[: x.ndim - n_in], math.prod(x.shape[x.ndim - n_in :])
    w = kernel.reshape(kernel.shape[0], -1) if layout == "nk" else kernel.reshape(k, -1)
    y = cpu_kernels.weight_matmul(x.reshape(-1, k), w, None if scale is None else scale.reshape(-1), layout)
    out_dims = kernel.shape[:1] if layout == "nk" else kernel.shape[n_in:]
    return y.reshape(*lead, *out_dims)


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A LoRA adapter on one projection: rank, output scale (alpha / rank), input dropout."""

    rank: int
    scale: float
    dropout: float = 0.0


def adapter_for(lora: LoraConfig | None, target: str) -> Adapter | None:
    """The adapter of LoRA target `target` ("q", "mlp_in", ...), None when not targeted."""
    if lora is None or target not in lora.targets:
        return None
    return Adapter(lora.rank, lora.scale, lora.dropout)


def adapter_input_dims(eq: str) -> int:
    """How many leading kernel dims a projection contracts: an adapter's A covers them.

    "BTNH,NHD->BTD" gives 2. The kernel's contracted dims must lead and the input's
    trail, in the same order, as in every projection here ([D, N, H], [N, H, D], [D, F]).
    """
    inputs, out = eq.split("->")
    lhs, rhs = inputs.split(",")
    n_in = sum(c in lhs and c not in out for c in rhs)
    if rhs[:n_in] != lhs[len(lhs) - n_in :] or any(c in out for c in rhs[:n_in]):
        raise ValueError(f"adapter_input_dims: {eq!r} does not contract the kernel's leading dims")
    return n_in


class Einsum(nn.Module):
    """A projection `y = einsum(eq, x, kernel) (+ bias)` with logically named params.

    With an `adapter`, y gains `scale * (dropout(x) A) B` (LoRA, jaxgen/model/lora.py):
    A [*in, R] and B [R, *out] live in the "lora" collection, named like the kernel's
    input and output axes, so they shard like the kernel they adapt. The low-rank path
    never forms A B: the base kernel gets no gradient and no [in, out] temporary.

    Attributes:
        eq: shape-lettered einsum, e.g. "BTD,DNH->BTNH".
        shape: kernel shape; names: its logical axes.
        bias_dims: how many trailing kernel dims the bias has (0: no bias).
        init_scale: multiplies INIT_STD (residual projections use 1/sqrt(2L)).
        adapter: LoRA settings, None for a plain projection.
        deterministic: False applies the adapter's dropout (needs a "dropout" rng).
    """

    eq: str
    shape: Sequence[int]
    names: Names
    bias_dims: int = 0
    init_scale: float = 1.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    adapter: Adapter | None = None
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(INIT_STD * self.init_scale)
        # Narrow weights for decoding on a CPU may come in the kernel's tiles (model/quant.py).
        tiles = self.has_variable("params", "kernel_tiles")
        if tiles:
            kernel = self.get_variable("params", "kernel_tiles")
        else:
            kernel = self.param(
                "kernel", nn.with_logical_partitioning(init, self.names), tuple(self.shape), self.param_dtype
            )
        # int8 weights for decoding (model/quant.py): a scale per output channel.
        scale = self.get_variable("params", "scale") if kernel.dtype == jnp.int8 else None
        y = weight_einsum(self.eq, x.astype(self.dtype), kernel, scale, tiles)
        if self.bias_dims:
            bias_shape = tuple(self.shape[-self.bias_dims :])
            bias_names = self.names[-self.bias_dims :]
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, bias_names),
                bias_shape,
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        if self.adapter is not None:
            y = y + self._low_rank(x)
        return y

    def _low_rank(self, x: jax.Array) -> jax.Array:
        n_in = adapter_input_dims(self.eq)
        r, shape, names = self.adapter.rank, tuple(self.shape), tuple(self.names)

        def variable(name, init, var_shape, var_names):
            # Created only by `init` (lambda: no rng is needed when applying).
            boxed = nn.with_logical_partitioning(init, var_names)
            return self.variable(
                "lora", name, lambda: boxed(self.make_rng("params"), var_shape, self.param_dtype)
            ).value

        # PEFT's init: A ~ kaiming-uniform (bound 1/sqrt(fan_in)), B = 0, so a fresh
        # adapter leaves the model's outputs unchanged.
        fan_in = nn.initializers.variance_scaling(
            1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1
        )
        a = variable("a", fan_in, (*shape[:n_in], r), (*names[:n_in], None))  # [*in, R]
        b = variable("b", nn.initializers.zeros, (r, *shape[n_in:]), (None, *names[n_in:]))  # [R, *out]
        if self.adapter.dropout:
            x = nn.Dropout(self.adapter.dropout)(x, deterministic=self.deterministic)
        # The batch and length dims flattened into one (M): the backward pass's dA = x^T dh
        # and dB = h^T dy then contract one dim. Contracting (B, T) of skinny [B, T, R]
        # operands took XLA on CPU ~0.1 s per layer and target (GPT-2 124M, 4 x 256 tokens) and
        # made LoRA steps slower than full fine-tuning (benchmarks/RESULTS.md).
        lead = x.shape[: x.ndim - n_in]
        x2 = x.reshape(-1, *x.shape[x.ndim - n_in :]).astype(self.dtype)  # [M, *in]
        contract = (tuple(range(1, n_in + 1)), tuple(range(n_in)))
        h = jax.lax.dot_general(x2, a.astype(self.dtype), (contract, ((), ())))  # [M, R]
        y = h @ b.reshape(r, -1).astype(self.dtype)  # [M, out]
        return y.reshape(*lead, *shape[n_in:]) * jnp.asarray(self.adapter.scale, self.dtype)


class Norm(nn.Module):
    """LayerNorm (gpt2: scale and bias) or RMSNorm (llama: scale only), in float32."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        pdt = jnp.dtype(cfg.param_dtype)
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],), pdt
        )
        x32 = x.astype(jnp.float32)
        if cfg.family == "llama":
            y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + cfg.norm_eps)
            return (y * scale.astype(jnp.float32)).astype(x.dtype)
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (x.shape[-1],), pdt
        )
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def projection_kwargs(config: ModelConfig, lora: LoraConfig | None, deterministic: bool):
    """The keyword arguments every projection of a block shares, and a per-target adapter."""
    kw = dict(
        dtype=compute_dtype(config), param_dtype=jnp.dtype(config.param_dtype), deterministic=deterministic
    )
    return kw, lambda target: adapter_for(lora, target)


class Mlp(nn.Module):
    """gpt2: GELU(tanh) MLP with biases; llama: SwiGLU (silu(x W_gate) * x W_up) W_down."""

    config: ModelConfig
    lora: LoraConfig | None = None
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        d, f = cfg.d_model, cfg.hidden_dim
        bias = int(cfg.use_mlp_bias)
        kw, adapter = projection_kwargs(cfg, self.lora, self.deterministic)

        def up(name: str, target: str) -> Einsum:
            return Einsum(
                "BTD,DF->BTF", (d, f), ("embed", "mlp"), bias, name=name, adapter=adapter(target), **kw
            )

        if cfg.family == "llama":
            h = nn.silu(up("gate", "mlp_gate")(x)) * up("up", "mlp_in")(x)
        else:
            h = nn.gelu(up("up", "mlp_in")(x), approximate=True)
        h = constrain(h, ("batch", "length", "act_mlp"))  # [B, T, F]
        scale = (2 * cfg.num_layers) ** -0.5
        down = Einsum(
            "BTF,FD->BTD",
            (f, d),
            ("mlp", "embed"),
            bias,
            scale,
            name="down",
            adapter=adapter("mlp_out"),
            **kw,
        )
        return down(h)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in Hugging Face's half-split layout (no weight permutation on import).

    Args:
        x: [B, T, N, H]; positions: [B, T] int.
    """
    h = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, H/2]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
