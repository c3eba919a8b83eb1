"""schemathesis against the server's own OpenAPI schema: generated requests to every endpoint, the
peer-compatible ones included, with a fixed seed and a bounded budget. No answer may be a 5xx, and
every answer must match the schema the server publishes for its status."""

from __future__ import annotations

import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from rewardserve.config import quick
from tests.server import serve

EXAMPLES = 100  # per operation and mode: 2,000+ cases over the schema's operations (the test counts them)


def test_no_5xx_and_every_answer_matches_the_schema(tiny_ckpt):
    settings_, registry = quick(model=str(tiny_ckpt("qwen2")), max_wait_ms=1, max_items_per_request=32,
                                max_candidates=16, max_length=128, monitor_interval_s=3600)
    with serve(settings_, registry) as server:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        cases: dict[str, int] = {}
        modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)  # valid requests, and requests the schema refuses
        for op, mode in ((op, mode) for op in operations for mode in modes):
            name = f"{op.method.upper()} {op.path}"
            if mode is GenerationMode.NEGATIVE and not len(op.body) and not len(op.query):
                continue  # nothing to get wrong: no body, no parameters

            @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                cases[name] = cases.get(name, 0) + 1
                if isinstance(case.body, dict):  # a deadline of 5e-324 s rightly ends in 504: tested apart
                    case.body.pop("timeout", None)
                case.call_and_validate(base_url=server.url, checks=[not_a_server_error, response_schema_conformance])

            run()
    assert set(cases) == {f"{op.method.upper()} {op.path}" for op in operations} and len(operations) >= 17
    assert sum(cases.values()) >= 2000, cases
