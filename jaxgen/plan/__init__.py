"""Ahead-of-time fit: compile the real train step (or decoding loop) for a topology that
is not attached (fake CPU devices, or a TPU slice described by libtpu) and report its
memory per device against the chip's HBM, its FLOPs, and the knobs that would help."""

from jaxgen.plan.devices import Devices, prepare_host, topology_devices
from jaxgen.plan.planner import make_plan, resolve_for
from jaxgen.plan.report import Advice, Plan, format_plan
from jaxgen.plan.topology import CHIPS, EXAMPLES, Topology, parse_topology

__all__ = [
    "CHIPS",
    "EXAMPLES",
    "Advice",
    "Devices",
    "Plan",
    "Topology",
    "format_plan",
    "make_plan",
    "parse_topology",
    "prepare_host",
    "resolve_for",
    "topology_devices",
]
