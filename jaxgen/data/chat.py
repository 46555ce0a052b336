"""Chat rendering: conversations -> text, with the loss on one role's turns.

A Hugging Face tokenizer directory may carry a `chat_template` (Jinja2) in
`tokenizer_config.json` (or a `chat_template.jinja` beside it, which wins, as in
transformers). `ChatTemplate` renders it as transformers does: Jinja2's
`ImmutableSandboxedEnvironment` with `trim_blocks`/`lstrip_blocks`, the `raise_exception`
global and a `tojson` filter that keeps non-ASCII text. A template is a file from the
internet, so it runs only inside that sandbox: no attribute starting with `_`, no
mutating methods, nothing imported.

Which text is trained is found by prefix differences, so it works for any template
without markers in it: for each trained turn i, render(messages[:i], generation prompt)
is the untrained prefix, and render(messages[:i + 1]) minus that prefix is the turn the
model learns to write (content and end-of-turn marker). A template whose renders of
shorter conversations are not prefixes of longer ones (it rewrites earlier turns, as
templates that drop past reasoning do) cannot be split so and is refused. Each record
costs two renders per trained turn.

`PlainChat` is the format without a template: `data.turn_header` / `data.turn_separator`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import jinja2
import jinja2.ext
import jinja2.sandbox

from jaxgen.errors import JaxgenError
from jaxgen.tokenizer.hf import HFTokenizer

Parts = list[tuple[str, bool]]  # (text, trained) in order


class _TemplateRaised(Exception):
    """`raise_exception(message)` called by a template; reported with the template's file."""


