"""Read a deployment file and turn every problem into an error that names the file, field and fix."""

import difflib
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from osvm.config.models import (
    NAME_PATTERN,
    PORT_NAME_PATTERN,
    USER_PATTERN,
    Deployment,
    FieldPath,
    InvalidFields,
    format_path,
)


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a deployment file.

    `path` is the field path as the file writes it, such as `components.rpc.probes[0].port`, or ""
    for a problem with the whole file. `message` names the bad value where there is one, and the fix.
    """

    path: str
    message: str

    def render(self, file: str) -> str:
        if self.path:
            return f"{file}: {self.path}: {self.message}"
        return f"{file}: {self.message}"


class ConfigError(Exception):
    """A deployment file that cannot be used, with every problem found in it."""

    def __init__(self, file: str, issues: list[ConfigIssue]):
        self.file = file
        self.issues = issues
        super().__init__("\n".join(issue.render(file) for issue in issues))

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "issues": [{"field": issue.path, "message": issue.message} for issue in self.issues],
        }


def load_deployment(path: str | Path) -> Deployment:
    """Read and validate a deployment file.

    Raises ConfigError when the file is missing, unreadable, not TOML, or not a valid deployment.
    """
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(file, [ConfigIssue("", "file not found: check the path")]) from None
    except IsADirectoryError:
        raise ConfigError(file, [ConfigIssue("", "is a directory: name a .toml deployment file")]) from None
    except OSError as error:
        message = f"cannot be read ({error.strerror}): check that the file exists and its permissions"
        raise ConfigError(file, [ConfigIssue("", message)]) from None
    return parse_deployment(raw, file)


def parse_deployment(raw: bytes | str, file: str) -> Deployment:
    """Validate the text of a deployment file; `file` names it in errors.

    Raises ConfigError with one issue per problem found.
    """
    if isinstance(raw, bytes):
        try:
            # utf-8-sig drops the byte order mark that some editors write.
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            message = f"not valid UTF-8 at byte {error.start}: save the file as UTF-8, which TOML requires"
            raise ConfigError(file, [ConfigIssue("", message)]) from None
    else:
        text = raw

    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(file, [ConfigIssue("", _toml_syntax_message(error))]) from None

    # Strict mode takes each value in the TOML type it was written in, so `shell = "yes"` or
    # `pids = true` is an error instead of a silent conversion.
    try:
        return Deployment.model_validate(document, strict=True)
    except ValidationError as error:
        raise ConfigError(file, issues_from_validation_error(error, document)) from None


def _toml_syntax_message(error: tomllib.TOMLDecodeError) -> str:
    # tomllib ends its messages with the position, such as "(at line 3, column 5)".
    text = str(error)
    match = re.search(r"\s*\(at (.+)\)$", text)
    if match is None:
        return f"invalid TOML: {_lower_first(text)}: correct the syntax"
    detail = _lower_first(text[: match.start()])
    return f"invalid TOML at {match.group(1)}: {detail}: correct the syntax there"


# --- pydantic errors to issues ---------------------------------------------------------------


def issues_from_validation_error(error: ValidationError, document: dict[str, Any]) -> list[ConfigIssue]:
    """Turn pydantic's errors for `document` into issues, one per problem, in pydantic's order.

    Pydantic reports a value that matches no member of a union once per member. Those errors
    are collapsed into one issue: the member of the value's own type, or one type mismatch.
    """
    located = [(item, _locate(item, document)) for item in error.errors()]

    issues: list[ConfigIssue] = []
    handled_unions: set[FieldPath] = set()
    for item, location in located:
        if location.union_at is None:
            issues.extend(_describe(item, location))
            continue
        if location.union_at in handled_unions:
            continue
        handled_unions.add(location.union_at)
        members = [pair for pair in located if pair[1].union_at == location.union_at]
        issues.extend(_describe_union(members, location.union_at, document))

    unique: list[ConfigIssue] = []
    for issue in issues:
        if issue not in unique:
            unique.append(issue)
    return unique


def _issue_from_error(error: dict[str, Any]) -> ConfigIssue:
    """Turn one pydantic error into an issue when the validated document is not at hand.

    Without the document, pydantic's labels are distinguished from keys by their form, and the two
    errors of a union mismatch stay separate. Prefer issues_from_validation_error.
    """
    return _describe(error, _locate(error, None))[0]


@dataclass(frozen=True)
class _Location:
    # Keys and list indexes as the file writes them, without the labels pydantic inserts.
    path: FieldPath
    # Where a union value sits when the error comes from one member of that union, and the member's label.
    union_at: FieldPath | None = None
    member: str | None = None
    # The error is about a table key (such as a port name), not its value.
    is_key: bool = False


def _locate(error: dict[str, Any], document: Any) -> _Location:
    """Separate the keys that the file contains from the labels that pydantic adds to `loc`.

    Pydantic inserts the probe type after a probe's list index (probes[0].tcp.port), a union
    member's type (port.constrained-int, command.list[str]) and "[key]" for a table key. Walking
    the document separates them, because only real keys and indexes are present in it. Without
    the document (None), labels are recognized by their form instead.
    """
    location = error["loc"]
    node = document
    path: list[str | int] = []
    union_at: FieldPath | None = None
    member: str | None = None
    is_key = False

    for position, item in enumerate(location):
        # The probe type comes right after the list index, even when the probe has a key of the same name.
        after_probe_index = (
            position >= 2 and location[position - 2] == "probes" and isinstance(location[position - 1], int)
        )
        if after_probe_index and isinstance(node, dict) and node.get("type") == item:
            continue
        if document is None:
            if item == "[key]":
                is_key = True
            elif isinstance(item, int):
                path.append(item)
            elif after_probe_index and item in _PROBE_TAGS:
                continue
            elif not _looks_like_label(item):
                path.append(item)
            elif union_at is None:
                union_at = tuple(path)
                member = item
            continue
        if isinstance(node, dict) and isinstance(item, str) and item in node:
            path.append(item)
            node = node[item]
        elif isinstance(node, list) and isinstance(item, int) and 0 <= item < len(node):
            path.append(item)
            node = node[item]
        elif item == "[key]":
            is_key = True
        elif error["type"] == "missing" and position == len(location) - 1:
            path.append(item)
        elif union_at is None:
            union_at = tuple(path)
            member = str(item)
    return _Location(tuple(path), union_at, member, is_key)


# The values of `type` in the probe models, which pydantic also uses as labels in `loc`.
_PROBE_TAGS = ("http", "jsonrpc", "solana", "tcp", "exec")


def _looks_like_label(item: str) -> bool:
    """Return whether `item` has the form of a label that pydantic adds for a union member."""
    return "[" in item or item.startswith(("constrained-", "function-")) or item in ("str", "int", "float", "bool")


def _describe_union(
    members: list[tuple[dict[str, Any], _Location]], union_at: FieldPath, document: Any
) -> list[ConfigIssue]:
    value = _value_at(document, union_at)
    accepting = next((location.member for _, location in members if _member_accepts(location.member, value)), None)
    if accepting is not None:
        issues: list[ConfigIssue] = []
        for item, location in members:
            if location.member == accepting:
                issues.extend(_describe(item, location))
        return issues

    field = next((part for part in reversed(union_at) if isinstance(part, str)), "")
    got = f"got {_toml_type(value)} {_show(value)}"
    hint = _UNION_HINTS.get(field)
    if hint is None:
        labels = sorted({str(location.member) for _, location in members})
        return [ConfigIssue(format_path(union_at), f"expected one of {', '.join(labels)}, {got}")]
    expected, fix = hint
    return [ConfigIssue(format_path(union_at), f"expected {expected}, {got}: {fix}")]


# Expected types of each union field and how to write them, keyed by field name.
_UNION_HINTS = {
    "command": (
        "an array of strings, or a string with shell = true",
        "write it such as [\"redis-server\", \"--port\", \"6379\"]",
    ),
    "port": (
        "a port number or a port name",
        "write a number from 1 to 65535, or a name declared in ports such as \"rpc\"",
    ),
    "params": ("an array or a table", "write the JSON-RPC params such as [] or { key = \"value\" }"),
}


def _member_accepts(label: str | None, value: Any) -> bool:
    """Return whether the union member that pydantic labels `label` takes values of `value`'s type."""
    if label is None:
        return False
    if isinstance(value, bool):
        return label == "bool"
    if label.startswith("list["):
        return isinstance(value, list)
    if label.startswith("dict["):
        return isinstance(value, dict)
    if label.endswith("int"):
        return isinstance(value, int)
    if label.endswith("float"):
        return isinstance(value, (int, float))
    if label.endswith("str"):
        return isinstance(value, str)
    return False


