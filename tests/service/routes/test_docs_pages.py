"""The offline /docs pages' security headers: every page keeps its policy and refuses framing; assets say nosniff."""

from __future__ import annotations

import httpx
import pytest
from support.server import serving


@pytest.fixture(scope="module")
def url(artifacts):
    with serving(artifacts) as base:
        yield base


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/docs/oauth2-redirect"])
def test_every_docs_page_has_a_policy_that_refuses_framing_and_says_nosniff(url, path):
    answer = httpx.get(f"{url}{path}", timeout=30)
    assert answer.status_code == 200
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    assert answer.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("name", ["swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"])
def test_docs_assets_say_nosniff(url, name):
    answer = httpx.get(f"{url}/docs/assets/{name}", timeout=30)
    assert answer.status_code == 200 and answer.headers["x-content-type-options"] == "nosniff"
