"""The checkers: math answers by math-verify (equivalent forms, wrong answers, malformed LaTeX, a power
tower that only the pool's timeout stops), exact, regex and JSON-schema rules, versions and configs."""

from __future__ import annotations

import asyncio
import time

import pytest

from rewardserve.verifiers import checks
from rewardserve.verifiers.checks import REASONS, check, checker_version, needs_reference, reason_code, validate
from rewardserve.verifiers.pool import VerifierPool

# (reference, response, score, reason)
MATH = [
    # plain numbers and free text
    ("42", "42", 1.0, "correct"),
    ("42", "The answer is 42", 1.0, "correct"),
    ("42", "\\boxed{42}", 1.0, "correct"),
    ("7", "the final answer is 7.", 1.0, "correct"),
    ("14", "First, 3+4 = 7. Then 7*2 = 14. The answer is 14.", 1.0, "correct"),
    ("14", "So 3+4=7 and we get \\boxed{14}. Check: 7.", 1.0, "correct"),
    ("-3", "$-3$", 1.0, "correct"),
    ("0", "-0", 1.0, "correct"),
    ("3", "$3.0$", 1.0, "correct"),
    ("1000", "1,000", 1.0, "correct"),
    ("1234567", "The total is $1,234,567$.", 1.0, "correct"),
    ("10^{3}", "1000", 1.0, "correct"),
    # fractions and decimals
    ("\\frac{1}{2}", "0.5", 1.0, "correct"),
    ("0.5", "1/2", 1.0, "correct"),
    ("0.5", "$\\frac{1}{2}$", 1.0, "correct"),
    ("\\frac{1}{2}", "$\\dfrac12$", 1.0, "correct"),
    ("\\frac{1}{2}", "\\dfrac{1}{2}", 1.0, "correct"),  # bare LaTeX: retried as one formula
    ("\\frac12", "The answer is \\(\\frac{1}{2}\\)", 1.0, "correct"),
    ("1/2", "\\[\\frac{2}{4}\\]", 1.0, "correct"),
    ("1/2", "\\boxed{0.50}", 1.0, "correct"),
    ("-\\frac{1}{2}", "$\\frac{-1}{2}$", 1.0, "correct"),
    ("\\frac{1}{3}", "0.333333", 1.0, "correct"),
    ("50\\%", "0.5", 1.0, "correct"),
    ("50\\%", "$50\\%$", 1.0, "correct"),
    # radicals, constants, expressions, equations
    ("2\\sqrt{2}", "$\\sqrt{8}$", 1.0, "correct"),
    ("\\frac{\\sqrt{2}}{2}", "$\\frac{1}{\\sqrt{2}}$", 1.0, "correct"),
    ("\\frac{\\sqrt{3}}{2}", "$\\sin(\\pi/3)$", 1.0, "correct"),
    ("2", "$\\sqrt{4}$", 1.0, "correct"),
    ("\\pi", "3.14159265358979", 1.0, "correct"),
    ("$x^2+2x+1$", "$(x+1)^2$", 1.0, "correct"),
    ("x^2+1", "$x^2+1$", 1.0, "correct"),
    ("x+y", "$y+x$", 1.0, "correct"),
    ("y=2x+1", "$y = 1 + 2x$", 1.0, "correct"),
    ("x=3", "$3$", 1.0, "correct"),
    ("3+2i", "$2i+3$", 1.0, "correct"),
    ("5\\text{ cm}", "5", 1.0, "correct"),
    # sets, intervals, infinity, matrices
    ("\\{1,2,3\\}", "$\\{3,2,1\\}$", 1.0, "correct"),
    ("[0,1)", "$[0, 1)$", 1.0, "correct"),
    ("(1,2)", "$(1,2)$", 1.0, "correct"),
    ("\\infty", "$\\infty$", 1.0, "correct"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "$\\begin{pmatrix}1\\\\2\\end{pmatrix}$", 1.0, "correct"),
    # wrong answers
    ("7", "8", 0.0, "wrong answer"),
    ("7", "The answer is 6", 0.0, "wrong answer"),
    ("-7", "7", 0.0, "wrong answer"),
    ("\\frac{1}{3}", "\\frac{1}{4}", 0.0, "wrong answer"),
    ("-\\frac{1}{2}", "$\\frac{1}{2}$", 0.0, "wrong answer"),
    ("2\\sqrt{2}", "$\\sqrt{2}$", 0.0, "wrong answer"),
    ("x^2+1", "$x^2+2$", 0.0, "wrong answer"),
    ("(0,1)", "$[0,1]$", 0.0, "wrong answer"),
    ("3", "3.0001", 0.0, "wrong answer"),
    ("1", "$\\frac{1}{0}$", 0.0, "wrong answer"),
    # malformed LaTeX, nothing to extract, an unusable reference: 0.0, never an exception
    ("\\frac{1}{2}", "\\frac{1}{", 0.0, "wrong answer"),
    ("\\frac{1}{2}", "$\\frac{1}{2$", 0.0, "wrong answer"),
    ("\\frac{1}{2}", "$\\frac{1}{2}}}$", 0.0, "wrong answer"),
    ("1", "}}}{{{", 0.0, "no answer found"),
    ("1", "", 0.0, "no answer found"),
    ("3", "three", 0.0, "no answer found"),
    ("\\$5", "5", 0.0, "reference not parsable"),
]