def _describe(error: dict[str, Any], location: _Location) -> list[ConfigIssue]:
    kind = error["type"]
    context = error.get("ctx") or {}
    value = error.get("input")
    path = location.path
    where = format_path(path)

    if kind == "value_error" and isinstance(context.get("error"), InvalidFields):
        return [ConfigIssue(format_path(path + relative), message) for relative, message in context["error"].problems]
    if kind == "extra_forbidden":
        return [ConfigIssue(where, _unknown_key_message(error["loc"]))]
    if kind == "missing":
        key = str(path[-1])
        fix = _MISSING_FIXES.get(key, "add it")
        return [ConfigIssue(where, f"missing required key {key!r}: {fix}")]
    if kind == "union_tag_invalid":
        tag = value.get("type") if isinstance(value, dict) else context.get("tag")
        message = f"unknown probe type {_show(tag)}: use one of {_PROBE_TYPES}"
        return [ConfigIssue(format_path(path + ("type",)), message)]
    if kind == "union_tag_not_found":
        message = f"missing required key 'type': add the probe type, one of {_PROBE_TYPES}"
        return [ConfigIssue(format_path(path + ("type",)), message)]
    if kind == "string_pattern_mismatch":
        return [ConfigIssue(where, _pattern_message(context.get("pattern", ""), value, location.is_key))]
    if kind in _TYPE_ERRORS:
        expected, fix = _TYPE_ERRORS[kind]
        return [ConfigIssue(where, f"expected {expected}, got {_toml_type(value)} {_show(value)}: {fix}")]
    if kind in _RANGE_ERRORS:
        comparison, bound_key = _RANGE_ERRORS[kind]
        bound = _number(context.get(bound_key))
        size = "too small" if kind.startswith("greater") else "too large"
        return [ConfigIssue(where, f"{_show(value)} is {size}: use a number {comparison} {bound}")]
    if kind == "too_short":
        return [ConfigIssue(where, "must not be empty: add at least one element")]
    if kind == "string_too_short":
        return [ConfigIssue(where, "must not be empty: write a value")]
    if kind == "literal_error":
        return [ConfigIssue(where, f"invalid value {_show(value)}: use {context.get('expected')}")]

    # The validators in models.py write complete messages, so only pydantic's own need the value added.
    message = error["msg"]
    if kind in ("value_error", "assertion_error"):
        for prefix in ("Value error, ", "Assertion failed, "):
            message = message.removeprefix(prefix)
        return [ConfigIssue(where, message)]
    return [ConfigIssue(where, f"{_lower_first(message)}, got {_show(value)}")]


