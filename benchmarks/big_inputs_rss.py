"""Peak RSS of `jaxgen generate --input` and `jaxgen data prepare` at two input sizes each
(issue 18, item 6: memory must not grow with the file).

    .venv/bin/python benchmarks/big_inputs_rss.py [--work /tmp/big-inputs] \
        [--decode-lines 2000,8000] [--resume-lines 100000,1000000] [--prepare-mb 100,1000]

Each case runs the CLI in a child process and reads its peak RSS from `os.wait4`
(ru_maxrss of that process; data prepare tokenizes in-process with a char tokenizer, so no
worker is left out). One JSON line per case: command, input size, peak RSS, seconds.

- decode: every line generated (tiny random model, greedy, max_new_tokens=1, batch 64);
  short prompts, so the time is decoding, not reading.
- resume: ~1 KB prompt lines (1M lines = 1 GB); the output already holds all but the last
  500 ids (as after a crash), so the run reads the whole input and output, checks every
  line and generates only the rest.
- prepare: a text corpus (Tiny Shakespeare repeated) through `data prepare` with an
  existing char tokenizer (tokenizer.path), documents: file.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
JAXGEN = [sys.executable, "-m", "jaxgen.cli.app"]
TEXT = (ROOT / "data" / "tinyshakespeare.txt").read_text()
_LONG = "the cat sat on the mat. " * 42  # ~1 KB of prompt per line


def _run(cmd: list[str], cwd: pathlib.Path) -> tuple[int, float, float]:
    """(exit code, peak RSS in MB, seconds) of `cmd` in a child process."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    with open(cwd / "child.log", "ab") as log:
        child = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024, seconds


def _run_dir(work: pathlib.Path) -> pathlib.Path:
    """A tiny random-weight run directory (as tests/test_language_model.py's fixture)."""
    run = work / "run"
    if (run / "config.yaml").exists():
        return run
    import jax

    from jaxgen.checkpoint import save_params
    from jaxgen.config import load_config
    from jaxgen.data.tokenizer_training import train_tokenizer
    from jaxgen.model.transformer import init_params

    (work / "corpus.txt").write_text(TEXT[:50_000])
    config = load_config(
        None,
        [
            "model.preset=tiny", "model.vocab_size=256", "model.dtype=float32",
            f"data.train_files=[{work / 'corpus.txt'}]", f"data.data_dir={work / 'prepared'}",
            "tokenizer.vocab_size=80", "generate.batch_size=64", "generate.max_new_tokens=1",
        ],
    )  # fmt: skip
    params = jax.jit(init_params, static_argnums=0)(config.model, jax.random.key(0))
    save_params(run, config, params, tokenizer_path=train_tokenizer(config))
    return run


def _generate(work: pathlib.Path, run: pathlib.Path, lines: int, kind: str) -> dict:
    case = work / f"{kind}-{lines}"
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    prompts, out = case / "prompts.jsonl", case / "out.jsonl"
    with open(prompts, "w") as f:
        for i in range(lines):
            if kind == "decode":
                record = {"id": i, "prompt": f"the cat {'sat ' * (i % 7)}on the mat"}
            else:
                record = {"id": i, "prompt": f"{i} {_LONG}", "truncate_prompt": True}
            f.write(json.dumps(record) + "\n")
    if kind == "resume":  # done before a crash: every id but the last 500
        with open(out, "w") as f:
            f.writelines(json.dumps({"id": i}) + "\n" for i in range(lines - 500))
    cmd = [*JAXGEN, "generate", "--run", str(run), "--input", str(prompts), "--output", str(out),
           "--temperature", "0", "--max-new-tokens", "1", "--batch-size", "64", "--no-progress"]  # fmt: skip
    code, rss, seconds = _run(cmd, case)
    written = sum(1 for _ in open(out))
    result = {
        "case": f"generate --input ({kind})",
        "lines": lines,
        "input_mb": round(prompts.stat().st_size / 1e6, 1),
        "generated": 500 if kind == "resume" else lines,
        "exit": code,
        "output_lines": written,
        "peak_rss_mb": round(rss, 1),
        "seconds": round(seconds, 1),
        "command": " ".join(cmd[2:]),
    }
    shutil.rmtree(case)
    return result


def _prepare(work: pathlib.Path, run: pathlib.Path, megabytes: int) -> dict:
    case = work / f"prepare-{megabytes}"
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    corpus = case / "corpus.txt"
    block = TEXT.encode()
    with open(corpus, "wb") as f:
        for _ in range(megabytes * 1_000_000 // len(block) + 1):
            f.write(block)
    tokenizer = _char_tokenizer(work)
    cmd = [*JAXGEN, "data", "prepare", str(ROOT / "configs" / "tiny.yaml"), "tokenizer.kind=char",
           f"tokenizer.path={tokenizer}", f"data.train_files=[{corpus}]",
           f"data.data_dir={case / 'prepared'}", "data.name=big"]  # fmt: skip
    code, rss, seconds = _run(cmd, case)
    result = {
        "case": "data prepare (text, char tokenizer)",
        "input_mb": round(corpus.stat().st_size / 1e6, 1),
        "exit": code,
        "peak_rss_mb": round(rss, 1),
        "seconds": round(seconds, 1),
        "mb_per_s": round(corpus.stat().st_size / 1e6 / seconds, 2),
        "command": " ".join(cmd[2:]),
    }
    shutil.rmtree(case)
    return result


def _char_tokenizer(work: pathlib.Path) -> pathlib.Path:
    from jaxgen.config import load_config
    from jaxgen.data.tokenizer_training import train_tokenizer

    config = load_config(
        None,
        ["tokenizer.kind=char", "tokenizer.vocab_size=100", f"data.train_files=[{work / 'corpus.txt'}]",
         f"data.data_dir={work / 'char'}"],
    )  # fmt: skip
    return train_tokenizer(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/big-inputs")
    parser.add_argument("--decode-lines", default="2000,8000")
    parser.add_argument("--resume-lines", default="100000,1000000")
    parser.add_argument("--prepare-mb", default="100,1000")
    args = parser.parse_args()
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    run = _run_dir(work)
    sizes = lambda text: [int(s) for s in text.split(",") if s]  # noqa: E731
    for lines in sizes(args.decode_lines):
        print(json.dumps(_generate(work, run, lines, "decode")), flush=True)
    for lines in sizes(args.resume_lines):
        print(json.dumps(_generate(work, run, lines, "resume")), flush=True)
    for megabytes in sizes(args.prepare_mb):
        print(json.dumps(_prepare(work, run, megabytes)), flush=True)


if __name__ == "__main__":
    main()
