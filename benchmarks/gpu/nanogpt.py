"""The nanoGPT peer: nanoGPT's model.py and the training step of its train.py, re-implemented.

Faithful to karpathy/nanoGPT (master): the same GPT module (LayerNorm with bias, fused
c_attn, F.scaled_dot_product_attention with is_causal=True — flash attention on GPU —,
exact GELU MLP, tied wte/lm_head, GPT-2 init), `configure_optimizers` (decay on >= 2-D
params, fused AdamW on CUDA), `torch.compile(model)`, bf16 autocast on CUDA (float32 on
CPU, as nanoGPT does), a GradScaler that is off unless float16, grad clipping at 1.0, the
learning rate set on the param groups every step. Two choices differ from train.py's
defaults, both to match jaxgen's model: `bias=True` (GPT-2's layout and GPTConfig's
default; train.py sets False) and a fixed batch of random tokens instead of the memmap
loader (jaxgen's side also reuses one synthetic batch: input is not what is measured).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import time

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclasses.dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))  # fmt: skip
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding=True):
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)  # (t)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (b, t, n_embd)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)  # (b, t, vocab)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits, loss = self.lm_head(x[:, [-1], :]), None
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type == "cuda"
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **(dict(fused=True) if fused else {}))


def _lr(it, learning_rate=6e-4, warmup_iters=2000, lr_decay_iters=600000, min_lr=6e-5):
    """train.py's get_lr: linear warm-up, then cosine decay to min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


class Trainer:
    """nanoGPT's training step on one device for a jaxgen GPT-2 model shape.

    Args:
        model: a jaxgen ModelConfig (family gpt2), so both sides train the same shape.
    """

    def __init__(self, model, batch: int, seq_len: int, device: str):
        if model.family != "gpt2":
            raise ValueError(f"nanoGPT trains GPT-2 models, not {model.family}")
        self.device = device
        self.device_type = "cuda" if "cuda" in device else "cpu"
        torch.manual_seed(1337)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        config = GPTConfig(block_size=model.max_len, vocab_size=model.vocab_size, n_layer=model.num_layers,
                           n_head=model.num_heads, n_embd=model.d_model)  # fmt: skip
        raw = GPT(config).to(device)
        self.params = raw.get_num_params(non_embedding=False)
        self.optimizer = raw.configure_optimizers(0.1, 6e-4, (0.9, 0.95), self.device_type)
        self.model = torch.compile(raw)
        self.ctx = (contextlib.nullcontext() if self.device_type == "cpu"
                    else torch.amp.autocast(device_type=self.device_type, dtype=torch.bfloat16))  # fmt: skip
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=False)  # enabled only for float16
        self.dtype = "float32" if self.device_type == "cpu" else "bfloat16"
        tokens = torch.randint(
            0, model.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0)
        )
        # (B, T) each, contiguous as nanoGPT's get_batch makes them (its loss flattens with .view)
        self.x, self.y = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)
        self.tokens = batch * seq_len
        self.iter = 0
        self.loss = None

    def step(self):
        for group in self.optimizer.param_groups:
            group["lr"] = _lr(self.iter)
        with self.ctx:
            _, loss = self.model(self.x, self.y)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.iter += 1
        self.loss = loss

    def _sync(self):
        if self.device_type == "cuda":
            torch.cuda.synchronize()

    def compile(self) -> float:
        """The first step (torch.compile traces and compiles in it); its seconds."""
        self._sync()
        start = time.perf_counter()
        self.step()
        self._sync()
        return time.perf_counter() - start

    def measure(self, steps: int, warmup: int) -> dict:
        """As `jaxgen bench train` times: `warmup` untimed steps, then `steps` timed ones,
        waiting for the device only at the end of each stretch."""
        for _ in range(warmup):
            self.step()
        self._sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        self._sync()
        seconds = (time.perf_counter() - start) / steps
        out = {"tokens_per_s": self.tokens / seconds, "step_ms": 1e3 * seconds, "loss": self.loss.item(),
               "params": self.params, "compute_dtype": self.dtype}  # fmt: skip
        if self.device_type == "cuda":
            out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        return out

    def close(self):
        """Frees the GPU memory this trainer holds (jaxgen's side shares the GPU)."""
        del self.model, self.optimizer, self.x, self.y, self.loss
        if self.device_type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