_PROBE_TYPES = ", ".join(f'"{tag}"' for tag in _PROBE_TAGS[:-1]) + f' or "{_PROBE_TAGS[-1]}"'

_MISSING_FIXES = {
    "name": "add a line such as name = \"mainnet-rpc\" above the first [table] header",
    "components": "add at least one [components.NAME] table with a command",
    "command": "add the program and its arguments, such as command = [\"redis-server\", \"--port\", \"6379\"]",
    "method": "add the JSON-RPC method to call, such as method = \"eth_blockNumber\"",
    "port": "add the port to probe, as a name declared in ports such as port = \"rpc\", or as a number",
}

# Pydantic error types for a value of the wrong TOML type, with the expected type and how to write it.
_TYPE_ERRORS = {
    "string_type": ("a string", "put the value in double quotes"),
    "int_type": ("a whole number", "write digits without quotes"),
    "int_from_float": ("a whole number", "write it without a fractional part"),
    "int_parsing": ("a whole number", "write digits without quotes"),
    "float_type": ("a number", "write digits without quotes"),
    "float_parsing": ("a number", "write digits without quotes"),
    "bool_type": ("a boolean", "write true or false without quotes"),
    "bool_parsing": ("a boolean", "write true or false without quotes"),
    "list_type": ("an array", "write the values in square brackets, such as [\"a\", \"b\"]"),
    "dict_type": ("a table", "write a [section] or an inline table such as { key = \"value\" }"),
    "model_type": ("a table", "write a [section] or an inline table such as { key = \"value\" }"),
    "model_attributes_type": ("a table", "write an inline table such as { key = \"value\" }"),
}

