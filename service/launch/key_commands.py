"""``bonn-sweep keys create | list | revoke``: API keys, straight in the study store of the home
(only each key's sha256 is stored; a new key is printed once)."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from service.launch.api_client import home_of
from service.launch.cli_errors import CliError
from service.launch.display import console, err_console


def key_store(args: argparse.Namespace) -> Any:
    """The study store of the command line's home (created if missing); close it after use. A stack
    started there with ``up --db`` keeps its store on that server: the keys go there too."""
    from pydantic import ValidationError

    from service.core.db import DatabaseUnavailable, check_reachable, redact
    from service.core.settings import Settings
    from service.core.store import StudyStore
    from service.launch.stack_record import Stack

    home = home_of(args)
    stack = Stack.load(home)
    try:
        settings = Settings(home=home, **({"db_url": stack.db_url} if stack is not None and stack.db_url else {}))
    except ValidationError as exc:
        raise CliError(*(f"setting {'.'.join(map(str, e['loc'])) or 'db_url'}: {e['msg']}" for e in exc.errors())) from None
    settings.ensure_dirs()
    try:
        check_reachable(settings.store_url or "")
    except DatabaseUnavailable as exc:
        raise CliError(f"the study store is not reachable: {exc}") from None
    store = StudyStore(settings.store_url or "")
    try:
        store.create_all()
    except Exception as exc:  # noqa: BLE001 - e.g. the server went away just now
        store.close()
        raise CliError(f"the study store {redact(settings.store_url)} could not be opened: {exc}") from None
    return store


def cmd_keys_create(args: argparse.Namespace) -> int:
    from service.core.auth import hash_key, new_key

    store = key_store(args)
    try:
        key_id, key = new_key()
        store.add_api_key(key_id, hash_key(key), args.name or "")
    finally:
        store.close()
    err_console.print(f"created API key {key_id}{f' ({args.name})' if args.name else ''}; it is shown once, "
                      "only its sha256 is stored. Clients send it as 'Authorization: Bearer <key>' "
                      "(the CLI: BONN_SWEEP_API_KEY).")
    print(key)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    store = key_store(args)
    try:
        rows = store.list_api_keys()
    finally:
        store.close()
    t = Table(title=f"API keys ({sum(r.revoked_at is None for r in rows)} active)")
    for col in ("id", "name", "created", "revoked"):
        t.add_column(col)
    for r in rows:
        t.add_row(r.id, r.name, r.created_at.isoformat(timespec="seconds"),
                  r.revoked_at.isoformat(timespec="seconds") if r.revoked_at else "")
    console.print(t)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    store = key_store(args)
    try:
        row = store.revoke_api_key(args.id)
    finally:
        store.close()
    if row is None:
        raise CliError(f"no API key with id {args.id!r} (see `bonn-sweep keys list`)")
    console.print(f"revoked {row.id} (the API stops accepting it within a few seconds: BONN_SWEEP_API_KEY_CACHE_S)")
    return 0
