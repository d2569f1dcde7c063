"""``bonn-sweep up --db`` / ``BONN_SWEEP_DB_URL`` (service/core/db.py, service/launch/stack.py): three
store URLs on one server, passwords never printed, and a clear one-line error -- never a traceback --
for a bad URL or an unreachable server, before any process starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.core.db import DatabaseUrlError, derive_urls, redact
from service.core.settings import Settings
from tests.conftest import get_free_port


def test_three_databases_on_one_server_and_settings_follow() -> None:
    urls = derive_urls("postgresql://bonn:s3cret@db.example:5433/team")
    assert urls.store == "postgresql+psycopg2://bonn:s3cret@db.example:5433/team_studies"
    assert urls.optuna.endswith("/team_optuna") and urls.mlflow.endswith("/team_mlflow")
    assert derive_urls("postgresql://u@h").store.endswith("/bonn_sweep_studies")
    s = Settings(db_url="postgresql://bonn:s3cret@db.example/team")
    assert (s.store_url, s.optuna_storage, s.mlflow_backend_uri) == tuple(
        derive_urls("postgresql://bonn:s3cret@db.example/team").as_dict().values())
    # an explicit store URL wins; without db_url everything stays SQLite in home
    assert Settings(db_url="postgresql://u@h/x", store_url="sqlite:///a.db").store_url == "sqlite:///a.db"
    assert Settings().mlflow_backend_uri.startswith("sqlite:///")


def test_redact_hides_the_password() -> None:
    assert redact("postgresql://bonn:s3cret@h:5432/x") == "postgresql://bonn:***@h:5432/x"
    assert "s3cret" not in redact("::not a url s3cret")


@pytest.mark.parametrize("url, words", [
    ("mysql://u@h/x", "must be a postgresql:// URL"),
    ("postgresql://", "names no host"),
    ("postgresql://u@h/bad-name", "letters, digits and _"),
    ("postgresql+asyncpg://u@h/x", "unsupported driver"),
    ("nonsense", "not a database URL"),
])
def test_bad_urls_are_named(url: str, words: str) -> None:
    with pytest.raises(DatabaseUrlError, match=words):
        derive_urls(url)
    with pytest.raises(Exception) as info:  # the setting: a validation error that does not echo the URL
        Settings(db_url=url)
    assert words in str(info.value) and "input_value" not in str(info.value)


@pytest.mark.parametrize("url, words", [
    ("mysql://u:s3cret@h/x", "must be a postgresql:// URL"),
    ("postgresql://u:s3cret@127.0.0.1:{port}/x", "cannot reach the database server postgresql+psycopg2://u:***@127.0.0.1"),
])
def test_cli_up_with_a_bad_or_unreachable_db_says_why_without_traceback(tmp_path, url: str, words: str) -> None:
    url = url.format(port=get_free_port())
    r = subprocess.run([sys.executable, "-m", "service", "--home", str(tmp_path / "h"), "up", "--db", url],
                       capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert words in out and "Traceback" not in out and "s3cret" not in out, out
    assert not (tmp_path / "h" / "stack.json").exists()  # nothing was started
