"""`rewardserve calibrate pairs|length DATA.jsonl`: score a file with an entry, fit, report, write the fit.

    pairs   lines {"prompt", "chosen", "rejected"} (labelled pairs: the calibration maps r_a - r_b to
            P(a is preferred), fitted on both orders of each pair), or items of any form with a
            "label" of 1 or 0 (good or bad: it maps r to P(good))
    length  lines of items of any form, or pairs (both responses are items): f(tokens), a polynomial
            of the rewards on the items' token counts

A share of the file (--holdout) is kept out of the fit; the report gives, on it, before and after the
fit: pairwise accuracy, Brier score and ECE (10 bins) of the win probability (pairs), and the
reward-length correlation; and a reliability diagram (PNG). The fit is written as JSON, beside the
model when its directory is writable, else in the working directory (or where --out says); name it
in the registry entry (`calibration:` or `length_fit:`) with the matching transform.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import BinaryIO

import orjson
from pydantic import ValidationError
from tqdm import tqdm

from rewardserve.api.schemas import Item
from rewardserve.config import DEFAULT_MODEL_DIR, RegistryConfig, ServerSettings
from rewardserve.engine.registry import Registry
from rewardserve.engine.types import Lane
from rewardserve.monitoring.metrics import Metrics
from rewardserve.scorers.base import Call
from rewardserve.transforms import fits

_CHUNK = 256


def read(src: BinaryIO) -> tuple[list[tuple[Item, Item]], list[tuple[Item, float]]]:
    """(pairs as (chosen, rejected) items, labelled items); ValueError names the line at fault."""
    pairs, labelled = [], []
    for n, line in enumerate(src.read().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
            if "chosen" in obj:
                pairs.append((Item(prompt=obj["prompt"], response=obj["chosen"]),
                              Item(prompt=obj["prompt"], response=obj["rejected"])))
            else:
                label = obj.pop("label", None)
                labelled.append((Item.model_validate({k: v for k, v in obj.items() if k in Item.model_fields}),
                                 label))
        except (orjson.JSONDecodeError, KeyError, ValidationError, TypeError, AttributeError) as exc:
            raise ValueError(f"line {n}: {str(exc).splitlines()[0]}") from None
    return pairs, labelled


async def _score(scorer, items: list[Item], bar) -> list:
    out = []
    for i in range(0, len(items), _CHUNK):
        out += await scorer.score(items[i: i + _CHUNK], Call(lane=Lane.bulk))
        bar.update(min(_CHUNK, len(items) - i))
    return out


def _split(n: int, holdout: float, seed: int = 0) -> tuple[list[int], list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cut = int(round(n * (1 - holdout)))
    return sorted(order[:cut]), sorted(order[cut:])


def _measures(diffs: list[float], probs: list[float], rewards: list[float], tokens: list[int]) -> dict:
    """The report's row: the win probabilities `probs` of pairs with score differences `diffs`, taken in
    both orders, and the rewards' correlation with length."""
    out = {}
    if diffs:
        p = probs + [1 - x for x in probs]
        y = [1.0] * len(probs) + [0.0] * len(probs)
        out |= {"pairwise_accuracy": fits.pairwise_accuracy(diffs), "brier": fits.brier(p, y), "ece": fits.ece(p, y)}
    if rewards:
        out["length_correlation"] = fits.correlation(rewards, tokens)
    return out


def default_out(registry: RegistryConfig, entry: str, kind: str) -> Path:
    model = next((m for m in registry.models if m.name == entry), None)
    name = f"rewardserve-{kind}.json"
    if model is not None and Path(model.path).is_dir() and os.access(model.path, os.W_OK) and \
            Path(model.path).resolve() != DEFAULT_MODEL_DIR.resolve():
        return Path(model.path) / name
    return Path(f"{entry}.{name}")


