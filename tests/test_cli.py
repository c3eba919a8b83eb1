"""The `rewardserve` command: settings from flags and RS_* variables, offline JSONL scoring."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rewardserve.cli import build_parser, settings_from_args
from rewardserve.config import Settings


def test_every_setting_is_a_flag_and_flags_beat_the_environment(monkeypatch):
    parser = build_parser()
    monkeypatch.setenv("RS_MAX_BATCH_TOKENS", "777")
    monkeypatch.setenv("RS_WARMUP", "false")
    s = settings_from_args(parser.parse_args(["serve"]))
    assert s.max_batch_tokens == 777 and s.warmup is False
    s = settings_from_args(parser.parse_args(["serve", "--max-batch-tokens", "999", "--warmup", "--dtype", "bfloat16"]))
    assert s.max_batch_tokens == 999 and s.warmup is True and s.dtype == "bfloat16"
    with pytest.raises(SystemExit) as err:
        settings_from_args(parser.parse_args(["serve", "--max-batch-tokens", "lots"]))
    assert "--max-batch-tokens" in str(err.value)


def test_serve_help_lists_every_setting_with_its_env_variable():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    text = serve.format_help()
    for name in Settings.model_fields:
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
