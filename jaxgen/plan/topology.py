"""Topology strings and the chips they name: `cpu:8`, `v5e:16x16`, `2xv5e:16x16`.

A topology is what `jaxgen plan` compiles for: fake CPU devices (`cpu:N`, one process)
or a Cloud TPU slice described by libtpu without any chip present (`CHIP:AxB[xC]`,
with `Kx` in front for K slices joined over the data-centre network). The chip table
holds what the plan compares against: HBM per chip and dense bf16 peak FLOP/s (Google's
published figures; the same peaks as `jaxgen.metrics.PEAK_TFLOPS`).

This module is plain Python: the CLI parses a topology before JAX starts, so that
`cpu:N` can still choose the number of fake devices.
"""

from __future__ import annotations

import dataclasses
import math
import re

from jaxgen.errors import JaxgenError

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation as libtpu and the plan see it.

    Attributes:
        name: the name topology strings use ("v5e").
        libtpu_name: libtpu's name in its topology strings ("v5" for v5p).
        chip_config: libtpu's chip configuration: "megacore" (one device per chip, both
            TensorCores) or "default" (one TensorCore per chip).
        dims: torus dimensions of a slice (2 for v5e/v6e, 3 for v4/v5p).
        hbm_bytes: HBM per chip.
        peak_flops: dense bf16 FLOP/s per chip.
        accelerator_type: GCE's accelerator type for `chips` chips (e.g. "v5litepod-{chips}").
    """

    name: str
    libtpu_name: str
    chip_config: str
    dims: int
    hbm_bytes: int
    peak_flops: float
    accelerator_type: str

    def accelerator(self, chips: int) -> str:
        # v4 and v5p count TensorCores in their accelerator names (2 per chip).
        cores = chips * 2 if self.chip_config == "megacore" else chips
        return self.accelerator_type.format(n=cores)


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "v4", "megacore", 3, 32 * GIB, 275e12, "v4-{n}"),
    "v5e": Chip("v5e", "v5e", "default", 2, 16 * GIB, 197e12, "v5litepod-{n}"),
    "v5p": Chip("v5p", "v5", "megacore", 3, 95 * GIB, 459e12, "v5p-{n}"),
    "v6e": Chip("v6e", "v6e", "default", 2, 32 * GIB, 918e12, "v6e-{n}"),
}
# Each TPU host of these slices holds a 2x2 block of chips.
CHIPS_PER_HOST_BOUNDS = (2, 2, 1)
KNOWN = "cpu:N, v4:AxBxC, v5e:AxB, v5p:AxBxC, v6e:AxB, each with Kx in front for K slices (e.g. 2xv5e:16x16)"
EXAMPLES = ("cpu:8", "v4:2x2x2", "v5e:4x4", "v5e:16x16", "v5p:4x4x4", "v6e:8x8", "2xv5e:16x16")

_PATTERN = re.compile(r"(?:(\d+)x)?([a-z0-9]+):([0-9x]+)")


@dataclasses.dataclass(frozen=True)
class Topology:
    """A parsed topology string.

    Attributes:
        name: the string as given ("2xv5e:16x16").
        platform: "cpu" or "tpu".
        shape: chips along each torus axis of one slice; (N,) for cpu:N.
        slices: slices joined over DCN (1 for one slice and for cpu).
        chip: the TPU generation (None for cpu).
    """

    name: str
    platform: str
    shape: tuple[int, ...]
    slices: int = 1
    chip: Chip | None = None

    @property
    def num_devices(self) -> int:
        return math.prod(self.shape) * self.slices

    @property
    def libtpu_name(self) -> str:
        """libtpu's name of one slice ("v5e:16x16"; v5p is "v5:4x4x4")."""
        return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.shape))}"

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Which torus axes wrap around. Full-size v5e/v6e axes (16 chips) wrap; v4/v5p
        slices wrap on all axes once every axis is a multiple of 4 (a whole cube)."""
        if self.chip.dims == 2:
            return (self.shape[0] == 16, self.shape[1] == 16, False)
        cube = all(n % 4 == 0 for n in self.shape)
        return (cube, cube, cube)

    @property
    def host_bounds(self) -> tuple[int, int, int]:
        """Chips per host along each axis (a slice smaller than a host is one host)."""
        shape = (*self.shape, 1, 1)[:3]
        return tuple(min(a, b) for a, b in zip(shape, CHIPS_PER_HOST_BOUNDS, strict=True))

    @property
    def hbm_bytes(self) -> int | None:
        return None if self.chip is None else self.chip.hbm_bytes

    @property
    def peak_flops(self) -> float | None:
        return None if self.chip is None else self.chip.peak_flops


def _unknown(text: str, why: str = "") -> JaxgenError:
    return JaxgenError(f"unknown topology {text!r}{why} (known: {KNOWN})")


def parse_topology(text: str) -> Topology:
    """`cpu:8`, `v5e:4x4`, `v5p:4x4x4`, `2xv5e:16x16` -> a Topology.

    Raises:
        JaxgenError: one line naming the string and listing the known forms.
    """
    m = _PATTERN.fullmatch(text.strip().lower())
    if not m:
        raise _unknown(text)
    slices_text, chip_name, shape_text = m.groups()
    slices = int(slices_text) if slices_text else 1
    parts = shape_text.split("x")
    if slices < 1 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise _unknown(text)
    shape = tuple(int(p) for p in parts)
    if chip_name == "cpu":
        if len(shape) != 1 or slices_text:
            raise _unknown(text, ": cpu takes one device count, cpu:N")
        return Topology(text, "cpu", shape)
    chip = CHIPS.get(chip_name)
    if chip is None:
        raise _unknown(text, f": no chip {chip_name!r}")
    if len(shape) != chip.dims:
        raise _unknown(text, f": {chip_name} slices have {chip.dims} axes")
    return Topology(text, "tpu", shape, slices, chip)
