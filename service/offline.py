"""Offline scoring of a JSONL stream through the same engine the server uses.

Each input line is an item (`prompt`+`response`, `messages`, `text` or `input_ids`) plus any other
fields, which are passed through. Each output line is the input line with the fields `/v1/score`
gives an item (`reward`, `tokens`, `truncated`; `scores` for multi-head models, `members` and
`disagreement` for ensembles) added, in input order; a line that cannot be scored gets an `error`
field instead and the run goes on.
"""

from __future__ import annotations

import asyncio
from typing import BinaryIO

import orjson
from pydantic import ValidationError
from tqdm import tqdm

from rewardserve.api.errors import field_path
from rewardserve.api.schemas import Item
from rewardserve.config import RegistryConfig, ServerSettings
from rewardserve.engine.registry import Registry
from rewardserve.engine.types import Lane
from rewardserve.errors import ServiceError
from rewardserve.monitoring.metrics import Metrics
from rewardserve.scorers.base import Call, Scorer

_ITEM_FIELDS = set(Item.model_fields)
CHUNK_ITEMS = 512


def _parse(line: bytes) -> tuple[dict, Item | None, str | None]:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return {}, None, f"invalid JSON: {exc}"
    if not isinstance(obj, dict):
        return {}, None, "a line must be a JSON object"
    try:
        return obj, Item.model_validate({k: v for k, v in obj.items() if k in _ITEM_FIELDS}), None
    except ValidationError as exc:
        e = exc.errors()[0]
        path, _ = field_path(tuple(e["loc"]))
        msg = str(e["msg"]).removeprefix("Value error, ")
        return obj, None, f"{path}: {msg}" if path else msg


async def _score_chunk(scorer: Scorer, items: list[Item], truncation: str | None) -> list[dict]:
    """Score a chunk; an item the scorer rejects gets an error and the rest are retried without it."""
    results: list[dict | None] = [None] * len(items)
    pending = list(range(len(items)))
    while pending:
        try:
            scored = await scorer.score([items[i] for i in pending], Call(lane=Lane.bulk, truncation=truncation))
        except ServiceError as exc:
            if exc.index is None:
                raise
            bad = pending.pop(exc.index)
            results[bad] = {"error": {"type": exc.type, "message": exc.message}}  # the line is the index
            continue
        for i, s in zip(pending, scored):
            results[i] = {k: v for k, v in s.fields().items() if k != "cached"}
        pending = []
    return results


async def score_jsonl(settings: ServerSettings, registry: RegistryConfig, src: BinaryIO, dst: BinaryIO, *,
                      entry: str | None = None, truncation: str | None, progress: bool = True) -> int:
    """Score every line of `src` into `dst` with `entry` (default: the registry's default); returns how
    many lines failed."""
    scorers = Registry(settings, registry, Metrics())
    await scorers.start()
    scorer = scorers.get(entry)
    failed = 0
    bar = tqdm(unit="item", disable=not progress, desc="scoring")
    try:
        lines = [ln for ln in src.read().splitlines() if ln.strip()]
        bar.reset(total=len(lines))
        chunks = [lines[i : i + CHUNK_ITEMS] for i in range(0, len(lines), CHUNK_ITEMS)]

        async def run(chunk: list[bytes]) -> list[dict]:
            parsed = [_parse(ln) for ln in chunk]
            good = [(j, item) for j, (_, item, err) in enumerate(parsed) if err is None]
            scored = await _score_chunk(scorer, [item for _, item in good], truncation)
            out = [dict(obj, error={"type": "invalid_input", "message": err}) if err else None
                   for obj, _, err in parsed]
            for (j, _), res in zip(good, scored):
                out[j] = {**parsed[j][0], **res}
            return out

        # two chunks in flight: the next one is tokenised and queued while the current one computes
        tasks = [asyncio.ensure_future(run(c)) for c in chunks[:2]]
        for k in range(len(chunks)):
            if k + 2 < len(chunks):
                tasks.append(asyncio.ensure_future(run(chunks[k + 2])))
            for row in await tasks[k]:
                failed += "error" in row
                dst.write(orjson.dumps(row) + b"\n")
            bar.update(len(chunks[k]))
    finally:
        bar.close()
        dst.flush()
        await scorers.stop()
    return failed
