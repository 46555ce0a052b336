"""Shared test setup: 8 fake CPU devices (set before JAX starts) and one tiny model."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxgen.config import Config, load_config  # noqa: E402

assert jax.device_count() == 8, "tests need 8 fake CPU devices; was JAX imported before conftest?"


@pytest.fixture(scope="session")
def tiny_config() -> Config:
    """The one tiny GPT-2-family config every test starts from (2 layers, width 64)."""
    return load_config(None, ["model.preset=tiny", "model.dtype=float32"])


@pytest.fixture(scope="session")
def tiny_llama_config() -> Config:
    """The Llama-family twin: RoPE, RMSNorm, SwiGLU, 2 KV heads for 4 query heads."""
    return load_config(None, ["model.preset=tiny-llama", "model.dtype=float32"])


# Reliability totals (hostile inputs, fuzz examples) for the terminal summary.
from reliability_counts import (  # noqa: E402, F401
    pytest_sessionfinish,
    pytest_terminal_summary,
    pytest_testnodedown,
    reliability,
)
