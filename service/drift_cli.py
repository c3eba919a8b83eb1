"""`rewardserve drift`: the drift report of a running server, as text and as a plot.

    rewardserve drift --url http://127.0.0.1:8000 [--out drift.png] [--model NAME] [--no-plot]

GETs URL/admin/drift and prints, per model and head, PSI, KS and the standardized mean shift of the
current reward window against the reference, the window and reference sizes, the rolling distribution
and the reward-hacking signals. A WARN marker flags PSI above 0.25 or KS above 0.3 (the thresholds of
deploy/prometheus/rules.yml). It then writes a PNG with one panel per head: the reference and current
reward histograms (shares of each sample, on the bin edges the server reports).

Exit status: 0 when the report was printed (and the plot written), 1 when the server answered with an
error or the plot could not be made, 2 when the server could not be reached.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
from typing import Any

import httpx

PSI_WARN = 0.25
KS_WARN = 0.3
EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of a running rewardserve server")
    parser.add_argument("--out", default="drift.png", help="PNG to write (reference vs current reward histograms)")
    parser.add_argument("--no-plot", action="store_true", help="print the report only")
    parser.add_argument("--model", default=None, help="only this served model (default: every model in the report)")
    parser.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout in seconds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rewardserve drift", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


# -- formatting -------------------------------------------------------------------------------------------
def _num(value: Any) -> float | None:
    """A finite float, or None for null / NaN / missing (the server reports NaN before the reference is full)."""
    if value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if not math.isnan(x) else None


def _fmt(value: Any, spec: str = ".3f") -> str:
    x = _num(value)
    if x is None:
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, spec)


def _warn(value: Any, limit: float) -> str:
    x = _num(value)
    return f"  WARN (> {limit})" if x is not None and x > limit else ""


def format_report(report: dict, url: str = "") -> tuple[str, int]:
    """The text report of an /admin/drift answer; returns (text, number of WARN markers)."""
    lines, warnings = [], 0
    lines.append(f"rewardserve drift report{' from ' + url if url else ''}")
    for name, model in report.get("models", {}).items():
        when = _num(model.get("time"))
        stamp = (_dt.datetime.fromtimestamp(when, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
                 if when is not None else "unknown time")
        lines.append("")
        lines.append(f"model {name}  ({stamp})")
        lines.append(f"  ensemble disagreement  {_fmt(model.get('disagreement'))}")
        for head, e in (model.get("heads") or {}).items():
            ref_n, cur_n = int(_num(e.get("reference_n")) or 0), int(_num(e.get("current_n")) or 0)
            lines.append(f"  head {head}")
            lines.append(f"    reference_n  {ref_n}    current_n  {cur_n}")
            if ref_n == 0:
                lines.append("    (the reference is not complete yet: drift statistics are n/a)")
            psi_w, ks_w = _warn(e.get("psi"), PSI_WARN), _warn(e.get("ks"), KS_WARN)
            warnings += bool(psi_w) + bool(ks_w)
            lines.append(f"    psi          {_fmt(e.get('psi')):>8}{psi_w}")
            lines.append(f"    ks           {_fmt(e.get('ks')):>8}{ks_w}")
            lines.append(f"    mean_shift   {_fmt(e.get('mean_shift'), '+.3f'):>8}  (reference std units)")
            q = e.get("quantiles") or {}
            qs = "  ".join(f"q{k}={_fmt(v)}" for k, v in q.items())
            lines.append(f"    window       mean={_fmt(e.get('mean'))}  std={_fmt(e.get('std'))}  {qs}".rstrip())
            hacking = [f"length_correlation={_fmt(e.get('length_correlation'), '+.3f')}",
                       f"group_std={_fmt(e.get('group_std'))}"]
            if "clip_share" in e:
                hacking.append(f"clip_share={_fmt(e.get('clip_share'))}")
            lines.append(f"    hacking      {'  '.join(hacking)}")
    lines.append("")
    lines.append(f"{warnings} warning(s): PSI > {PSI_WARN} or KS > {KS_WARN} means the reward distribution shifted"
                 if warnings else f"no drift warnings (PSI <= {PSI_WARN}, KS <= {KS_WARN})")
    return "\n".join(lines), warnings


# -- plotting ---------------------------------------------------------------------------------------------
def plot(report: dict, out: str) -> int:
    """Write one panel per (model, head) with the reference and current histograms; returns panels drawn."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = []
    for name, model in report.get("models", {}).items():
        for head, e in (model.get("heads") or {}).items():
            h = e.get("histogram")
            if not h or len(h.get("edges") or []) < 2:
                continue
            panels.append((name, head, e, h))
    if not panels:
        return 0
    cols = min(len(panels), 2)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6.5 * cols, 4.0 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, head, e, h) in zip(axes, panels):
        edges = np.asarray(h["edges"], dtype=float)
        for key, color, label in (("reference", "tab:blue", "reference"), ("current", "tab:orange", "current window")):
            counts = np.asarray(h.get(key) or [0] * (len(edges) - 1), dtype=float)
            total = counts.sum()
            share = counts / total if total > 0 else counts
            n = int(total)
            ax.stairs(share, edges, color=color, linewidth=1.8, label=f"{label} (n={n})",
                      fill=key == "reference", alpha=0.35 if key == "reference" else 1.0)
        psi, ks = _fmt(e.get("psi")), _fmt(e.get("ks"))
        flag = " WARN" if _warn(e.get("psi"), PSI_WARN) or _warn(e.get("ks"), KS_WARN) else ""
        ax.set_title(f"{name} / {head}: PSI {psi}, KS {ks}, shift {_fmt(e.get('mean_shift'), '+.2f')}{flag}",
                     fontsize=10, color="tab:red" if flag else "black")
        ax.set_xlabel("reward")
        ax.set_ylabel("share of scores")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.savefig(out, format="png", dpi=110)
    return len(panels)


# -- entry points -----------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    base = args.url.rstrip("/")
    try:
        resp = httpx.get(base + "/admin/drift", timeout=args.timeout)
    except httpx.TransportError as exc:
        print(f"error: cannot reach rewardserve at {base}: {type(exc).__name__}: {exc or 'no answer'}",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    if resp.status_code != 200:
        try:
            detail = resp.json()["error"]["message"]
        except Exception:
            detail = resp.text[:300]
        print(f"error: {base}/admin/drift answered {resp.status_code}: {detail}", file=sys.stderr)
        return EXIT_FAILED
    report = resp.json()  # the stdlib parser accepts NaN / Infinity
    models = report.get("models") or {}
    if args.model is not None:
        if args.model not in models:
            print(f"error: model {args.model!r} is not in the report (served: {', '.join(models) or 'none'})",
                  file=sys.stderr)
            return EXIT_FAILED
        report = {**report, "models": {args.model: models[args.model]}}
    text, _ = format_report(report, base)
    print(text)
    if args.no_plot:
        return EXIT_OK
    drawn = plot(report, args.out)
    if not drawn:
        print("error: the report carries no histograms (an older server?): no plot written", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {args.out} ({drawn} panel(s): reference vs current reward histograms)")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
