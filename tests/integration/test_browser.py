"""As a person would see it: headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven over
the W3C WebDriver protocol with plain HTTP) against the running embedded stack, after a small study:

* the study report page (``GET /studies/{id}/report?format=html``) renders its plots (plotly draws SVG);
* the MLflow UI shows the parent run's plot artifacts (``analysis/*.png``);
* optuna-dashboard lists the study.

Skips, saying why, when no browser can be had (``scripts/setup.sh`` installs both where apt is available).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from service.launch.stack_record import Stack
from tests.integration.conftest import wait_for_status

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
STUDY = {
    "name": "browser-study",
    "search_space": "digits-smoke",
    "base": {"epochs": 1, "hist_epochs": []},
    "scheduler": {"type": "fifo"},
    "budget": {"num_trials": 3, "max_concurrent_trials": 2},
}


class WebDriver:
    """The few WebDriver commands a test needs, over HTTP (no selenium)."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=60.0)
        caps = {"browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"]}}
        r = self.http.post("/session", json={"capabilities": {"alwaysMatch": caps}})
        r.raise_for_status()
        self.session = r.json()["value"]["sessionId"]

    def get(self, url: str) -> None:
        self.http.post(f"/session/{self.session}/url", json={"url": url}).raise_for_status()

    def js(self, script: str) -> Any:
        r = self.http.post(f"/session/{self.session}/execute/sync", json={"script": script, "args": []})
        r.raise_for_status()
        return r.json()["value"]

    def wait(self, script: str, ok: Callable[[Any], bool], timeout: float = 60.0) -> Any:
        """Poll ``script`` until ``ok(value)``; returns the last value (the caller asserts on it)."""
        deadline, value = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            value = self.js(script)
            if ok(value):
                break
            time.sleep(0.5)
        return value

    def quit(self) -> None:
        with contextlib.suppress(httpx.HTTPError):
            self.http.delete(f"/session/{self.session}")
        self.http.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("no headless Chromium: needs Debian's `chromium` and `chromium-driver` on PATH "
                    "(scripts/setup.sh installs them where apt-get is available)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([CHROMEDRIVER, f"--port={port}", "--allowed-ips=127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    driver = None
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/status", timeout=2).json()["value"]["ready"]:
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.skip("chromedriver did not start")
            time.sleep(0.3)
        try:
            driver = WebDriver(f"http://127.0.0.1:{port}")
        except httpx.HTTPError as exc:
            pytest.skip(f"headless Chromium would not start: {exc}")
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def study(api: httpx.Client) -> dict:
    r = api.post("/studies", json=STUDY)
    assert r.status_code == 201, r.text
    done = wait_for_status(api, r.json()["id"], {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=300)
    assert done["status"] == "SUCCEEDED", done
    return done


def test_report_page_renders_its_plots(browser: WebDriver, stack: Stack, study: dict) -> None:
    browser.get(f"{stack.api_url}/studies/{study['id']}/report?format=html")
    n = browser.wait("return document.querySelectorAll('div.js-plotly-plot svg.main-svg').length", lambda v: v >= 5)
    assert n >= 5, f"plotly drew {n} svg layers"
    drawn = browser.js("return Array.from(document.querySelectorAll('div.js-plotly-plot')).map(e => e.id)")
    assert {"plot-optimization_history", "plot-slice", "plot-intermediate_values"} <= set(drawn), drawn
    text = browser.js("return document.body.innerText")
    assert "paper's warm-start point" in text and study["id"] in text


def test_mlflow_ui_shows_the_parent_runs_plots(browser: WebDriver, stack: Stack, study: dict) -> None:
    run, exp = study["mlflow_parent_run_id"], study["mlflow_experiment_id"]
    browser.get(f"{stack.mlflow_uri}/#/experiments/{exp}/runs/{run}/artifacts/analysis/optimization_history.png")
    # the artifact tree names the files of analysis/; the preview is the PNG itself (MLflow shows it as a blob)
    text = browser.wait("return document.body.innerText",
                        lambda v: all(f in (v or "") for f in ("optimization_history.png", "study.html")), timeout=90)
    assert "optimization_history.png" in text and "study.html" in text, text[:3000]
    shown = browser.wait("return Array.from(document.querySelectorAll('img'))"
                         ".filter(i => i.src.startsWith('blob:') && i.complete && i.naturalWidth >= 400).length",
                         lambda v: v >= 1, timeout=30)
    assert shown >= 1, "the MLflow UI did not show the PNG"


def test_optuna_dashboard_lists_the_study(browser: WebDriver, stack: Stack, study: dict) -> None:
    assert stack.optuna_dashboard_url, "the stack runs no optuna-dashboard"
    browser.get(f"{stack.optuna_dashboard_url}/dashboard")
    text = browser.wait("return document.body.innerText", lambda v: study["id"] in (v or ""), timeout=60)
    assert study["id"] in text, text[:2000]
