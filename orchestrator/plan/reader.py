"""Reading a plan's YAML with line numbers: every problem is ``file:line: field: what``.

``annotate`` turns PyYAML's node tree into values that remember their line;
``Reader`` walks one mapping, checks types and ranges, and names unknown keys
(with the nearest known one). model.py builds the Plan with it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import PlanError
from orchestrator.limits import MAX_CARDS_PER_HOST, MAX_HOSTS, MAX_VERSION


class Node:
    """A YAML value with the line it came from."""

    __slots__ = ("line", "value")

    def __init__(self, value: Any, line: int) -> None:
        self.value = value
        self.line = line


# A plan is a page of YAML. Aliases are expanded as they are read, so a few hundred
# bytes of nested aliases ("billion laughs") would expand to billions of values:
# the expansion has a budget, and an alias that contains itself is refused.
MAX_PLAN_NODES = 100_000
MAX_PLAN_DEPTH = 64


def annotate(node: yaml.Node) -> Node:
    """The plan's values with their lines. Raises Problem if aliases expand past
    MAX_PLAN_NODES values, nest past MAX_PLAN_DEPTH, or refer to themselves."""
    return _annotate(node, [MAX_PLAN_NODES], [])


def _annotate(node: yaml.Node, budget: list[int], inside: list[yaml.Node]) -> Node:
    line = node.start_mark.line + 1
    budget[0] -= 1
    if budget[0] < 0:
        raise Problem(line, "", f"expands to more than {MAX_PLAN_NODES} values (aliases "
                      "nested in aliases?); a plan is a page of YAML")
    if any(node is outer for outer in inside):
        raise Problem(line, "", "an alias refers to the value that contains it (a cycle)")
    if len(inside) >= MAX_PLAN_DEPTH:
        raise Problem(line, "", f"nests deeper than {MAX_PLAN_DEPTH} levels")
    if isinstance(node, yaml.MappingNode):
        mapping: dict[str, tuple[Node, int]] = {}
        inside.append(node)
        for key_node, value_node in node.value:
            key = key_node.value
            if not isinstance(key, str):
                raise Problem(key_node.start_mark.line + 1, "", "a key must be a plain name")
            if key in mapping:
                raise Problem(key_node.start_mark.line + 1, str(key), "appears twice")
            mapping[key] = (_annotate(value_node, budget, inside), key_node.start_mark.line + 1)
        inside.pop()
        return Node(mapping, line)
    if isinstance(node, yaml.SequenceNode):
        inside.append(node)
        items = [_annotate(item, budget, inside) for item in node.value]
        inside.pop()
        return Node(items, line)
    return Node(_scalar(node), line)


def _scalar(node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


MAX_DOCUMENT_BYTES = 1 << 20


def read_document(source: Path, what: str) -> Node:
    """A YAML file (a plan, an agent's configuration) as values with their lines;
    PlanError naming the file if it cannot be read or is not one YAML document."""
    article = "an" if what[:1] in "aeiou" else "a"
    try:
        with open(source, "rb") as handle:
            raw = handle.read(MAX_DOCUMENT_BYTES + 1)
        if len(raw) > MAX_DOCUMENT_BYTES:
            raise PlanError(str(source), None, "", f"is larger than {MAX_DOCUMENT_BYTES} "
                            f"bytes: not {article} {what}")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise PlanError(str(source), None, "", f"{what} file not found") from None
    except IsADirectoryError:
        raise PlanError(str(source), None, "", f"is a directory, not {article} {what} file") \
            from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(str(source), None, "", f"cannot read {what}: {exc}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark else None
        raise PlanError(str(source), line, "", f"not valid YAML: {exc.problem}") from None
    if root is None:
        raise PlanError(str(source), None, "", f"{what} is empty")
    try:
        return annotate(root)
    except Problem as problem:
        raise PlanError(str(source), problem.line, problem.field_name,
                        problem.problem) from None


class Problem(Exception):
    def __init__(self, line: int | None, field_name: str, problem: str) -> None:
        super().__init__(problem)
        self.line = line
        self.field_name = field_name
        self.problem = problem


class Reader:
    """Walks one mapping, remembering what was read so unknown keys can be named."""

    def __init__(self, node: Node, path: str) -> None:
        if not isinstance(node.value, dict):
            raise Problem(node.line, path, "must be a mapping")
        self.node = node
        self.items: dict[str, tuple[Node, int]] = node.value
        self.path = path
        self.seen: set[str] = set()

    def field_name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.items

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, *,
            required: bool = False, check: Callable[[Any], str | None] | None = None) -> Any:
        self.seen.add(key)
        if key not in self.items:
            if required:
                raise Problem(self.node.line, self.field_name(key), "is required")
            return default
        value_node, line = self.items[key]
        value = value_node.value
        if isinstance(value, dict | list) or not isinstance(value, kind) or (
                isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple)
                                                         else (kind,))):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(
                k.__name__ for k in kind)
            raise Problem(line, self.field_name(key),
                           f"must be {_article(names)}, got {_describe(value)}")
        if check is not None and (problem := check(value)):
            raise Problem(line, self.field_name(key), problem)
        return value

    def child(self, key: str, *, required: bool = False) -> Reader | None:
        self.seen.add(key)
        if key not in self.items:
            if required:
                raise Problem(self.node.line, self.field_name(key), "is required")
            return None
        return Reader(self.items[key][0], self.field_name(key))

    def list_of(self, key: str, kind: type, *, default: tuple[Any, ...] = ()) -> tuple[Any, ...]:
        self.seen.add(key)
        if key not in self.items:
            return default
        value_node, line = self.items[key]
        if not isinstance(value_node.value, list):
            raise Problem(line, self.field_name(key), f"must be a list of {_plural(kind)}")
        result = []
        for index, item in enumerate(value_node.value):
            if isinstance(item.value, dict | list) or not isinstance(item.value, kind) or (
                    isinstance(item.value, bool) and kind is not bool):
                raise Problem(item.line, f"{self.field_name(key)}[{index}]",
                               f"must be {_article(kind.__name__)}, got {_describe(item.value)}")
            result.append(item.value)
        return tuple(result)

    def nodes(self, key: str) -> list[tuple[Node, int]]:
        self.seen.add(key)
        if key not in self.items:
            return []
        value_node, line = self.items[key]
        if not isinstance(value_node.value, list):
            raise Problem(line, self.field_name(key), "must be a list")
        return [(item, item.line) for item in value_node.value]

    def done(self) -> None:
        """Refuse the keys nobody asked for, naming the nearest known one."""
        for key, (_, line) in self.items.items():
            if key not in self.seen:
                near = difflib.get_close_matches(key, sorted(self.seen), n=1)
                hint = f": did you mean {near[0]!r}?" if near else ""
                raise Problem(line, self.field_name(key), f"is not a known key{hint}")


def _article(name: str) -> str:
    return ("an " if name[:1] in "aeiou" else "a ") + name.replace("str", "string").replace(
        "int", "integer").replace("float", "number").replace("bool", "boolean")


def _plural(kind: type) -> str:
    return {int: "integers", str: "strings", float: "numbers"}.get(kind, kind.__name__)


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"[:60]


def positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


def lease_ttl(value: float) -> str | None:
    return None if 1 <= value <= 3600 else "must be between 1 and 3600 seconds"


def partition_count(value: float) -> str | None:
    from orchestrator.qpc.mdp import MAX_PARTITIONS

    if 1 <= value <= MAX_PARTITIONS:
        return None
    return f"must be between 1 and {MAX_PARTITIONS} (one card per partition)"


def version_number(value: float) -> str | None:
    return None if 1 <= value <= MAX_VERSION else f"must be between 1 and {MAX_VERSION}"


def host_count(value: float) -> str | None:
    return None if 1 <= value <= MAX_HOSTS else f"must be between 1 and {MAX_HOSTS}"


def cards_per_host(value: float) -> str | None:
    return None if 1 <= value <= MAX_CARDS_PER_HOST else \
        f"must be between 1 and {MAX_CARDS_PER_HOST}"


def probability(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be between 0 and 1"


# --- the configuration ----------------------------------------------------------------
