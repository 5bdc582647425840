"""The HTTP API against its own OpenAPI document: schemathesis generates requests for every
operation from ``/openapi.json`` and sends them to a live ``ragq serve`` with a real worker.

Checks: no 5xx (``not_a_server_error``) and only documented status codes
(``status_code_conformance``). Examples per operation are bounded to keep the run short.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

from tests.conftest import Stack
from tests.test_http import TOKEN, Server, start_server, stop_server

pytestmark = pytest.mark.timeout(300)

#: Enough to reach every branch of small schemas while the module stays under a minute.
MAX_EXAMPLES = 12


@schemathesis.serializer("application/x-ndjson")
def _jsonl(ctx: Any, value: Any) -> bytes:
    """JSONL bodies: one JSON value per line (a non-list is sent as one line)."""
    rows = value if isinstance(value, list) else [value]
    return "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")


@pytest.fixture(scope="module")
def api(stack: Stack) -> Iterator[Server]:
    server = start_server(stack, RAGQ_API_TOKEN=TOKEN, RAGQ_HTTP_MAX_BODY_BYTES=str(256 * 1024))
    yield server
    stop_server(server)


def _document() -> dict[str, Any]:
    """The OpenAPI document as ``ragq serve`` builds it (no connection needed to build it)."""
    from common.config import Settings
    from producer.http import create_app

    return create_app(Settings(_env_file=None)).openapi()


# Loaded at collection time: schemathesis' fixture-based lazy loader does not run under
# pytest 9 (it reads a private attribute pytest removed). The live server's document is
# checked to be this one below.
schema = schemathesis.openapi.from_dict(_document())


def test_batch_api_operations_are_generated() -> None:
    """The Batch API's routes (files, batches) are exercised like the others."""
    operations = {(method.upper(), path) for path, item in _document()["paths"].items() for method in item}
    assert {("POST", "/v1/files"), ("GET", "/v1/files"), ("GET", "/v1/files/{file_id}"),
            ("GET", "/v1/files/{file_id}/content"), ("DELETE", "/v1/files/{file_id}"), ("POST", "/v1/batches"),
            ("GET", "/v1/batches"), ("GET", "/v1/batches/{batch_id}"),
            ("POST", "/v1/batches/{batch_id}/cancel")} <= operations


def test_live_document_is_the_tested_one(api: Server) -> None:
    assert httpx.get(f"{api.base}/openapi.json", timeout=10).json() == _document()


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(case: schemathesis.Case, api: Server) -> None:
    if isinstance(case.body, dict) and "timeout" in case.body:
        # A generated timeout of a microsecond gets a documented 504, which not_a_server_error
        # would report; give the one test worker time to answer instead.
        case.body["timeout"] = 120.0
    case.call_and_validate(base_url=api.base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=150,
                           checks=[not_a_server_error, status_code_conformance])
