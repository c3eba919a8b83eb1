"""The `rewardserve` command: settings from flags and RS_* variables, offline JSONL scoring."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rewardserve.cli import SETTING_FIELDS, build_parser, settings_from_args


def test_every_setting_is_a_flag_and_flags_beat_the_environment(monkeypatch):
    parser = build_parser()
    monkeypatch.setenv("RS_MAX_BATCH_TOKENS", "777")
    monkeypatch.setenv("RS_WARMUP", "false")
    s, _ = settings_from_args(parser.parse_args(["serve"]))
    assert s.max_batch_tokens == 777 and s.warmup is False
    s, r = settings_from_args(parser.parse_args(["serve", "--max-batch-tokens", "999", "--warmup", "--dtype",
                                                 "bfloat16"]))
    assert s.max_batch_tokens == 999 and s.warmup is True and r.models[0].dtype == "bfloat16"
    with pytest.raises(SystemExit) as err:
        settings_from_args(parser.parse_args(["serve", "--max-batch-tokens", "lots"]))
    assert "--max-batch-tokens" in str(err.value)


def test_serve_help_lists_every_setting_with_its_env_variable():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    text = serve.format_help()
    for name in SETTING_FIELDS:
        assert "--" + name.replace("_", "-") in text and f"RS_{name.upper()}" in text.replace("\n", " ").replace(" ", "")


def _run_score(args, stdin: bytes):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "rewardserve.cli", "score", *args], input=stdin, capture_output=True,
                          env=env, timeout=300)


def test_offline_score_writes_jsonl_in_order_with_errors_per_line(tiny_ckpt, tmp_path):
    ckpt = tiny_ckpt("llama")
    lines = [
        {"id": "a", "prompt": "What is 2+2?", "response": "4"},
        {"id": "b", "text": "plain text"},
        {"id": "c", "text": ""},
        "not json",
        {"id": "d", "input_ids": [1, 5, 6]},
        {"id": "e", "text": "too long " * 100},
    ]
    raw = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode() + b"\n"
    src = tmp_path / "in.jsonl"
    src.write_bytes(raw)
    out = tmp_path / "out.jsonl"
    proc = _run_score([str(src), "-o", str(out), "--model", str(ckpt), "--max-length", "64", "-q"], b"")
    assert proc.returncode == 1, proc.stderr.decode()
    assert b"3 line(s) could not be scored" in proc.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r.get("id") for r in rows] == ["a", "b", "c", None, "d", "e"]
    assert [("error" in r) for r in rows] == [False, False, True, True, False, True]
    assert rows[2]["error"]["message"].startswith("text:")
    assert rows[5]["error"]["type"] == "item_too_long"
    assert rows[4]["tokens"] == 3 and isinstance(rows[4]["reward"], float)

    # the same items through stdin/stdout, with truncation: every line scored, same rewards
    proc = _run_score(["--model", str(ckpt), "--max-length", "64", "--truncation", "left", "-q"],
                      b"\n".join(json.dumps(x).encode() for x in lines if isinstance(x, dict) and x.get("id") != "c"))
    assert proc.returncode == 0, proc.stderr.decode()
    again = [json.loads(x) for x in proc.stdout.decode().splitlines()]
    assert [r["reward"] for r in again[:3]] == pytest.approx([rows[0]["reward"], rows[1]["reward"], rows[4]["reward"]],
                                                             abs=1e-5)  # other batch company: fp32 rounding only
    assert again[3]["truncated"] is True and again[3]["tokens"] == 64


def test_offline_score_with_a_registry_entry(tiny_ckpt, tmp_path):
    reg = tmp_path / "registry.yaml"
    reg.write_text(f"models:\n  - name: a\n    path: {tiny_ckpt('llama')}\n  - name: b\n    path: {tiny_ckpt('qwen2')}\n"
                   "ensembles:\n  - name: both\n    members: [a, b]\n    aggregate: min\n")
    lines = b"\n".join(json.dumps({"id": i, "text": f"line {i} " * (i + 1)}).encode() for i in range(3))
    proc = _run_score(["--config", str(reg), "--entry", "both", "-q"], lines)
    assert proc.returncode == 0, proc.stderr.decode()
    both = [json.loads(x) for x in proc.stdout.decode().splitlines()]
    alone = [json.loads(x) for x in _run_score(["--config", str(reg), "--entry", "b", "-q"], lines).stdout.splitlines()]
    for row, b in zip(both, alone):
        assert set(row) == {"id", "text", "reward", "tokens", "truncated", "members", "disagreement"}
        assert row["reward"] == min(row["members"].values()) and row["members"]["b"] == pytest.approx(b["reward"])
    proc = _run_score(["--config", str(reg), "--entry", "nope", "-q"], lines)
    assert proc.returncode != 0 and b"--entry 'nope' is not in the registry" in proc.stderr


def test_offline_score_with_verifiers_judges_and_composites(tiny_ckpt, tmp_path):
    judge = tiny_ckpt("llama", head="causal", added_tokens=("Yes", "No", "<step>"))
    reg = tmp_path / "registry.yaml"
    reg.write_text(f"models:\n  - name: rm\n    path: {tiny_ckpt('llama')}\n"
                   f"judges:\n  - name: judge\n    path: {judge}\n"
                   "verifiers:\n  - name: math\n    type: math\n"
                   "composites:\n  - name: hybrid\n    components: {ok: math, rm: rm, j: judge}\n"
                   "    total: ok + 0.1 * rm\n    gates: {j: {on: ok, at_least: 1}}\n")
    lines = [{"id": 0, "prompt": "What is 2 + 2?", "response": "It is \\boxed{4}", "ground_truth": "4"},
             {"id": 1, "prompt": "What is 2 + 2?", "response": "5", "label": "4"},
             {"id": 2, "prompt": "What is 2 + 2?", "response": "4"}]
    proc = _run_score(["--config", str(reg), "--entry", "hybrid", "-q"],
                      b"\n".join(json.dumps(x).encode() for x in lines))
    assert proc.returncode == 1 and b"1 line(s) could not be scored" in proc.stderr  # the one without a reference
    rows = [json.loads(x) for x in proc.stdout.decode().splitlines()]
    assert [r["components"]["ok"] for r in rows[:2]] == [1.0, 0.0] and rows[1]["gated"] == ["j"]
    assert rows[0]["reasons"] == {"ok": "correct"} and rows[0]["ground_truth"] == "4"  # input fields pass through
    assert rows[2]["error"]["type"] == "invalid_input" and "reference" in rows[2]["error"]["message"]
    judged = [json.loads(x) for x in _run_score(["--config", str(reg), "--entry", "judge", "-q"],
                                                b"\n".join(json.dumps(x).encode() for x in lines)).stdout.splitlines()]
    assert all(0 < r["p_yes"] < 1 for r in judged)
