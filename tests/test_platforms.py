"""A CPU host with libtpu installed (the `tpu` extra) starts no TPU runtime: the CLI sets
JAX_PLATFORMS=cpu where no TPU is attached and nobody asked for a platform."""

import importlib.util

import pytest

from jaxgen.runtime import platforms
from jaxgen.runtime.platforms import keep_tpu_runtime_quiet, quiet_platforms

CPU_HOST = dict(libtpu_installed=True, tpu_present=False, gpu_present=False)


@pytest.mark.parametrize(
    "env, host, want",
    [
        ({}, CPU_HOST, "cpu"),  # libtpu on a CPU host: keep it quiet
        ({}, {**CPU_HOST, "libtpu_installed": False}, None),  # no libtpu: JAX starts no TPU runtime
        ({}, {**CPU_HOST, "tpu_present": True}, None),  # a TPU VM / GKE node: use it
        ({}, {**CPU_HOST, "gpu_present": True}, None),  # a GPU: cpu would hide it
        ({"JAX_PLATFORMS": "tpu"}, CPU_HOST, None),  # asked for: JAX says what is wrong
        ({"JAX_PLATFORMS": ""}, CPU_HOST, "cpu"),  # empty is unset
        ({"JAX_FORCE_TPU_INIT": "1"}, CPU_HOST, None),
    ],
)
def test_quiet_platforms(env, host, want):
    assert quiet_platforms(env, **host) == want


def test_keep_tpu_runtime_quiet_sets_the_environment(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "libtpu" else real(name, *a)
    )
    monkeypatch.setattr(platforms, "tpu_chips_present", lambda: False)
    monkeypatch.setattr(platforms, "gpu_visible", lambda: False)
    env = {"PATH": "/bin"}
    assert keep_tpu_runtime_quiet(env) == "cpu" and env == {"PATH": "/bin", "JAX_PLATFORMS": "cpu"}
    monkeypatch.setattr(platforms, "tpu_chips_present", lambda: True)
    env = {}
    assert keep_tpu_runtime_quiet(env) is None and env == {}