@pytest.mark.parametrize("reference,response,score,reason", MATH)
def test_math(reference, response, score, reason):
    assert check("math", {}, response, reference) == (score, reason)


def test_the_math_table_is_broad():
    assert len(MATH) >= 40 and sum(row[2] == 1.0 for row in MATH) >= 30


def test_a_power_tower_times_out_in_the_pool_and_the_pool_keeps_serving():
    async def run():
        pool = VerifierPool(1)
        await pool.start()
        try:
            start = time.monotonic()
            hung = await pool.run("math", {}, "$9^{9^{9^{9}}}$", "1", 1.0)
            took = time.monotonic() - start
            after = await pool.run("math", {}, "\\boxed{\\frac{1}{2}}", "0.5", 10.0)
            return hung, took, after, pool.replacements
        finally:
            await pool.close()

    hung, took, after, replacements = asyncio.run(run())
    assert hung == (0.0, "timed out") and 0.9 < took < 2.5
    assert after == (1.0, "correct") and replacements == 1


@pytest.mark.parametrize("config,response,reference,score", [
    ({}, "Paris", "Paris", 1.0),
    ({}, "  Paris\n", "Paris ", 1.0),  # surrounding whitespace is stripped
    ({}, "paris", "Paris", 0.0),
    ({"case_sensitive": True}, "PARIS", "Paris", 0.0),
    ({"case_sensitive": False}, "PARIS", "paris", 1.0),
    ({"case_sensitive": False}, "Paris, France", "paris", 0.0),
    ({}, "New  York", "New York", 0.0),  # inner whitespace counts
    ({}, "", "", 1.0),
])
def test_exact(config, response, reference, score):
    assert check("exact", config, response, reference) == (score, "matched" if score else "no match")


@pytest.mark.parametrize("pattern,response,reference,score", [
    (r"\d+", "there are 12 apples", None, 1.0),
    (r"^\d+$", "there are 12 apples", None, 0.0),
    (r"(?i)yes", "YES.", None, 1.0),
    (r"answer: {reference}$", "answer: 1.5", "1.5", 1.0),
    (r"answer: {reference}$", "answer: 105", "1.5", 0.0),  # the reference is escaped: "." is literal
    (r"\b{reference}\b", "cost: $3+4 total", "$3+4", 0.0),
    (r"{reference}", "cost: $3+4 total", "$3+4", 1.0),
    (r"{reference}", "a(b", "(", 1.0),
    (r"<answer>{reference}</answer>", "<answer>C</answer>", "C", 1.0),
    (r"<answer>{reference}</answer>", "<answer>D</answer>", "C", 0.0),
])
def test_regex(pattern, response, reference, score):
    assert check("regex", {"pattern": pattern}, response, reference) == (score, "matched" if score else "no match")


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"]}


