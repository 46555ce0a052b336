"""`jaxgen generate --interactive`: a prompt per line, each completion streamed, one program.

Lines come from the terminal (with line editing where `readline` exists) or a pipe. A
line starting with ":" is a command (`:help` lists them): `:set temperature 0.7` sets any
option that has a flag, `:unset` returns it to the command line's value, `:quit` (or the
end of input) ends the session. Ctrl-C stops the completion being written and returns to
the prompt, not the session. The k-th prompt (from 0) samples as row k does in
`LanguageModel.generate`, so piping the same lines with the same seed repeats the text.

The decode program compiles once per session: the sampling values (temperature, top-p,
min-p, seed) are inputs of the compiled loop (decode/sampling.py: SampleKnobs), and every
prompt is left-padded to one width, the room `max_new_tokens` leaves in the model's
context, so prompts of any length share one program. The price is prefill work on the
padding of each prompt; a run whose `generate.prompt_buckets` is set keeps its buckets
instead. Options that shape the program (top-k, whether top-p/min-p filter at all, stop
strings, num_beams, max_new_tokens' power-of-two bucket) compile a new one when changed;
the earlier ones stay cached for the session.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

from jaxgen.cli import options
from jaxgen.cli.completion import complete
from jaxgen.errors import JaxgenError

_HELP = """\
:set KEY VALUE   change an option for the next prompts (any generate flag: temperature, top_p, seed, ...)
:unset KEY       back to the command line's value (else the run config's)
:show            the options in effect
:quit            end the session (so does Ctrl-D); Ctrl-C stops the current completion"""


def terminal_lines(stream=sys.stdin) -> Iterator[str]:
    """Lines typed at a `> ` prompt, or read from `stream` when it is not a terminal."""
    if not stream.isatty():
        for line in stream:
            yield line.rstrip("\r\n")
        return
    try:
        import readline  # noqa: F401  (imported for its effect: line editing and history in input())
    except ImportError:
        pass
    while True:
        try:
            yield input("> ")
        except KeyboardInterrupt:  # at the prompt, Ctrl-C drops the line, as Python's REPL does
            print()
        except EOFError:
            print()
            return


def run(lm, base: dict, lines: Iterable[str], *, chat=False, chunk=8, stream=True, echo=True) -> int:
    """Completes each prompt line of `lines` on stdout; commands change `base`'s options.

    Args:
        lm: a `LanguageModel`.
        base: the command line's generate options (over the run config's).
        echo: print each prompt before its completion (a terminal already shows it).

    Returns:
        0 (errors in a line are printed and the session goes on).
    """
    lm.resolve(**base)  # bad command-line options fail before the first prompt
    session: dict = {}
    count = 0
    for line in lines:
        if line.startswith(":"):
            try:
                if not _command(lm, line, base, session):
                    break
            except JaxgenError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        if not line.strip():
            continue
        try:
            opts = _one_width(lm, base | session)
            complete(
                lm, line, opts, chat=chat, chunk=chunk, stream=stream, echo=echo, row_id=count, where="prompt"
            )
        except JaxgenError as e:
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:  # the completion stops; the session goes on
            print()
            print("(stopped)", file=sys.stderr)
        count += 1
    return 0


def _command(lm, line: str, base: dict, session: dict) -> bool:
    """Applies one `:` command to `session`; False for `:quit`."""
    name, *rest = line[1:].split(None, 2) or ["help"]
    if name in ("quit", "q", "exit"):
        return False
    if name == "set":
        if len(rest) != 2:
            raise JaxgenError(f"{line!r}: expected :set KEY VALUE")
        key = rest[0].replace("-", "_")
        value = options.parse_option(rest[0], rest[1])
        lm.resolve(**(base | session | {key: value}))  # a bad value leaves the options as they were
        session[key] = value
    elif name == "unset" and len(rest) >= 1:
        session.pop(rest[0].replace("-", "_"), None)
    elif name == "show" and not rest:
        req = lm.resolve(**(base | session))
        for key in options.names():
            value = req.max_length if key == "max_length" else getattr(req.options, key)
            print(f"{key} = {value!r}")
    elif name == "help" and not rest:
        print(_HELP)
    else:
        raise JaxgenError(f"{line!r}: unknown command (:help lists them)")
    return True


def _one_width(lm, opts: dict) -> dict:
    """`opts` with every prompt that fits padded to one width (the module docstring says why),
    unless prompt buckets are configured."""
    req = lm.resolve(**opts)
    if req.options.prompt_buckets:
        return opts
    max_len = lm.config.model.max_len
    if req.max_length is None:
        width = max_len - req.max_new_tokens
    else:  # HF's max_length counts the prompt: it may take all but one of those tokens
        width = min(req.max_length, max_len) - 1
    return opts if width < 1 else opts | {"prompt_buckets": (width,)}
