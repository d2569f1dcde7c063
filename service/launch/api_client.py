"""The CLI's HTTP client of the API, and how it finds the API and its key.

The API URL: ``--api URL``, else ``BONN_SWEEP_API_URL``, else the stack recorded in the home's
``stack.json``, else ``http://127.0.0.1:8000``. The API key: ``BONN_SWEEP_API_KEY``, else the local
stack's ``<home>/api-key`` (written by ``up``; sent only to a loopback API URL).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from service.launch.cli_errors import CliError, error_lines
from service.launch.stack_record import Stack, stack_home


class Api:
    """``request(method, path, ...)`` returns the JSON body; any failure is a :class:`CliError`."""

    def __init__(self, url: str, timeout: float = 60.0, key: str | None = None) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def request(self, method: str, path: str, **kw: Any) -> Any:
        return self.response(method, path, **kw).json()

    def response(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """The answer itself (``request`` is its JSON body); any failure is a :class:`CliError`."""
        try:
            r = self._http.request(method, path, **kw)
        except httpx.ConnectError:
            raise CliError(f"cannot reach the API at {self.url}: is `bonn-sweep up` running? (or pass --api URL)") from None
        except httpx.HTTPError as exc:
            raise CliError(f"API request {method} {path} failed: {exc.__class__.__name__}: {exc}") from None
        if r.status_code >= 400:
            lines = error_lines(r)
            if r.status_code in (401, 403):
                lines.append("set BONN_SWEEP_API_KEY to a key of this API (`bonn-sweep keys create` on its machine); "
                             "the local stack's key is in <home>/api-key")
            raise CliError(*lines)
        return r


def home_of(args: argparse.Namespace) -> Path:
    """The stack home of the command line: ``--home``, else ``BONN_SWEEP_HOME``, else ``./.bonn-sweep``."""
    return stack_home(args.home)


def api_url(args: argparse.Namespace) -> str:
    if args.api:
        return args.api
    if os.environ.get("BONN_SWEEP_API_URL"):
        return os.environ["BONN_SWEEP_API_URL"]
    stack = Stack.load(home_of(args))
    if stack is not None and stack.api_url:
        return stack.api_url
    from service.core.settings import Settings

    return Settings().api_url or "http://127.0.0.1:8000"


def is_loopback_url(url: str) -> bool:
    host = (urlsplit(url).hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key(args: argparse.Namespace, url: str) -> str | None:
    """``BONN_SWEEP_API_KEY``, else the local stack's key file -- the latter only for a loopback URL
    (the local user's key is never sent to another machine)."""
    from service.core.auth import CLIENT_ENV, read_local_key

    if os.environ.get(CLIENT_ENV):
        return os.environ[CLIENT_ENV].strip()
    return read_local_key(home_of(args)) if is_loopback_url(url) else None


def client(args: argparse.Namespace, url: str | None = None) -> Api:
    """An :class:`Api` for the command line's API URL (or ``url``), with its key."""
    url = url or api_url(args)
    return Api(url, key=api_key(args, url))
