"""`jaxgen plan CONFIG --topology TOPO [key=value ...]`: compile ahead of time for a topology
and report memory per device, FLOPs and the step time at a given MFU (jaxgen/plan/)."""

from __future__ import annotations

import argparse
import json
import re

from jaxgen.cli.common import add_config_args

_HELP = "compile ahead of time for a pod topology and report memory per device"
_EPILOG = (
    "topologies: cpu:N (fake CPU devices), v4:AxBxC, v5e:AxB, v5p:AxBxC, v6e:AxB, and Kx in front for"
    ' K slices (2xv5e:16x16); TPU topologies need libtpu: pip install -e ".[tpu]".'
    " Exit status: 0 fits, 3 does not fit, 1 bad input."
)
DOES_NOT_FIT = 3  # exit status, so a launch script can stop before paying for the slice
_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"([0-9]*\.?[0-9]+)\s*([a-z]*)")


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help=_HELP, description=_HELP, epilog=_EPILOG)
    add_config_args(p)
    p.add_argument("--topology", required=True, help="cpu:8, v5e:4x4, v5e:16x16, 2xv5e:16x16, v4:2x2x2, ...")
    p.add_argument(
        "--generate", action="store_true", help="plan the decoding program instead of the train step"
    )
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument("--mfu", type=float, default=0.5, help="model FLOPs utilisation for the step time (0.5)")
    p.add_argument("--hbm", type=parse_size, help="memory per device to judge against (e.g. 16GiB, 512MiB)")
    p.add_argument(
        "--advice-seconds",
        type=float,
        default=600.0,
        help="when it does not fit, compile the knobs that would help for at most this long (0: estimate)",
    )
    p.set_defaults(handler=_cmd_plan)


def parse_size(text: str) -> int:
    """'16GiB', '512 MiB', '1000' (bytes) -> bytes."""
    m = _SIZE.fullmatch(text.strip().lower())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 16GiB, 512MiB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _cmd_plan(args: argparse.Namespace) -> int:
    from jaxgen.plan import format_plan, make_plan, parse_topology, prepare_host, topology_devices

    topology = parse_topology(args.topology)
    prepare_host(topology)  # before anything starts JAX's backends
    from jaxgen.config import load_config

    config = load_config(args.config, args.overrides)
    plan = make_plan(
        config,
        topology,
        topology_devices(topology),
        generate=args.generate,
        mfu=args.mfu,
        hbm=args.hbm,
        advice_seconds=args.advice_seconds,
    )
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0 if plan.fits else DOES_NOT_FIT
