"""Schemathesis fuzzes every operation of the worker's own OpenAPI document against a real worker
(uvicorn on loopback, the tiny pipeline): no 5xx, only documented status codes, every body as its
schema says, and every error an OpenAI error object.

The operations are driven one by one through schemathesis's Hypothesis strategies: its pytest
plugin (`from_fixture`) does not run under this pytest version.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.integration

EXAMPLES_PER_OPERATION = 40
ERROR_FIELDS = {"message", "type", "param", "code"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_every_operation_answers_as_documented(worker_url: str, mode: GenerationMode) -> None:
    """Positive mode sends what the schema allows; negative mode sends what it forbids (each of
    those must be refused with a 4xx)."""
    schema = schemathesis.openapi.from_url(f"{worker_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {operation.label for operation in operations}
    assert {"POST /v1/images/generations", "GET /v1/models", "GET /health"} <= labels
    statuses: Counter[tuple[str, int]] = Counter()
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        def answers_as_documented(case: Any) -> None:
            response = case.call(timeout=120)
            statuses[(case.operation.label, response.status_code)] += 1
            case.validate_response(response, checks=CHECKS)
            if response.status_code >= 400:
                body = response.json()
                assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
                assert isinstance(body["error"]["message"], str) and body["error"]["message"]

        try:
            answers_as_documented()
        except Unsatisfiable:
            # Where the schema allows every input (GET /health, a string path key) nothing is invalid.
            assert mode is GenerationMode.NEGATIVE and operation.label != "POST /v1/images/generations"
    print(mode.value, dict(statuses))
    if mode is GenerationMode.POSITIVE:
        assert statuses[("POST /v1/images/generations", 200)] > 0, "no generated request was accepted"
    else:
        accepted = statuses[("POST /v1/images/generations", 200)]
        assert accepted == 0, f"{accepted} requests that break the schema were accepted"
    assert statuses[("POST /v1/images/generations", 400)] > 0, "no generated request was refused"
