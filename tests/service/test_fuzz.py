"""Property-based fuzzing of POST /classify from the service's own OpenAPI schema (schemathesis), against the
real running service: no 5xx, every 4xx a JSON `detail`, every answer conforming to the schema."""

from __future__ import annotations

import httpx
import pytest
from support.checkpoints import exported
from support.optional import DEV_ONLY
from support.server import serving

schemathesis = pytest.importorskip("schemathesis", reason=f"schemathesis is {DEV_ONLY}")
from hypothesis import HealthCheck, given, settings  # noqa: E402  (schemathesis brings hypothesis)
from schemathesis import GenerationMode  # noqa: E402

API_KEY = "fuzz-key"
EXAMPLES = 40  # per generation mode: about a minute in all on a busy 2-core machine


@pytest.fixture(scope="module")
def url(tiny_checkpoint):
    # With a key, schemathesis also checks that the declared authentication is enforced.
    with serving(exported(tiny_checkpoint), api_key=API_KEY, max_files=8) as base:
        yield base


def check(response) -> None:
    """No 5xx; a JSON detail with every 4xx (`response`: schemathesis's, whose headers map to lists)."""
    status = response.status_code
    assert status < 500, f"server error {status}: {response.text[:500]}"
    if status >= 400:
        content_type = response.headers.get("content-type", [""])[0]
        assert content_type.startswith("application/json"), response.text[:200]
        assert response.json()["detail"], response.text[:200]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_classify_fuzzed_from_the_schema(url, mode):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operation = schema["/classify"]["POST"]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def fuzz(case) -> None:
        response = case.call(base_url=url, headers={"X-API-Key": API_KEY}, timeout=60)
        check(response)
        # Schema conformance and the built-in checks, less one the schema cannot express: bytes that are a valid
        # "binary" string are rarely a decodable image, so a 400 for them is right.
        case.validate_response(response, excluded_checks=[schemathesis.checks.positive_data_acceptance])

    fuzz()
    assert httpx.get(f"{url}/readyz").status_code == 200
