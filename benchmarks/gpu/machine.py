"""What the run ran on: GPU name, driver, CUDA, library versions, and the peak bf16 FLOP/s
that MFU divides by (looked up by device name; unknown devices get no MFU)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess

import jax

# Dense bf16 peak FLOP/s per GPU. Only names whose peak is unambiguous: the PCIe and NVL
# variants of H100/H200 have lower peaks and are left out (MFU n/a), as is any other GPU.
_PEAKS: tuple[tuple[str, float], ...] = (
    (r"H100(?!.*(PCIe|NVL))", 989e12),  # SXM; its device name is "NVIDIA H100 80GB HBM3"
    (r"H200(?!.*NVL)", 989e12),
    (r"A100", 312e12),
    (r"\bL4\b", 121e12),  # not L40 / L40S
)

_PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint", "numpy",
             "torch", "triton", "transformers", "jaxgen")  # fmt: skip


def peak_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak FLOP/s of one GPU by its name, or None when not in the table."""
    for pattern, peak in _PEAKS:
        if device_name and re.search(pattern, device_name, re.IGNORECASE):
            return peak
    return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_smi() -> dict:
    """Name, driver and the driver's CUDA version, from nvidia-smi when it exists."""
    if shutil.which("nvidia-smi") is None:
        return {}
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        rows = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (subprocess.SubprocessError, OSError) as e:
        return {"nvidia_smi_error": str(e)}
    name, driver, memory = (x.strip() for x in rows.splitlines()[0].split(","))
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return {"gpu_name": name, "driver": driver, "gpu_memory": memory,
            "cuda_driver_api": cuda.group(1) if cuda else None}  # fmt: skip


def describe(torch_module=None) -> dict:
    """The environment record written first in every results file.

    Args:
        torch_module: the imported torch, when the peers run (its CUDA and cuDNN versions).
    """
    device = jax.devices()[0]
    info = {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {p: _version(p) for p in _PACKAGES},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # a tried XLA setting changes the figures
    } | _nvidia_smi()
    if torch_module is not None:
        info["torch_cuda"] = torch_module.version.cuda
        if torch_module.cuda.is_available():
            info["torch_device"] = torch_module.cuda.get_device_name(0)
            info["torch_cudnn"] = torch_module.backends.cudnn.version()
    name = info.get("gpu_name") or info.get("torch_device") or device.device_kind
    info["peak_flops"] = peak_flops(name) if info["backend"] == "gpu" else None
    info["peak_flops_from"] = name
    # jax's own report: jaxlib's CUDA/cuDNN builds and the nvidia-smi table.
    info["jax_environment"] = jax.print_environment_info(return_string=True)
    return info
