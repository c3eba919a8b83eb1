"""Rule checkers for verifiable rewards: `check(kind, config, response, reference) -> (score, reason)`.

Kinds: `math` (the final answer is equivalent to the reference, by math-verify: numbers, fractions,
LaTeX, expressions, sets, intervals), `exact` (stripped equality), `regex` (`re.search`; `{reference}`
in the pattern stands for the escaped reference) and `json_schema` (1.0 valid and conforming, 0.5
valid JSON that breaks the schema, 0.0 not JSON).

`check` has no time limit of its own (math-verify's signal-based timeouts are switched off: they
only work on a main thread, and a timed-out comparison would come back as a plain "wrong answer"
that the server would cache); run it through `VerifierPool`, which kills a checker past its
deadline. The heavy libraries are imported on first use, so the server can import this module for
`REASONS`, `checker_version`, `needs_reference` and `validate` without loading SymPy.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from functools import lru_cache
from importlib import metadata
from typing import Any

KINDS = ("math", "exact", "regex", "json_schema")

# The server caches a reason as its index here: append only, never reorder or remove.
REASONS = (
    "correct", "wrong answer", "no answer found", "reference not parsable",
    "matched", "no match",
    "schema satisfied", "schema violated", "not JSON",
    "timed out", "checker error",
)
_CODES = {reason: code for code, reason in enumerate(REASONS)}

# Bump a kind's number whenever its checker here changes what it returns for some input.
_VERSIONS = {"math": 1, "exact": 1, "regex": 1, "json_schema": 1}
_LIBRARIES = {
    "math": ("math-verify", "latex2sympy2_extended", "antlr4-python3-runtime", "sympy"),
    "exact": (),
    "regex": (),
    "json_schema": ("jsonschema",),
}
# What a config may hold; None means "not set" (the server passes every key, unset ones as None).
_KEYS = {"pattern": str, "schema": dict, "case_sensitive": bool}
_REFERENCE = "{reference}"
_PARTIAL = 0.5  # valid JSON that breaks the schema
_BARE_LATEX_CHARS = 200  # a response up to this long with no $ is retried as one formula (\dfrac12 alone)


def reason_code(reason: str) -> int:
    """The reason's index in REASONS (what the cache stores)."""
    try:
        return _CODES[reason]
    except KeyError:
        raise ValueError(f"{reason!r} is not one of the verifier reasons {REASONS}. This is a bug.") from None


@lru_cache(maxsize=None)
def checker_version(kind: str) -> str:
    """Changes whenever the checker of `kind` could answer differently: our version and its libraries'."""
    _kind(kind)
    parts = [f"{kind}/{_VERSIONS[kind]}"]
    for lib in _LIBRARIES[kind]:
        try:
            parts.append(f"{lib}={metadata.version(lib)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{lib}=missing")
    if kind == "regex":  # the re module is the interpreter's
        parts.append("python={}.{}".format(*sys.version_info[:2]))
    return ";".join(parts)


def needs_reference(kind: str, config: dict[str, Any]) -> bool:
    """Whether every item must carry a `reference` (the server answers 422 before dispatch if not)."""
    _kind(kind)
    if kind in ("math", "exact"):
        return True
    if kind == "regex":
        return _REFERENCE in (_options(kind, config)["pattern"])
    return False


def validate(kind: str, config: dict[str, Any]) -> None:
    """Raises ValueError, naming the field, when `config` cannot work for `kind` (called at start)."""
    options = _options(kind, config)
    if kind == "regex":
        try:
            re.compile(options["pattern"].replace(_REFERENCE, "x"))
        except re.error as exc:
            raise ValueError(f"pattern: not a valid regex: {exc}") from None
    elif kind == "json_schema":
        import jsonschema

        schema = options["schema"]
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"schema: not a valid JSON Schema: {exc.message}") from None


