#!/usr/bin/env python3
"""Renders a JobSet manifest that runs `jaxgen train CONFIG` on GKE TPU slices.

    python launch/gke/render.py --image IMAGE --config configs/gpt2_124m.yaml \\
        --topology v5e:4x4 [--slices 2] [--name jaxgen] [--run-dir gs://b/run] [key=value ...] \\
        | kubectl apply -f -

One pod per TPU host, each holding all of its host's chips (`google.com/tpu`), one Job
per slice. GKE gives each pod of a slice the slice's worker list (`TPU_WORKER_HOSTNAMES`,
`TPU_WORKER_ID`), from which `jaxgen train` joins one JAX job; with `--slices K` the
`MEGASCALE_*` variables set here join the K slices over the data-centre network. The
exclusive-topology annotation puts each slice's Job on a node pool of its own.

Standalone on purpose (PyYAML only, no jaxgen import): it runs wherever kubectl does.
"""

from __future__ import annotations

import argparse
import math
import re
import sys

import yaml

# TPU generation -> (GKE accelerator label, torus axes, chips per host in a multi-host slice).
ACCELERATORS = {
    "v4": ("tpu-v4-podslice", 3, 4),
    "v5e": ("tpu-v5-lite-podslice", 2, 4),
    "v5p": ("tpu-v5p-slice", 3, 4),
    "v6e": ("tpu-v6e-slice", 2, 4),
}
KNOWN = "v4:AxBxC, v5e:AxB, v5p:AxBxC, v6e:AxB"
# Single-host v5e/v6e shapes put up to 8 chips on one host.
SINGLE_HOST_MAX = 8
COORDINATOR_PORT = 8080


class RenderError(Exception):
    pass


def slice_shape(topology: str) -> tuple[str, str, int, int]:
    """'v5e:4x4' -> (accelerator label, GKE topology '4x4', hosts, chips per host)."""
    m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)*)", topology.strip())
    if not m or m.group(1) not in ACCELERATORS:
        raise RenderError(f"unknown topology {topology!r} (known: {KNOWN})")
    label, axes, per_host = ACCELERATORS[m.group(1)]
    dims = [int(d) for d in m.group(2).split("x")]
    if len(dims) != axes or min(dims) < 1:
        raise RenderError(
            f"unknown topology {topology!r}: {m.group(1)} slices have {axes} axes (known: {KNOWN})"
        )
    chips = math.prod(dims)
    if axes == 2 and chips <= SINGLE_HOST_MAX:
        return label, m.group(2), 1, chips
    if chips % per_host:
        raise RenderError(f"topology {topology!r}: {chips} chips do not fill hosts of {per_host}")
    return label, m.group(2), chips // per_host, per_host


def _field(path: str) -> dict:
    return {"valueFrom": {"fieldRef": {"fieldPath": path}}}


def _env(slices: int) -> list[dict]:
    if slices == 1:
        return []  # GKE sets TPU_WORKER_HOSTNAMES / TPU_WORKER_ID for every pod of the slice
    # Multi-slice: every process finds slice 0's first pod as the DCN coordinator.
    return [
        {"name": "JOBSET_NAME", **_field("metadata.annotations['jobset.sigs.k8s.io/jobset-name']")},
        {
            "name": "MEGASCALE_COORDINATOR_ADDRESS",
            "value": f"$(JOBSET_NAME)-slice-0-0.$(JOBSET_NAME):{COORDINATOR_PORT}",
        },
        {"name": "MEGASCALE_NUM_SLICES", "value": str(slices)},
        {"name": "MEGASCALE_SLICE_ID", **_field("metadata.annotations['jobset.sigs.k8s.io/job-index']")},
    ]


def render(
    image: str, config: str, topology: str, slices: int = 1, name: str = "jaxgen", run_dir=None, overrides=()
) -> dict:
    """The JobSet as a dict (`yaml.safe_dump` writes it)."""
    if slices < 1:
        raise RenderError(f"--slices {slices}: must be at least 1")
    label, shape, hosts, per_host = slice_shape(topology)
    command = ["jaxgen", "train", config]
    if run_dir:
        command += ["--run-dir", run_dir]
    command += list(overrides)
    if slices > 1 and not any(o.startswith(("mesh.dcn_data=", "mesh.dcn_fsdp=")) for o in overrides):
        # The mesh spans the slices on its data axis (jaxgen/runtime/mesh.py): only the
        # gradient reduction crosses the data center network.
        command.append(f"mesh.dcn_data={slices}")
    tpus = {"google.com/tpu": per_host}
    pod = {
        "restartPolicy": "Never",
        "nodeSelector": {
            "cloud.google.com/gke-tpu-accelerator": label,
            "cloud.google.com/gke-tpu-topology": shape,
        },
        "containers": [
            {
                "name": "jaxgen",
                "image": image,
                "command": command,
                "ports": [{"containerPort": 8471}, {"containerPort": COORDINATOR_PORT}],
                "env": _env(slices),
                "resources": {"requests": dict(tpus), "limits": dict(tpus)},
            }
        ],
    }
    job = {
        "parallelism": hosts,
        "completions": hosts,
        "backoffLimit": 0,  # a lost host fails the slice; resubmit to resume from the checkpoint
        "template": {"spec": pod},
    }
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {
            "name": name,
            "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"},
        },
        "spec": {
            "failurePolicy": {"maxRestarts": 0},
            "network": {"enableDNSHostnames": True},
            "replicatedJobs": [{"name": "slice", "replicas": slices, "template": {"spec": job}}],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="render.py", description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True, help="container image with jaxgen[tpu] installed")
    parser.add_argument("--config", required=True, help="config path inside the image")
    parser.add_argument("--topology", required=True, help=f"one slice: {KNOWN}")
    parser.add_argument("--slices", type=int, default=1, help="slices joined over DCN (default 1)")
    parser.add_argument("--name", default="jaxgen", help="JobSet name")
    parser.add_argument("--run-dir", help="run directory every host shares (e.g. a gs:// path or a mount)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for jaxgen train")
    args = parser.parse_args(argv)
    try:
        bad = [o for o in args.overrides if "=" not in o or o.startswith("-")]
        if bad:
            raise RenderError(f"override {bad[0]!r} is not key=value")
        manifest = render(
            args.image, args.config, args.topology, args.slices, args.name, args.run_dir, args.overrides
        )
    except RenderError as e:
        print(f"render.py: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(yaml.safe_dump(manifest, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