_RANGE_ERRORS = {
    "greater_than": ("greater than", "gt"),
    "greater_than_equal": ("of at least", "ge"),
    "less_than": ("less than", "lt"),
    "less_than_equal": ("of at most", "le"),
}


def _unknown_key_message(location: tuple[Any, ...]) -> str:
    key = str(location[-1])
    if len(location) > 1 and key in Deployment.model_fields:
        return (
            f"unknown key {key!r}: a key after a [table] header belongs to that table, "
            f"so move {key} above the first header"
        )
    message = f"unknown key {key!r}: remove it or correct its spelling"
    model = _model_at(location[:-1])
    if model is None:
        return message
    valid = list(model.model_fields)
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        return f"{message} (did you mean {close[0]!r}?)"
    return f"{message} (valid keys: {', '.join(valid)})"


def _model_at(location: tuple[Any, ...]) -> type[BaseModel] | None:
    """Return the model that validates the table at pydantic's `loc`, or None where no model does."""
    current: Any = Deployment
    for item in location:
        current = _unwrap(current)
        origin = typing.get_origin(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(item) if isinstance(item, str) else None
            if field is None:
                return None
            current = field.annotation
        elif origin is list:
            current = typing.get_args(current)[0]
        elif origin is dict:
            current = typing.get_args(current)[1]
        elif origin in (typing.Union, types.UnionType):
            # In a discriminated union, `item` is the tag that picked the member.
            current = next((member for member in typing.get_args(current) if _tag_of(member) == item), None)
            if current is None:
                return None
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    if typing.get_origin(annotation) is typing.Annotated:
        return typing.get_args(annotation)[0]
    return annotation


def _tag_of(member: Any) -> Any:
    if isinstance(member, type) and issubclass(member, BaseModel) and "type" in member.model_fields:
        literal = member.model_fields["type"].annotation
        return typing.get_args(literal)[0] if typing.get_args(literal) else None
    return None


def _pattern_message(pattern: str, value: Any, is_key: bool) -> str:
    if pattern == NAME_PATTERN:
        return (
            f"invalid name {_show(value)}: use 1 to 63 lower-case letters, digits and '-', "
            f"starting with a letter"
        )
    if pattern == PORT_NAME_PATTERN and isinstance(value, str) and value.isdigit() and not is_key:
        return f"invalid port name {_show(value)}: write a port number without quotes, such as {value}"
    if pattern == PORT_NAME_PATTERN:
        return (
            f"invalid port name {_show(value)}: use 1 to 31 lower-case letters, digits and '_', "
            f"starting with a letter"
        )
    if pattern == USER_PATTERN:
        return f"invalid user {_show(value)}: write a user name such as \"osvm\" or a numeric user id"
    subject = "key" if is_key else "value"
    return f"invalid {subject} {_show(value)}: it must match the pattern {pattern}"


def _value_at(document: Any, path: FieldPath) -> Any:
    node = document
    for part in path:
        node = node[part]
    return node


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return "date or time" if hasattr(value, "isoformat") else type(value).__name__


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text else text


def _show(value: Any) -> str:
    """Show a value for a message, shortened to 80 characters.

    Python's repr of a string, number or list is also valid TOML. Booleans are written as TOML writes them.
    """
    if isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
