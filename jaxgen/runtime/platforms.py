"""Which JAX platforms a process may start: no TPU runtime where there is no TPU.

With libtpu installed (the `tpu` extra, which `jaxgen plan` needs on a CPU host), JAX
tries the TPU backend first on every start, and libtpu prints a screen of warnings
(`could not determine TPU accelerator type`, an `INVALID_ARGUMENT` about
`TPU_WORKER_HOSTNAMES`) before JAX falls back to the CPU. JAX already skips CUDA when no
NVIDIA device is visible; `keep_tpu_runtime_quiet` does the same for the TPU, by setting
`JAX_PLATFORMS=cpu` before JAX is imported, when:

- libtpu is installed (without it JAX starts no TPU runtime),
- no TPU chip is attached (a Google PCI device), and no GPU is visible (then JAX's own
  choice stands: `cpu` would hide the GPU),
- nobody asked for a platform (`JAX_PLATFORMS` set, or `JAX_FORCE_TPU_INIT`).

Plain Python (no JAX import): the CLI calls it before any handler starts JAX.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pathlib
import sys
from collections.abc import MutableMapping

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips show up as PCI devices of this vendor
# Device nodes of NVIDIA (native, containers, WSL2) and AMD GPUs, as JAX checks them.
_GPU_NODES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def tpu_chips_present() -> bool:
    """Whether this host has TPU chips (a Google PCI device), checked without JAX."""
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        if pathlib.Path(path).read_text().strip() == _GOOGLE_PCI_VENDOR:
            return True
    return False


def gpu_visible() -> bool:
    return any(os.path.exists(node) for node in _GPU_NODES)


def quiet_platforms(
    env: MutableMapping[str, str], *, libtpu_installed: bool, tpu_present: bool, gpu_present: bool
) -> str | None:
    """The JAX_PLATFORMS value that keeps the TPU runtime from starting, or None to
    leave JAX's choice alone (the pure decision, for tests)."""
    if env.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in env:
        return None
    if not libtpu_installed or tpu_present or gpu_present:
        return None
    return "cpu"


def keep_tpu_runtime_quiet(env: MutableMapping[str, str] | None = None) -> str | None:
    """Sets `JAX_PLATFORMS=cpu` in `env` (default `os.environ`, and JAX's config when it is
    imported) where no TPU is present or requested; call it before JAX starts a backend.

    Returns:
        The value set, or None when nothing changed.
    """
    env = os.environ if env is None else env
    platforms = quiet_platforms(
        env,
        libtpu_installed=importlib.util.find_spec("libtpu") is not None,
        tpu_present=tpu_chips_present(),
        gpu_present=gpu_visible(),
    )
    if platforms is not None:
        env["JAX_PLATFORMS"] = platforms
        jax = sys.modules.get("jax")
        if jax is not None and env is os.environ:
            # JAX reads JAX_PLATFORMS once, as it is imported (importing runtime/ does);
            # its backends start later, at the first device query, and read this.
            jax.config.update("jax_platforms", platforms)
    return platforms