def _raise_exception(message):
    raise _TemplateRaised(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: Jinja2's own `tojson` escapes <, >, & and ' for HTML.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _GenerationBlocks(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers) render
    their body: the trained spans come from prefix differences here, not from the markers."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


@functools.lru_cache(maxsize=16)
def _compile(text: str) -> jinja2.Template:
    """The compiled template (one compile per template text, shared by every record)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationBlocks]
    )
    env.filters["tojson"] = _tojson
    # No `strftime_now` (transformers has one): a render that reads the clock would make a
    # prepared dataset depend on the day it was built. Templates fall back to their default
    # date; pass date_string=... to `render` for another.
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(text)


def _one_line(message) -> str:
    return " ".join(str(message).split())


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A Jinja2 chat template with the special-token strings it may refer to.

    Attributes:
        text: the template source.
        source: the file it came from (named in every error).
        bos_token, eos_token: the tokenizer's strings for them, None when undefined.
    """

    text: str
    source: str = "chat_template"
    bos_token: str | None = None
    eos_token: str | None = None

    def __post_init__(self):
        self._template()  # a syntax error fails here, before any record is read

    @classmethod
    def from_directory(cls, directory: str | pathlib.Path) -> ChatTemplate | None:
        """The chat template of a Hugging Face tokenizer directory; None when it has none.

        Raises:
            JaxgenError: unreadable tokenizer_config.json, or a chat_template that is neither
                a string nor a list of {"name", "template"} with one named "default".
        """
        directory = pathlib.Path(directory)
        config_path = directory / "tokenizer_config.json"
        settings = _read_settings(config_path)
        jinja_path = directory / "chat_template.jinja"
        if jinja_path.is_file():
            try:
                text, source = jinja_path.read_text(encoding="utf-8"), jinja_path
            except (OSError, UnicodeDecodeError) as e:
                raise JaxgenError(f"{jinja_path}: cannot read the chat template ({_one_line(e)})") from None
        else:
            text, source = _pick(settings.get("chat_template"), config_path), config_path
        if text is None:
            return None
        return cls(text, str(source), _token(settings.get("bos_token")), _token(settings.get("eos_token")))

    def _template(self) -> jinja2.Template:
        try:
            return _compile(self.text)
        except jinja2.TemplateSyntaxError as e:
            raise JaxgenError(
                f"{self.source}: chat template line {e.lineno}: {_one_line(e.message)}"
            ) from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """The conversation as text, as transformers' `apply_chat_template(tokenize=False)`.

        Args:
            messages: [{"role": str, "content": str, ...}], passed to the template as they are.
            add_generation_prompt: end with the header of the reply to come.
            **kwargs: further template variables (tools, date_string, ...).

        Raises:
            JaxgenError: the template called raise_exception, the sandbox refused an access,
                or the template failed; the message names `source`.
        """
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        context = {k: v for k, v in special.items() if v is not None}
        context |= kwargs | {"messages": messages, "add_generation_prompt": add_generation_prompt}
        template = self._template()
        try:
            return template.render(**context)
        except _TemplateRaised as e:
            raise JaxgenError(f"{self.source}: chat template raised: {_one_line(e)}") from None
        except jinja2.sandbox.SecurityError as e:
            raise JaxgenError(
                f"{self.source}: chat template refused by the sandbox: {_one_line(e)}"
            ) from None
        except jinja2.TemplateError as e:
            raise JaxgenError(f"{self.source}: chat template failed: {_one_line(e)}") from None
        except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as e:
            # A template is user input: its runtime errors are the user's to fix, in one line.
            raise JaxgenError(
                f"{self.source}: chat template failed ({type(e).__name__}: {_one_line(e)})"
            ) from None

    def parts(
        self, messages: list[dict], trained_role: str = "assistant", add_generation_prompt: bool = False
    ) -> Parts:
        """The render cut into [(text, trained)]: trained_role's turns (content and end-of-turn
        marker) trained, the text between them not.

        A leading `bos_token` is cut from the first part: jaxgen's SFT encoding (and
        `LanguageModel.chat`) prepend the tokenizer's bos id to every record themselves, so
        keeping the template's would give two.

        Raises:
            JaxgenError: the template is not prefix-consistent, or fails (see `render`).
        """
        full = self.render(messages, add_generation_prompt)
        out: Parts = []
        pos = 0
        for i, message in enumerate(messages):
            if message.get("role") != trained_role:
                continue
            start = len(self._prefix(full, messages[:i], True, i))
            end = len(self._prefix(full, messages[: i + 1], False, i + 1))
            if not pos <= start <= end:
                raise self._inconsistent(i + 1)
            if start > pos:
                out.append((full[pos:start], False))
            if end > start:
                out.append((full[start:end], True))
            pos = end
        if pos < len(full):
            out.append((full[pos:], False))
        if out and self.bos_token and out[0][0].startswith(self.bos_token):
            text, trained = out[0]
            out[0] = (text[len(self.bos_token) :], trained)
        return [(t, trained) for t, trained in out if t]

    def _prefix(self, full: str, messages: list[dict], add_generation_prompt: bool, n: int) -> str:
        text = self.render(messages, add_generation_prompt)
        if not full.startswith(text):
            raise self._inconsistent(n)
        return text

    def _inconsistent(self, n: int) -> JaxgenError:
        return JaxgenError(
            f"{self.source}: chat template is not prefix-consistent: the render of the first {n} "
            "messages does not begin the render of the whole conversation, so the trained turns "
            "cannot be located"
        )


@dataclasses.dataclass(frozen=True)
class PlainChat:
    """The format without a template: `turn_header.format(role=...)`, content, `turn_separator`.

    `reply_role` is the role whose header `add_generation_prompt` ends with.
    """

    turn_header: str = "{role}: "
    turn_separator: str = "\n"
    reply_role: str = "assistant"

    @classmethod
    def from_data(cls, data) -> PlainChat:
        """The format of a `DataConfig` (its turn_header, turn_separator and trained_role)."""
        return cls(data.turn_header, data.turn_separator, data.trained_role)

    def parts(
        self, messages: list[dict], trained_role: str | None = None, add_generation_prompt: bool = False
    ) -> Parts:
        """[(header, False), (content + separator, role is trained_role)] per turn."""
        trained_role = self.reply_role if trained_role is None else trained_role
        out: Parts = []
        for m in messages:
            out.append((self.turn_header.format(role=m["role"]), False))
            out.append((m["content"] + self.turn_separator, m["role"] == trained_role))
        if add_generation_prompt:
            out.append((self.turn_header.format(role=self.reply_role), False))
        return out

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return "".join(text for text, _ in self.parts(messages, add_generation_prompt=add_generation_prompt))


def for_tokenizer(tokenizer) -> ChatTemplate | None:
    """The chat template of a Hugging Face tokenizer's directory; None for any other tokenizer."""
    if isinstance(tokenizer, HFTokenizer):
        return ChatTemplate.from_directory(tokenizer.directory)
    return None


def check_messages(messages, where: str) -> list[dict]:
    """`messages` when it is a non-empty list of {"role": str, "content": str}; else a JaxgenError."""
    if not isinstance(messages, list) or not messages:
        raise JaxgenError(f"{where}: expected a non-empty list of messages")
    for j, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise JaxgenError(f"{where}: message {j} needs a string 'role' and 'content'")
    return messages


def _read_settings(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JaxgenError(f"{path}: cannot read tokenizer settings ({_one_line(e)})") from None
    if not isinstance(settings, dict):
        raise JaxgenError(f"{path}: expected a JSON object, got {type(settings).__name__}")
    return settings


def _pick(value, path: pathlib.Path) -> str | None:
    """The template text of a `chat_template` entry: a string, or transformers' named list."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {}
        for entry in value:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)):
                raise JaxgenError(f"{path}: chat_template list entries need a 'name' and a 'template'")
            named[entry["name"]] = entry.get("template")
        if "default" not in named:
            raise JaxgenError(f"{path}: chat_template lists {sorted(named)} but none named 'default'")
        if not isinstance(named["default"], str):
            raise JaxgenError(f"{path}: chat_template 'default' is not a string")
        return named["default"]
    raise JaxgenError(f"{path}: chat_template is {type(value).__name__}, not a string")


def _token(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": ..., ...}
        value = value.get("content")
    return value if isinstance(value, str) else None