async def calibrate(what: str, settings: ServerSettings, registry: RegistryConfig, src: BinaryIO, *,
                    entry: str | None, out: str | None, plot: str | None, method: str = "isotonic",
                    degree: int = 1, holdout: float = 0.2, progress: bool = True) -> dict:
    """Score, fit, measure, write; returns the report."""
    pairs, labelled = read(src)
    if what == "pairs" and pairs and labelled:
        raise ValueError("the file mixes pairs and labelled items: calibrate one kind at a time")
    if what == "pairs" and not pairs and any(label not in (0, 1, True, False) for _, label in labelled):
        raise ValueError("labelled items need a label of 1 (good) or 0 (bad)")
    items = [it for pair in pairs for it in pair] + [it for it, _ in labelled]
    if len(items) < 10:
        raise ValueError(f"{len(items)} items: too few to fit anything")
    scorers = Registry(settings, registry, Metrics())
    await scorers.start()
    try:
        scorer = scorers.get(entry)
        with tqdm(total=len(items), unit="item", disable=not progress, desc="scoring") as bar:
            results = await _score(scorer, items, bar)
    finally:
        await scorers.stop()
    rewards, tokens = [r.reward for r in results], [r.tokens for r in results]
    n_pairs = len(pairs)
    units = n_pairs if pairs else len(labelled)
    fit_idx, held = _split(units, holdout)
    if pairs:  # pair k is items 2k (chosen) and 2k + 1 (rejected)
        diffs = [rewards[2 * k] - rewards[2 * k + 1] for k in range(n_pairs)]
        members = lambda ks: [j for k in ks for j in (2 * k, 2 * k + 1)]  # noqa: E731
    else:  # items: labelled for a pointwise calibration, unlabelled for a length fit
        labels = [float(label or 0) for _, label in labelled]
        members = lambda ks: list(ks)  # noqa: E731
    held_items = members(held)

    if what == "pairs":
        if pairs:  # both orders: g(d) = P(the first is preferred), g(-d) = 1 - g(d) in expectation
            x = [diffs[k] for k in fit_idx] + [-diffs[k] for k in fit_idx]
            y = [1.0] * len(fit_idx) + [0.0] * len(fit_idx)
            fit = fits.Calibration.fit(x, y, method, "pairwise")
            hd = [diffs[k] for k in held]
            before = _measures(hd, [fits.sigmoid(d) for d in hd], [rewards[j] for j in held_items],
                               [tokens[j] for j in held_items])
            after = _measures(hd, [fit(d) for d in hd], [rewards[j] for j in held_items],
                              [tokens[j] for j in held_items])
            points = ([fits.sigmoid(d) for d in hd], [fit(d) for d in hd], [1.0] * len(hd))
        else:
            fit = fits.Calibration.fit([rewards[k] for k in fit_idx], [labels[k] for k in fit_idx], method,
                                       "pointwise")
            hp, hy = [fits.sigmoid(rewards[k]) for k in held], [labels[k] for k in held]
            before = {"brier": fits.brier(hp, hy), "ece": fits.ece(hp, hy)}
            after_p = [fit(rewards[k]) for k in held]
            after = {"brier": fits.brier(after_p, hy), "ece": fits.ece(after_p, hy)}
            points = (hp, after_p, hy)
    else:
        fit_items = members(fit_idx)
        fit = fits.LengthFit.fit([tokens[j] for j in fit_items], [rewards[j] for j in fit_items], degree)
        shaped = [r - fit(t) for r, t in zip(rewards, tokens)]
        hd = [diffs[k] for k in held] if pairs else []
        hd_after = [shaped[2 * k] - shaped[2 * k + 1] for k in held] if pairs else []
        before = _measures(hd, [fits.sigmoid(d) for d in hd], [rewards[j] for j in held_items],
                           [tokens[j] for j in held_items])
        after = _measures(hd_after, [fits.sigmoid(d) for d in hd_after], [shaped[j] for j in held_items],
                          [tokens[j] for j in held_items])
        points = ([fits.sigmoid(d) for d in hd], [fits.sigmoid(d) for d in hd_after], [1.0] * len(hd))

    name = entry or registry.default_name
    path = Path(out) if out else default_out(registry, name, "calibration" if what == "pairs" else "length")
    report = {"what": what, "entry": name, "items": len(items), "unit": "pairs" if pairs else "items",
              "fitted_on": len(fit_idx), "held_out": len(held), "before": before, "after": after}
    path.write_bytes(orjson.dumps(fit.to_json() | {"report": report}, option=orjson.OPT_INDENT_2))
    report["written"] = str(path)
    if plot is not None or points[0]:
        report["plot"] = str(_reliability(points, Path(plot) if plot else path.with_suffix(".png")))
    return report


def _reliability(points: tuple[list, list, list], path: Path) -> Path:
    """The reliability diagram: predicted probability against the observed frequency, in 10 bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after, truth = points
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for name, probs in (("before", before), ("after", after)):
        if not probs:
            continue
        both = probs + [1 - p for p in probs] if truth == [1.0] * len(truth) else probs
        ys = truth + [0.0] * len(truth) if truth == [1.0] * len(truth) else truth
        xs, fs = [], []
        for k in range(10):
            inside = [i for i, p in enumerate(both) if min(int(p * 10), 9) == k]
            if inside:
                xs.append(sum(both[i] for i in inside) / len(inside))
                fs.append(sum(ys[i] for i in inside) / len(inside))
        ax.plot(xs, fs, marker="o", label=f"{name} (ECE {fits.ece(both, ys):.3f})")
    ax.set(xlabel="predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1),
           title="Reliability on the held-out data")
    ax.legend(loc="upper left")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def table(report: dict) -> str:
    """The report as a small text table."""
    keys = [k for k in ("pairwise_accuracy", "brier", "ece", "length_correlation") if k in report["before"]]
    lines = [f"{report['what']} fit of {report['entry']}: fitted on {report['fitted_on']} {report['unit']}, measured "
             f"on the {report['held_out']} held out", f"  {'':<20}{'before':>10}{'after':>10}"]
    for k in keys:
        b, a = report["before"][k], report["after"][k]
        lines.append(f"  {k:<20}{b:>10.4f}{a:>10.4f}" if not (math.isnan(b) or math.isnan(a)) else f"  {k:<20}  n/a")
    lines.append(f"  written to {report['written']}" + (f"; reliability diagram {report['plot']}"
                                                        if "plot" in report else ""))
    return "\n".join(lines)
