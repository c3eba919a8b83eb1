"""Offline scoring of a JSONL stream through the same engine the server uses.

Each input line is an item (`prompt`+`response`, `messages`, `text` or `input_ids`) plus any other
fields, which are passed through. Each output line is the input line with `reward`, `tokens`,
`truncated` (and `scores` for multi-head models) added, in input order; a line that cannot be scored
gets an `error` field instead and the run goes on.
"""

from __future__ import annotations

import asyncio
from typing import BinaryIO

import orjson
from pydantic import ValidationError
from tqdm import tqdm

from rewardserve.api.errors import field_path
from rewardserve.api.schemas import Item
from rewardserve.config import Settings
from rewardserve.engine.engine import Engine
from rewardserve.engine.types import Lane, Ticket
from rewardserve.errors import ServiceError
from rewardserve.monitoring.metrics import Metrics

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


async def _score_chunk(engine: Engine, items: list[Item], truncation: str) -> list[dict]:
    """Score a chunk; an item the engine rejects gets an error and the rest are retried without it."""
    results: list[dict | None] = [None] * len(items)
    pending = list(range(len(items)))
    while pending:
        try:
            scored = await engine.score_items([items[i] for i in pending], truncation=truncation, lane=Lane.bulk,
                                              ticket=Ticket())
        except ServiceError as exc:
            if exc.index is None:
                raise
            bad = pending.pop(exc.index)
            results[bad] = {"error": {"type": exc.type, "message": exc.message}}  # the line is the index
            continue
        multi = engine.model.num_labels > 1
        for i, s in zip(pending, scored):
            results[i] = {"reward": s.reward, "tokens": s.tokens, "truncated": s.truncated}
            if multi:
                results[i]["scores"] = s.scores
        pending = []
    return results


async def score_jsonl(settings: Settings, src: BinaryIO, dst: BinaryIO, *, truncation: str | None,
                      progress: bool = True) -> int:
    """Score every line of `src` into `dst`; returns how many lines failed."""
    engine = Engine(settings, Metrics())
    await engine.start()
    truncation = truncation or settings.default_truncation
    failed = 0
    bar = tqdm(unit="item", disable=not progress, desc="scoring")
    try:
        lines = [ln for ln in src.read().splitlines() if ln.strip()]
        bar.reset(total=len(lines))
        chunks = [lines[i : i + CHUNK_ITEMS] for i in range(0, len(lines), CHUNK_ITEMS)]

        async def run(chunk: list[bytes]) -> list[dict]:
            parsed = [_parse(ln) for ln in chunk]
            good = [(j, item) for j, (_, item, err) in enumerate(parsed) if err is None]
            scored = await _score_chunk(engine, [item for _, item in good], truncation)
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
        await engine.stop()
    return failed
