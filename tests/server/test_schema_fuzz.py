"""A bounded property-based fuzz run (schemathesis) over the server's own OpenAPI schema: valid and
invalid bodies for every operation, against a real server. No response may be a 5xx, and every
response must match the documented status codes, content types and schemas."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, response_schema_conformance, status_code_conformance,
)

from frugal import LLM  # noqa: E402
from frugal.engine.async_engine import AsyncEngine  # noqa: E402
from frugal.server.serving_common import ServerConfig  # noqa: E402

from .helpers import ServerThread, wait_idle  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MAX_EXAMPLES = {"POST": 20, "GET": 10}


@pytest.fixture(scope="module")
def fuzz_server(chat_model_dir):
    # A short context keeps each generated request cheap (at most 15 new tokens per sample).
    engine = AsyncEngine(LLM(str(chat_model_dir), dtype="float32", kv_cache_memory="8MiB", max_model_len=16).engine)
    thread = ServerThread(engine, ServerConfig(served_model_names=("stories",), max_queue=256),
                          owns_engine=True).start()
    yield thread
    thread.stop()
    engine.shutdown()


def test_fuzz_openapi_schema_finds_no_server_error(fuzz_server):
    base_url = fuzz_server.base_url
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models"} <= labels
    num_cases = 0
    for operation in operations:
        modes = [GenerationMode.POSITIVE]
        if operation.method.upper() == "POST":
            modes.append(GenerationMode.NEGATIVE)  # GETs take no body; a path string is never invalid
        for mode in modes:
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=MAX_EXAMPLES[operation.method.upper()], deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
                      derandomize=True)
            def check(case):
                nonlocal num_cases
                num_cases += 1
                response = case.call(base_url=base_url, timeout=60)
                case.validate_response(response, checks=CHECKS)

            check()
    assert num_cases >= 80
    wait_idle(base_url)
