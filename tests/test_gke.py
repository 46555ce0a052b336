"""launch/gke/: the JobSet manifests render, parse, and agree with their topology (hosts x
chips per host = the slice's chips); the shipped examples are what render.py writes."""

import math
import pathlib
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
GKE = ROOT / "launch" / "gke"
IMAGE = "us-docker.pkg.dev/PROJECT/jaxgen/jaxgen:latest"
# The shipped examples and the render.py arguments that write them.
EXAMPLES = {
    "v5e-4x4.yaml": ["--topology", "v5e:4x4", "--run-dir", "/mnt/runs/gpt2_124m"],
    "v5e-4x4-2slices.yaml": ["--topology", "v5e:4x4", "--slices", "2", "--name", "jaxgen-2slices",
                             "--run-dir", "/mnt/runs/gpt2_124m-2slices"],
}  # fmt: skip


def render(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(GKE / "render.py"),
            "--image",
            IMAGE,
            "--config",
            "configs/gpt2_124m.yaml",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def pod_of(manifest: dict) -> tuple[dict, dict, dict]:
    """(the replicated job, its Job spec, its pod spec)."""
    (replicated,) = manifest["spec"]["replicatedJobs"]
    job = replicated["template"]["spec"]
    return replicated, job, job["template"]["spec"]


@pytest.mark.parametrize(
    "topology, slices, label, hosts, chips",
    [
        ("v5e:4x4", 1, "tpu-v5-lite-podslice", 4, 4),
        ("v5e:4x4", 2, "tpu-v5-lite-podslice", 4, 4),
        ("v5e:16x16", 1, "tpu-v5-lite-podslice", 64, 4),
        ("v5e:2x4", 1, "tpu-v5-lite-podslice", 1, 8),
        ("v5p:4x4x4", 1, "tpu-v5p-slice", 16, 4),
        ("v6e:8x8", 2, "tpu-v6e-slice", 16, 4),
    ],
)
def test_manifest_hosts_chips_and_topology_agree(topology, slices, label, hosts, chips):
    result = render("--topology", topology, "--slices", str(slices), "train.steps=10")
    assert result.returncode == 0, result.stderr
    manifest = yaml.safe_load(result.stdout)
    assert (manifest["apiVersion"], manifest["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    annotations = manifest["metadata"]["annotations"]
    assert annotations["alpha.jobset.sigs.k8s.io/exclusive-topology"] == "cloud.google.com/gke-nodepool"
    replicated, job, pod = pod_of(manifest)
    shape = topology.split(":")[1]
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": label,
        "cloud.google.com/gke-tpu-topology": shape,
    }
    assert replicated["replicas"] == slices and job["parallelism"] == job["completions"] == hosts
    (container,) = pod["containers"]
    resources = container["resources"]
    assert resources["requests"] == resources["limits"] == {"google.com/tpu": chips}
    dims = [int(d) for d in shape.split("x")]
    assert hosts * chips == math.prod(dims)
    dcn = [] if slices == 1 else [f"mesh.dcn_data={slices}"]  # the mesh spans the slices
    assert container["command"] == ["jaxgen", "train", "configs/gpt2_124m.yaml", "train.steps=10", *dcn]
    env = {e["name"]: e for e in container["env"]}
    if slices == 1:
        assert env == {}
    else:
        assert env["MEGASCALE_NUM_SLICES"]["value"] == str(slices)
        assert "job-index" in env["MEGASCALE_SLICE_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
        assert env["MEGASCALE_COORDINATOR_ADDRESS"]["value"].startswith(
            "$(JOBSET_NAME)-slice-0-0.$(JOBSET_NAME):"
        )


@pytest.mark.parametrize("name, args", EXAMPLES.items())
def test_shipped_examples_are_rendered(name, args):
    result = render(*args)
    assert result.returncode == 0, result.stderr
    assert (GKE / name).read_text() == result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--topology", "v9:4x4"],
            "unknown topology 'v9:4x4' (known: v4:AxBxC, v5e:AxB, v5p:AxBxC, v6e:AxB)",
        ),
        (["--topology", "v5e:4x4x4"], "unknown topology 'v5e:4x4x4': v5e slices have 2 axes"),
        (["--topology", "v5e:4x4", "--slices", "0"], "--slices 0: must be at least 1"),
        (["--topology", "v5e:4x4", "steps"], "override 'steps' is not key=value"),
    ],
)
def test_bad_input_is_one_line(args, message):
    result = render(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"render.py: error: {message}") and result.stderr.count("\n") == 1
