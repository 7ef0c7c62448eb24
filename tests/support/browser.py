"""Headless Chromium for the web page's tests: Debian's `chromium` driven by Playwright, with no internet.

Playwright cannot download its own browsers here, so it drives the system's (`make browser` installs it).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LOCAL_HOSTS = ("127.0.0.1", "localhost")


class OfflineContext:
    """A browser context in which every request to a host other than 127.0.0.1/localhost is aborted and recorded.

    The service's pages carry a Content-Security-Policy, so the browser refuses most outside loads before they
    reach the network: those refusals are recorded too (`refused`), from the console messages Chromium writes.
    """

    def __init__(self, browser, *, timeout_ms: float, **options) -> None:
        self.context = browser.new_context(**options)
        self.context.set_default_timeout(timeout_ms)
        self.outside: list[str] = []
        self.refused: list[str] = []
        self.context.route("**/*", self._route)
        self.context.on("console", self._console)

    def _route(self, route) -> None:
        url = route.request.url
        if url.startswith(("data:", "blob:")) or urlsplit(url).hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            self.outside.append(url)
            route.abort("internetdisconnected")

    def _console(self, message) -> None:
        if "Content Security Policy" in message.text:
            self.refused.append(message.text)

    def open(self, url: str):
        """A new tab at `url`; its `errors` list collects the page's uncaught script errors."""
        page = self.context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        page.errors = errors
        return page

    def close(self) -> None:
        self.context.close()
