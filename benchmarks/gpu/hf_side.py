"""The Hugging Face peer of the decode rows: `generate` with a static cache + torch.compile.

The model is built from the config.json that jaxgen's exporter writes for the same
jaxgen model (`jaxgen.convert.hf_config.hf_config`: GPT2LMHeadModel / LlamaForCausalLM
with the same shape), with random weights: no download. `cache_implementation="static"`
makes transformers 5.x compile the decoding step itself (`generate`'s auto-compile with
its default CompileConfig: inductor, mode "reduce-overhead", i.e. CUDA graphs) — what its
documentation recommends for speed. Beam search in transformers 5.x does not auto-compile;
the line records whether a compiled step ran (`compiled`).
"""

from __future__ import annotations

import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.generation.configuration_utils import CompileConfig


class Generator:
    """One model and one prompt batch; `measure()` is one repeat, timed as jaxgen's
    `bench generate` times its programs: two calls, the second one timed.

    Args:
        hf_config: a config.json dict (with `model_type`).
        compile_on_cpu: let `generate` compile on CPU too (the smoke mode: the same path
            as on a GPU, where it compiles by itself).
    """

    def __init__(self, hf_config: dict, *, batch: int, prompt_len: int, new_tokens: int, num_beams: int,
                 device: str, dtype: str, compile_on_cpu: bool = False):  # fmt: skip
        fields = {k: v for k, v in hf_config.items() if k not in ("dtype", "torch_dtype")}
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        torch.manual_seed(0)
        with torch.device(device):  # initialise on the device: a 1.1B model in seconds
            self.model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).eval()
        # Exactly `new_tokens` on both sides: no stopping at eos (random weights may pick it).
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = 0
        gen = torch.Generator().manual_seed(0)
        self.prompt = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=gen).to(device)
        self.kwargs = dict(
            attention_mask=torch.ones_like(self.prompt), max_new_tokens=new_tokens, do_sample=False,
            num_beams=max(num_beams, 1), cache_implementation="static",
        )  # fmt: skip
        if num_beams > 1:  # Hugging Face's classic beam settings, as jaxgen's BeamSearch defaults
            self.kwargs |= dict(length_penalty=1.0, early_stopping=False, num_return_sequences=1)
        if compile_on_cpu:
            compile_config = CompileConfig()
            compile_config._compile_all_devices = True  # transformers' switch for compiling on CPU
            self.kwargs["compile_config"] = compile_config
        self.device, self.batch, self.new_tokens = device, batch, new_tokens
        self.params = sum(p.numel() for p in self.model.parameters())

    def _generate(self) -> float:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.model.generate(self.prompt, **self.kwargs)  # under no_grad, as generate always runs
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if out.shape[1] != self.prompt.shape[1] + self.new_tokens:
            raise RuntimeError(f"generate returned {out.shape[1] - self.prompt.shape[1]} new tokens, "
                               f"not {self.new_tokens}")  # fmt: skip
        return seconds

    def measure(self) -> dict:
        first, second = self._generate(), self._generate()
        return {
            "tokens_per_s": self.batch * self.new_tokens / second,
            "total_s": second,
            "compile_s": first - second,
            "params": self.params,
            "compiled": getattr(self.model, "_compiled_call", None) is not None,
            "attn_implementation": self.model.config._attn_implementation,
            "transformers": transformers.__version__,
        }

    def close(self):
        del self.model, self.prompt, self.kwargs
        torch._dynamo.reset()  # drop compiled graphs (and their CUDA graph pools) of this model
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
