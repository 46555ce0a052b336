"""YAML as plain data, with limits: no Python tags, no alias bombs, no endless numbers.

Configs and overrides come from anywhere (a shared file, a copied run directory), so
reading one must never run code or exhaust memory:

- PyYAML's safe loader builds only plain types; a tag such as `!!python/object/apply:os.system`
  is refused with a line naming it.
- Aliases share one node, so a "billion laughs" document is small to parse but
  exponential to walk (pydantic's validation, or repr in an error message, would
  expand it). The node graph is measured with aliases expanded before anything is
  built from it, and refused past `MAX_NODES`.
- An integer of more than Python's 4,300 digits raises ValueError inside the
  constructor (CPython's guard against quadratic int parsing); it becomes a line too.
"""

from __future__ import annotations

import yaml

from jaxgen.errors import JaxgenError

MAX_BYTES = 1 << 20  # a config is a few kB; a megabyte is already a mistake
MAX_NODES = 100_000  # scalars, lists and mappings after expanding every alias


class _Refused(yaml.YAMLError):
    def __init__(self, message: str, mark):
        super().__init__(message)
        self.message, self.mark = message, mark


def _expanded_size(node: yaml.Node, memo: dict[int, int], active: set[int]) -> int:
    """Nodes under `node` with aliases expanded; memoised so a bomb costs its size, not its expansion."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise _Refused("a recursive alias (a value that contains itself)", node.start_mark)
    if isinstance(node, yaml.ScalarNode):
        return 1
    active.add(key)
    children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
    size = 1
    for child in children:
        size += _expanded_size(child, memo, active)
        if size > MAX_NODES:  # stop early: the full count of a bomb is astronomically large
            raise _Refused(f"its aliases expand to more than {MAX_NODES:,} values", node.start_mark)
    active.discard(key)
    memo[key] = size
    return size


class _Loader(yaml.SafeLoader):
    """The safe loader, measuring each document's expanded size before constructing it."""

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _expanded_size(node, {}, set())
        return node


def safe_load(text: str, where: str, *, numbered: bool = True):
    """Parses YAML text as plain data.

    Args:
        text: the document; where: the file (or override) it came from, for messages.
        numbered: name the line in messages (a file's; an override is one line).
    Raises:
        JaxgenError: `where[:line]: ...` for invalid YAML, a Python tag, an alias bomb, a
            recursive alias, an integer of more than 4,300 digits or a text over MAX_BYTES.
    """
    if len(text) > MAX_BYTES:
        raise JaxgenError(
            f"{where}: {len(text):,} characters is too large for a config (limit {MAX_BYTES:,})"
        )
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except _Refused as e:
        raise JaxgenError(f"{where}{_line(e.mark, numbered)}: refused: {e.message}") from None
    except yaml.constructor.ConstructorError as e:
        if e.problem and "could not determine a constructor for the tag" in e.problem:
            name = e.problem.split("tag ", 1)[1].strip("'").replace("tag:yaml.org,2002:", "!!")
            raise JaxgenError(
                f"{where}{_line(e.problem_mark, numbered)}: refused: YAML tag {name} (configs are plain data;"
                " jaxgen never builds Python objects from YAML)"
            ) from None
        problem = " ".join(str(e.problem or e).split())
        raise JaxgenError(f"{where}{_line(e.problem_mark, numbered)}: invalid YAML ({problem})") from None
    except yaml.YAMLError as e:  # the reader's own errors span lines: one line here
        mark = getattr(e, "problem_mark", None)
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise JaxgenError(f"{where}{_line(mark, numbered)}: invalid YAML ({problem})") from None
    except ValueError as e:  # int() past sys.get_int_max_str_digits(), a date like 2024-13-01
        raise JaxgenError(f"{where}: invalid YAML ({str(e).split(';')[0]})") from None
    except RecursionError:
        raise JaxgenError(f"{where}: invalid YAML (nested too deeply)") from None


def _line(mark, numbered: bool) -> str:
    return f":{mark.line + 1}" if mark is not None and numbered else ""
