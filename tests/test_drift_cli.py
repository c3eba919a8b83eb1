"""`rewardserve drift`: the text report and the reference-vs-current PNG, against a real server."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from rewardserve import drift_cli
from rewardserve.bench.proc import free_port
from rewardserve.config import quick
from tests.server import serve

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    settings = quick(model=str(tiny_ckpt("llama")), drift_reference_size=20, drift_window=20,
                     monitor_interval_s=0.2)
    with serve(*settings) as srv:
        with srv.client() as c:
            items = [{"prompt": f"What is {i} + {i}?", "response": f"{2 * i}" + " yes" * (i % 5)} for i in range(40)]
            assert c.post("/v1/score", json={"items": items[:20]}).status_code == 200
            assert c.post("/v1/score", json={"items": items[20:]}).status_code == 200
            r = c.post("/v1/best_of_n", json={"prompt": "Name a colour.", "candidates": ["red", "blue", "a cat"]})
            assert r.status_code == 200
        yield srv


def test_report_and_plot_against_a_running_server(server, tmp_path, capsys):
    out = tmp_path / "drift.png"
    assert drift_cli.main(["--url", server.url, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    name = server.name
    assert f"model {name}" in text
    for key in ("psi", "ks", "mean_shift", "reference_n  20", "current_n  20", "length_correlation", "group_std"):
        assert key in text, (key, text)
    psi_line = next(line for line in text.splitlines() if line.strip().startswith("psi"))
    assert math.isfinite(float(psi_line.split()[1])), text  # the reference is complete: real numbers, not n/a
    assert out.exists() and out.read_bytes()[:8] == PNG_SIGNATURE
    assert out.stat().st_size > 5000  # a real figure, not an empty canvas


def test_model_filter(server, tmp_path, capsys):
    assert drift_cli.main(["--url", server.url + "/", "--model", server.name, "--no-plot"]) == 0
    assert "psi" in capsys.readouterr().out
    assert drift_cli.main(["--url", server.url, "--model", "nope", "--no-plot"]) == 1
    err = capsys.readouterr().err
    assert "'nope' is not in the report" in err and server.name in err


def test_unreachable_server_exits_2_with_a_clear_message(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert drift_cli.main(["--url", url, "--out", str(tmp_path / "x.png"), "--timeout", "5"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach rewardserve at " + url in err
    assert not (tmp_path / "x.png").exists()
    # and as a process (the `python -m service.drift_cli` entry point)
    proc = subprocess.run([sys.executable, "-m", "rewardserve.drift_cli", "--url", url, "--no-plot"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot reach" in proc.stderr


def _report(psi, ks, with_histogram=True):
    head = {"psi": psi, "ks": ks, "mean_shift": 1.5, "reference_n": 100, "current_n": 50, "mean": 0.3, "std": 1.0,
            "quantiles": {"0.05": -1.0, "0.5": 0.2, "0.95": 2.0}, "length_correlation": float("nan"),
            "group_std": 0.4, "clip_share": 0.1}
    if with_histogram:
        head["histogram"] = {"edges": [0.0, 1.0, 2.0, 3.0], "reference": [10, 80, 10], "current": [0, 10, 40]}
    return {"models": {"m": {"model": "m", "time": 1.7e9, "heads": {"LABEL_0": head, "LABEL_1": dict(head)},
                             "disagreement": None}}}


def test_warn_markers_and_missing_values():
    text, warnings = drift_cli.format_report(_report(0.4, 0.1))
    psi_line = next(line for line in text.splitlines() if line.strip().startswith("psi"))
    ks_line = next(line for line in text.splitlines() if line.strip().startswith("ks"))
    assert "WARN" in psi_line and "WARN" not in ks_line and warnings == 2  # two heads
    text, warnings = drift_cli.format_report(_report(0.1, 0.31))
    assert warnings == 2 and all("WARN" in line for line in text.splitlines() if line.strip().startswith("ks"))
    text, warnings = drift_cli.format_report(_report(float("nan"), None))
    assert warnings == 0 and "no drift warnings" in text
    assert "psi               n/a" in text and "length_correlation=n/a" in text and "clip_share=0.100" in text


def test_plot_from_report_shapes(tmp_path):
    out = tmp_path / "p.png"
    assert drift_cli.plot(_report(0.4, 0.5), str(out)) == 2
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert drift_cli.plot(_report(0.4, 0.5, with_histogram=False), str(tmp_path / "none.png")) == 0
    assert not (tmp_path / "none.png").exists()
