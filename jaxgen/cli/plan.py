"""`jaxgen plan`: ahead-of-time compilation for a pod topology (a later issue fills it in)."""

from __future__ import annotations

from jaxgen.cli.common import not_implemented


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="compile ahead of time for a pod topology and report memory")
    p.set_defaults(handler=not_implemented("plan"))
