"""Which of jaxgen's runtime dependencies travel to the GPU machine as wheels.

The GPU machine has no network; its image already holds JAX (CUDA), torch, transformers,
flax, optax, orbax-checkpoint and many common packages. What it lacks is the closure of
pyproject.toml's dependencies minus what it has, at the versions installed in this
checkout's virtualenv (the versions the test suite runs with).

    python benchmarks/gpu/wheel_list.py                 # name==version lines (prepare_wheels.sh)
    python benchmarks/gpu/wheel_list.py --missing FILE  # on the GPU machine: the lines of FILE
                                                        # whose package is not installed there
"""

from __future__ import annotations

import argparse
import importlib.metadata
import pathlib
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = pathlib.Path(__file__).resolve().parents[2]

# The GPU machine's image (its pip list, 2026-11-17): not carried. run.sh installs only the
# wheels whose package is missing there anyway, so an out-of-date entry costs bytes, not a
# broken environment. The first line is what the benchmark relies on being there.
GPU_IMAGE = frozenset(canonicalize_name(n) for n in """
jax jaxlib jax-cuda13-plugin jax-cuda13-pjrt flax optax orbax-checkpoint torch transformers triton
absl-py aiofiles attrs certifi charset-normalizer chex click cloudpickle etils filelock fsspec
grpcio hf-xet httpx huggingface-hub humanize idna jinja2 markdown-it-py markupsafe mdurl ml-dtypes
msgpack numpy opt-einsum packaging pandas pillow protobuf psutil pyarrow pygments
pyyaml regex requests rich safetensors scipy sentencepiece setuptools simplejson six tensorboard
tensorstore tokenizers toolz tqdm treescope typing-extensions urllib3 wheel wrapt zipp
""".split())  # fmt: skip

# Markers evaluated for the GPU machine: CPython 3.12 on x86-64 Linux, no extras.
_GPU_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "extra": ""}  # fmt: skip


def dependencies() -> list[Requirement]:
    """pyproject.toml's runtime dependencies."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(d) for d in project["dependencies"]]


def closure(python_version: str = "3.12") -> dict[str, str]:
    """Package -> installed version for every dependency (transitively) not on the GPU image.

    Raises:
        SystemExit: a needed package is not installed here (so its version is unknown).
    """
    env = _GPU_ENV | {"python_version": python_version, "python_full_version": f"{python_version}.0"}
    found: dict[str, str] = {}
    todo = dependencies()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in GPU_IMAGE or name in found or (req.marker and not req.marker.evaluate(env)):
            continue
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(
                f"wheel_list: {req.name} is needed on the GPU machine but not installed here"
            ) from None
        found[name] = dist.version
        todo += [Requirement(r) for r in dist.requires or []]
    return dict(sorted(found.items()))


def missing(requirements: pathlib.Path) -> list[str]:
    """The `name==version` lines of `requirements` whose package is not installed here."""
    out = []
    for line in requirements.read_text(encoding="utf-8").split():
        try:
            importlib.metadata.distribution(Requirement(line).name)
        except importlib.metadata.PackageNotFoundError:
            out.append(line)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (major.minor)")
    parser.add_argument(
        "--missing", type=pathlib.Path, help="print the lines of this file not installed here"
    )
    args = parser.parse_args(argv)
    lines = (
        missing(args.missing)
        if args.missing
        else [f"{n}=={v}" for n, v in closure(args.python_version).items()]
    )
    sys.stdout.write("".join(line + "\n" for line in lines))


if __name__ == "__main__":
    main()