@pytest.mark.parametrize("response,score,reason", [
    ('{"name": "Ada", "age": 36}', 1.0, "schema satisfied"),
    ('  {"name": "Ada", "age": 36, "extra": true}\n', 1.0, "schema satisfied"),
    ('{"name": "Ada"}', 0.5, "schema violated"),
    ('{"name": "Ada", "age": -1}', 0.5, "schema violated"),
    ('[1, 2]', 0.5, "schema violated"),
    ('Sure! ```json\n{"name": "Ada", "age": 36}\n```', 1.0, "schema satisfied"),
    ('Here:\n```\n{"name": "Ada", "age": "36"}\n```\nDone.', 0.5, "schema violated"),
    ('```python\nprint(1)\n```\n```json\n{"name": "Ada", "age": 36}\n```', 1.0, "schema satisfied"),
    ('{"name": "Ada", "age": 36', 0.0, "not JSON"),
    ('{"name": "Ada", "age": NaN}', 0.0, "not JSON"),
    ("name: Ada", 0.0, "not JSON"),
    ("", 0.0, "not JSON"),
    ("[" * 100_000, 0.0, "not JSON"),
])
def test_json_schema(response, score, reason):
    assert check("json_schema", {"schema": SCHEMA}, response, None) == (score, reason)


def test_reasons_are_append_only_codes():
    # the cache stores these indices: the prefix may never change
    assert REASONS[:11] == ("correct", "wrong answer", "no answer found", "reference not parsable", "matched",
                            "no match", "schema satisfied", "schema violated", "not JSON", "timed out",
                            "checker error")
    assert all(REASONS[reason_code(r)] == r for r in REASONS)
    with pytest.raises(ValueError, match="This is a bug"):
        reason_code("nope")


def test_checker_version_names_the_kind_and_its_libraries():
    versions = {kind: checker_version(kind) for kind in checks.KINDS}
    assert len(set(versions.values())) == len(checks.KINDS)
    assert "math-verify=" in versions["math"] and "sympy=" in versions["math"]
    assert "jsonschema=" in versions["json_schema"] and "python=" in versions["regex"]
    with pytest.raises(ValueError, match="unknown verifier kind"):
        checker_version("llm")


@pytest.mark.parametrize("kind,config,message", [
    ("regex", {"pattern": "(a"}, "pattern: not a valid regex"),
    ("regex", {}, "pattern: a regex verifier needs a pattern"),
    ("regex", {"pattern": None}, "pattern: a regex verifier needs a pattern"),
    ("regex", {"pattern": 3}, "pattern: expected str"),
    ("json_schema", {"schema": {"type": "nonsense"}}, "schema: not a valid JSON Schema"),
    ("json_schema", {"schema": {"type": "object"}, "shcema": {}}, "shcema: not a verifier setting"),
    ("json_schema", {}, "schema: a json_schema verifier needs a schema"),
    ("exact", {"case_sensitive": "no"}, "case_sensitive: expected bool"),
    ("fuzzy", {}, "unknown verifier kind"),
])
def test_validate_rejects_bad_configs(kind, config, message):
    with pytest.raises(ValueError, match=message):
        validate(kind, config)


def test_validate_accepts_what_the_server_passes():
    # the server passes every setting, unset ones as None
    base = {"pattern": None, "schema": None, "case_sensitive": True}
    validate("math", base)
    validate("exact", dict(base, case_sensitive=False))
    validate("regex", dict(base, pattern=r"^{reference}$"))
    validate("json_schema", dict(base, schema=SCHEMA))
    assert check("exact", dict(base, case_sensitive=False), "A", "a") == (1.0, "matched")


def test_needs_reference():
    assert needs_reference("math", {}) and needs_reference("exact", {})
    assert needs_reference("regex", {"pattern": "x{reference}"}) and not needs_reference("regex", {"pattern": "x"})
    assert not needs_reference("json_schema", {"schema": SCHEMA})
    for kind, config in (("math", {}), ("exact", {}), ("regex", {"pattern": "{reference}"})):
        with pytest.raises(ValueError, match="needs the item's reference"):
            check(kind, config, "42", None)
    assert check("regex", {"pattern": "4"}, "42", None) == (1.0, "matched")