def check(kind: str, config: dict[str, Any], response: str, reference: str | None) -> tuple[float, str]:
    """Scores `response` against `reference` by the rule `kind`: (score, one of REASONS)."""
    options = _options(kind, config)
    if reference is None and needs_reference(kind, options):
        raise ValueError(f"a {kind} verifier needs the item's reference (its ground truth); none was given")
    if kind == "math":
        return _math(response, reference)
    if kind == "exact":
        same = _exact(response, reference, options.get("case_sensitive", True))
        return (1.0, "matched") if same else (0.0, "no match")
    if kind == "regex":
        pattern = options["pattern"]
        if reference is not None:
            pattern = pattern.replace(_REFERENCE, re.escape(reference))
        return (1.0, "matched") if re.search(pattern, response) else (0.0, "no match")
    return _json_schema(response, options["schema"])


def _kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown verifier kind {kind!r}: the kinds are {', '.join(KINDS)}")


def _options(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """The config's set keys, type-checked; keys another kind uses are ignored (the server passes all)."""
    _kind(kind)
    options = {key: value for key, value in config.items() if value is not None}
    for key, value in options.items():
        if key not in _KEYS:
            raise ValueError(f"{key}: not a verifier setting; the settings are {', '.join(_KEYS)}")
        if not isinstance(value, _KEYS[key]):
            raise ValueError(f"{key}: expected {_KEYS[key].__name__}, got {type(value).__name__}")
    required = {"regex": "pattern", "json_schema": "schema"}.get(kind)
    if required is not None and required not in options:
        raise ValueError(f"{required}: a {kind} verifier needs a {required}")
    return options


def _exact(response: str, reference: str, case_sensitive: bool) -> bool:
    a, b = response.strip(), reference.strip()
    return a == b if case_sensitive else a.casefold() == b.casefold()


# --- math ---------------------------------------------------------------------------------------------

class _DropTimeoutNotice(logging.Filter):
    """math-verify warns once per process that its timeouts are off: the pool is the timeout here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutNotice())


def _parse_reference(reference: str) -> list:
    from math_verify import parse

    # A bare reference is read as one formula: unwrapped, math-verify reads "2\sqrt{2}" as 2 and "\frac12" as nothing.
    if any(mark in reference for mark in ("$", "\\boxed", "\\(", "\\[")):
        return parse(reference, parsing_timeout=None)
    return parse(f"${reference}$", parsing_timeout=None) or parse(reference, parsing_timeout=None)


def _math(response: str, reference: str) -> tuple[float, str]:
    from math_verify import parse, verify

    gold = _parse_reference(reference)
    if not gold:
        return 0.0, "reference not parsable"
    answer = parse(response, parsing_timeout=None)
    if not answer and "\\" in response and "$" not in response and len(response) <= _BARE_LATEX_CHARS:
        answer = parse(f"${response}$", parsing_timeout=None)
    if not answer:
        return 0.0, "no answer found"
    return (1.0, "correct") if verify(gold, answer, timeout_seconds=None) else (0.0, "wrong answer")


# --- json_schema --------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\r?\n?(.*?)```", re.DOTALL)
_NOT_JSON = object()


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _load_json(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _json_of(response: str) -> Any:
    """The whole response as JSON, else the first ```json (or untagged) fenced block's."""
    value = _load_json(response.strip())
    if value is not _NOT_JSON:
        return value
    for fence in _FENCE.finditer(response):
        if fence.group(1).lower() in ("", "json"):
            return _load_json(fence.group(2).strip())
    return _NOT_JSON


@lru_cache(maxsize=64)
def _validator(schema_json: str):
    import jsonschema

    schema = json.loads(schema_json)
    return jsonschema.validators.validator_for(schema)(schema)


def _json_schema(response: str, schema: dict) -> tuple[float, str]:
    value = _json_of(response)
    if value is _NOT_JSON:
        return 0.0, "not JSON"
    if _validator(json.dumps(schema, sort_keys=True)).is_valid(value):
        return 1.0, "schema satisfied"
    return _PARTIAL, "schema violated"
