"""The registry file and the server settings: validated at start, with errors naming entry and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from rewardserve.cli import build_parser, settings_from_args
from rewardserve.config import (
    DEFAULT_JUDGE_DIR, DEFAULT_JUDGE_NAME, DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME, RegistryConfig, ServerSettings,
    load_registry, quick,
)

ROOT = Path(__file__).resolve().parents[1]

ISSUE_SHAPE = """
default: rm-a            # optional; else the first entry
models:
  - name: rm-a
    path: /models/a
  - name: rm-b
    path: /models/b
    dtype: bfloat16
ensembles:
  - name: both
    members: [rm-a, rm-b]
    aggregate: uwo          # mean | min | uwo | median
    lambda: 0.5             # uwo only
"""


def _write(tmp_path, text: str, name: str = "registry.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


NEW_KINDS_SHAPE = """
models:
  - name: rm-a
    path: /models/a
judges:
  - name: judge
    path: /models/judge-lm
    template: "Question: {{ prompt }}\\nAnswer: {{ response }}\\nIs the answer correct?"
    verdict: {yes: "Yes", no: "No"}     # single tokens, checked at start
verifiers:
  - name: math
    type: math                         # math | exact | regex | json_schema
composites:
  - name: hybrid
    components: {correct: math, quality: rm-a}
    total: "correct + 0.2 * par(quality)"   # or an equivalent structured form
    gates: {quality: {on: correct, at_least: 1}}
"""


def test_the_issue_shape_of_judges_verifiers_and_composites_loads_as_written(tmp_path):
    reg = load_registry(_write(tmp_path, NEW_KINDS_SHAPE))  # PyYAML reads yes, no and on as booleans
    assert reg.names == ["rm-a", "judge", "math", "hybrid"] and reg.default_name == "rm-a"
    [judge] = reg.judges
    assert (judge.verdict.yes, judge.verdict.no) == ("Yes", "No") and judge.template.endswith("correct?")
    assert "\n" in judge.template and reg.verifiers[0].type == "math"
    [hybrid] = reg.composites
    assert hybrid.gates["quality"].on == "correct" and hybrid.gates["quality"].at_least == 1
    assert load_registry(ROOT / "deploy" / "examples" / "hybrid" / "registry.yaml").default_name == "hybrid"


def test_the_documented_shape_and_the_deploy_example_load(tmp_path):
    reg = load_registry(_write(tmp_path, ISSUE_SHAPE))
    assert reg.default_name == "rm-a" and reg.names == ["rm-a", "rm-b", "both"]
    assert reg.models[1].dtype == "bfloat16" and reg.models[0].dtype == "auto"
    [both] = reg.ensembles
    assert both.members == ["rm-a", "rm-b"] and both.aggregate == "uwo" and both.lambda_ == 0.5
    example = load_registry(ROOT / "deploy" / "registry.yaml")
    assert example.default_name == "rm-a" and {e.name for e in example.ensembles} == {"both", "both-normalized"}
    assert example.models[2].heads == {"helpfulness": 1.0, "correctness": 1.0, "verbosity": -0.5}
    # without `default`, the first model is the default
    assert load_registry(_write(tmp_path, ISSUE_SHAPE.replace("default: rm-a", ""))).default_name == "rm-a"


BAD = [
    ("models:\n  - name: a\n  - name: b\n    dtype: float64\n", r"models\[1\] \(b\)\.dtype: Input should be"),
    ("models:\n  - name: a\n    colour: red\n", r"models\[0\] \(a\)\.colour: Extra inputs are not permitted"),
    ("models:\n  - path: /x\n", r"models\[0\]\.name: Field required"),
    ("models:\n  - name: a\n    max_length: 0\n", r"models\[0\] \(a\)\.max_length: Input should be greater"),
    ("models:\n  - name: a\n    heads: {}\n", r"models\[0\] \(a\)\.heads: name at least one head"),
    ("models:\n  - name: a\n  - name: a\n", r"models\[1\] \(a\)\.name: 'a' is already the name of models\[0\]"),
    ("models: []\n", r"models: the registry serves nothing: give at least one entry"),
    ("judges:\n  - name: j\n    truncation: right\n",
     r"judges\[0\] \(j\)\.truncation: a judge's verdict follows its question"),
    ("judges:\n  - name: j\n    verdict: {yes: Yes, no: No}\n",
     r"judges\[0\] \(j\)\.verdict\.yes: YAML read the token as the boolean True: quote it"),
    ("judges:\n  - name: j\n    colour: red\n", r"judges\[0\] \(j\)\.colour: Extra inputs are not permitted"),
    ("verifiers:\n  - name: v\n    type: regex\n", r"verifiers\[0\] \(v\)\.pattern: a regex verifier needs a pattern"),
    ("verifiers:\n  - name: v\n    type: regex\n    pattern: '(unclosed'\n", r"verifiers\[0\] \(v\)\.pattern: "),
    ("verifiers:\n  - name: v\n    type: json_schema\n    schema: {type: 12}\n", r"verifiers\[0\] \(v\)\.schema: "),
    ("verifiers:\n  - name: v\n    type: sql\n", r"verifiers\[0\] \(v\)\.type: Input should be 'math'"),
    ("verifiers:\n  - name: v\n    type: math\n    timeout_s: 0\n", r"verifiers\[0\] \(v\)\.timeout_s: Input should"),
    ("models:\n  - name: a\ncomposites:\n  - name: c\n    components: {x: a}\n    total: x +\n",
     r"composites\[0\] \(c\)\.total: 'x \+' does not parse"),
    ("models:\n  - name: a\ncomposites:\n  - name: c\n    components: {x: b}\n    total: x\n",
     r"composites\[0\] \(c\)\.components\.x: 'b' is not an entry a composite can use"),
    ("models:\n  - name: a\ncomposites:\n  - name: c\n    components: {x: a}\n    total: x\n"
     "    gates: {x: {on: y, at_least: 1}}\n", r"composites\[0\] \(c\)\.gates\.x\.on: 'y' is not another component"),
    ("models:\n  - name: a\n    process: {step_tag: t}\n    heads: {LABEL_0: 1}\n",
     r"models\[0\] \(a\)\.heads: a process reward model"),
    ("models:\n  - name: a\nverifiers:\n  - name: a\n    type: exact\n",
     r"verifiers\[0\] \(a\)\.name: 'a' is already the name of models\[0\]"),
    ("models:\n  - name: a\nensembles:\n  - name: e\n    members: [a, c]\n",
     r"ensembles\[0\] \(e\)\.members: 'c' is not a model entry; the models are \['a'\]"),
    ("models:\n  - name: a\n  - name: b\nensembles:\n  - name: e\n    members: [a, b]\n    aggregate: uwo\n",
     r"ensembles\[0\] \(e\)\.lambda: uwo needs lambda"),
    ("models:\n  - name: a\n  - name: b\nensembles:\n  - name: e\n    members: [a, b]\n    lambda: 1\n",
     r"ensembles\[0\] \(e\)\.lambda: applies to aggregate uwo only"),
    ("models:\n  - name: a\n  - name: b\nensembles:\n  - name: e\n    members: [a, b]\n    aggregate: max\n",
     r"ensembles\[0\] \(e\)\.aggregate: Input should be 'mean', 'min', 'uwo' or 'median'"),
    ("models:\n  - name: a\n  - name: b\nensembles:\n  - name: e\n    members: [a, b]\n    normalize: true\n"
     "    stats: {a: {mean: 0, std: 1}}\n", r"ensembles\[0\] \(e\)\.stats: normalize needs .* missing \['b'\]"),
    ("models:\n  - name: a\n  - name: b\nensembles:\n  - name: e\n    members: [a, b]\n    normalize: true\n"
     "    stats: {a: {mean: 0, std: 0}, b: {mean: 0, std: 1}}\n",
     r"ensembles\[0\] \(e\)\.stats\.a\.std: Input should be greater than 0"),
    ("models:\n  - name: a\nensembles:\n  - name: e\n    members: [a]\n",
     r"ensembles\[0\] \(e\)\.members: List should have at least 2 items"),
    ("models:\n  - name: a\n  - name: b\nensembles:\n  - name: a\n    members: [a, b]\n",
     r"ensembles\[0\] \(a\)\.name: 'a' is already the name of models\[0\]"),
    ("default: zz\nmodels:\n  - name: a\n", r"default: 'zz' is not an entry; the entries are \['a'\]"),
    ("models: {name: a}\n", r"models: Input should be a valid list"),
    ("- just a list\n", r"Input should be a valid dictionary"),
    ("models: [\n", r"cannot read registry"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_registry_errors_name_the_entry_and_the_key(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_registry(_write(tmp_path, text))


def test_checks_against_the_server_settings_name_the_entry(tmp_path):
    reg = load_registry(_write(tmp_path, "models:\n  - name: a\n  - name: b\n    max_length: 5000\n"))
    reg.check(ServerSettings(max_batch_tokens=8192))
    with pytest.raises(ValueError, match=r"models\[1\] \(b\)\.max_length: 5000 exceeds the batch token budget"):
        reg.check(ServerSettings(max_batch_tokens=4096))
    ok = load_registry(_write(tmp_path, "models:\n  - name: b\n    max_length: 5000\n    max_batch_tokens: 6000\n"))
    ok.check(ServerSettings(max_batch_tokens=4096))  # the entry's own budget


def test_the_quick_path_is_a_one_entry_registry(monkeypatch):
    server, reg = quick()  # no model named: the embedded reward model and, beside it, the embedded judge
    assert reg.names == [DEFAULT_MODEL_NAME, DEFAULT_JUDGE_NAME] and Path(reg.models[0].path) == DEFAULT_MODEL_DIR
    assert reg.default_name == DEFAULT_MODEL_NAME and Path(reg.judges[0].path) == DEFAULT_JUDGE_DIR
    server, reg = quick(model="/models/my-rm", dtype="bfloat16", default_truncation="left", max_wait_ms=7)
    [entry] = reg.models
    assert reg.judges == []
    assert (entry.name, entry.path, entry.dtype, entry.truncation) == ("my-rm", "/models/my-rm", "bfloat16", "left")
    assert server.max_wait_ms == 7
    assert quick(model="/models/my-rm", served_name="prod")[1].default_name == "prod"
    monkeypatch.setenv("RS_MODEL", "/m/env-rm")
    monkeypatch.setenv("RS_DEVICES", "cpu")
    assert quick()[1].models[0].path == "/m/env-rm" and quick()[1].models[0].devices == "cpu"
    with pytest.raises(ValueError, match="unknown settings"):
        quick(colour="red")


def test_config_and_per_model_flags_exclude_each_other(tmp_path, monkeypatch):
    path = _write(tmp_path, ISSUE_SHAPE)
    parser = build_parser()
    server, reg = settings_from_args(parser.parse_args(["serve", "--config", str(path), "--max-wait-ms", "3"]))
    assert server.max_wait_ms == 3 and reg.names == ["rm-a", "rm-b", "both"]
    with pytest.raises(SystemExit, match="--dtype: per-model settings; with --config, set them in the registry"):
        settings_from_args(parser.parse_args(["serve", "--config", str(path), "--dtype", "bfloat16"]))
    monkeypatch.setenv("RS_MODEL", "/m/x")
    with pytest.raises(SystemExit, match="--model: per-model settings"):
        settings_from_args(parser.parse_args(["serve", "--config", str(path)]))
    monkeypatch.delenv("RS_MODEL")
    bad = _write(tmp_path, "models:\n  - name: a\n    dtype: float64\n", "bad.yaml")
    with pytest.raises(SystemExit, match=r"invalid registry .*\n  models\[0\] \(a\)\.dtype"):
        settings_from_args(parser.parse_args(["serve", "--config", str(bad)]))
    monkeypatch.setenv("RS_CONFIG", str(path))
    assert settings_from_args(parser.parse_args(["serve"]))[1].names == ["rm-a", "rm-b", "both"]


def test_registry_config_is_usable_in_code():
    reg = RegistryConfig.model_validate({"models": [{"name": "a"}, {"name": "b"}],
                                         "ensembles": [{"name": "e", "members": ["a", "b"], "aggregate": "min"}]})
    assert reg.ensembles[0].lambda_ is None and reg.default_name == "a"
