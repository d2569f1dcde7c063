"""``bonn-sweep studies create | list | show | watch | cancel | resume``: studies over the HTTP API,
and the spec a study file / preset plus ``--name`` / ``--trials`` / ``--set`` make."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.table import Table

from service.launch.api_client import Api, client
from service.launch.cli_errors import CliError, exception_lines
from service.launch.display import (
    confirmation_table,
    console,
    print_study,
    study_panel,
    styled_status,
    trials_table,
)

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "INTERRUPTED"}


# -- the spec -------------------------------------------------------------------------------------


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["epochs=4", "budget.num_trials=8"]`` -> nested dict; a bare key goes to ``base``; values are YAML
    (``1e-3`` is a number)."""
    from search_spaces import SearchSpaceError, parse_yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise CliError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw) if raw else None
        except SearchSpaceError as exc:
            raise CliError(f"--set {item!r}: {exc}") from None
        path = key.strip().split(".")
        if len(path) == 1:
            path = ["base", *path]
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return out


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The study spec of ``studies create``: FILE or ``--preset``, then ``--name``, ``--trials``, ``--set``."""
    from search_spaces import SearchSpaceError, parse_yaml

    if args.file and args.preset:
        raise CliError("give a study FILE or --preset NAME, not both")
    if args.file:
        path = Path(args.file)
        try:
            spec = parse_yaml(path.read_text(encoding="utf-8"), source=str(path))
        except OSError as exc:
            raise CliError(f"{path}: {exc.strerror}") from None
        except SearchSpaceError as exc:
            raise CliError(*exception_lines(exc)) from None
        if not isinstance(spec, dict):
            raise CliError(f"{path}: a study spec is a mapping (name, search_space, base, ...)")
        space = spec.get("search_space")
        if isinstance(space, str) and (space.endswith((".yaml", ".yml", ".json")) or "/" in space):
            # a space file next to the study file: load it here, send it inline
            import search_spaces

            space_path = (path.parent / space) if not Path(space).is_absolute() else Path(space)
            try:
                spec["search_space"] = search_spaces.load_file(space_path).to_dict()
            except search_spaces.SearchSpaceError as exc:
                raise CliError(*[f"search_space: {line}" for line in exception_lines(exc)]) from None
    elif args.preset:
        spec = {"name": args.preset, "search_space": args.preset}
    else:
        raise CliError("give a study FILE (YAML/JSON) or --preset NAME (see `bonn-sweep spaces list`)")
    if args.name:
        spec["name"] = args.name
    if args.trials is not None:
        spec = deep_merge(spec, {"budget": {"num_trials": args.trials}})
    if args.set:
        spec = deep_merge(spec, parse_set(args.set))
    return spec


# -- live progress --------------------------------------------------------------------------------


def watch(api: Api, study_id: str, interval: float = 1.0) -> int:
    """Show the study and its last trials live until it ends; 0 if it SUCCEEDED, else 1."""
    t0 = time.monotonic()
    study: dict[str, Any] = {}
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        while True:
            study = api.request("GET", f"/studies/{study_id}")
            trials = api.request("GET", f"/studies/{study_id}/trials")["data"]
            parts: list[Any] = [study_panel(study, time.monotonic() - t0)]
            if trials:
                parts.append(trials_table(trials[-12:], study["objective"]))
            conf = confirmation_table(study)
            if conf is not None:
                parts.append(conf)
            live.update(Group(*parts))
            if study["status"] in TERMINAL:
                break
            time.sleep(interval)
    return 0 if study.get("status") == "SUCCEEDED" else 1


# -- the commands ---------------------------------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> int:
    api = client(args)
    spec = build_spec(args)
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    study = api.request("POST", "/studies", json=spec, headers=headers)
    print_study(study)
    if args.watch:
        return watch(api, study["id"])
    return 0 if study["status"] not in ("FAILED", "INTERRUPTED") else 1


def cmd_list(args: argparse.Namespace) -> int:
    api = client(args)
    params: dict[str, Any] = {"limit": args.limit, "offset": args.offset}
    if args.status:
        params["status"] = args.status.upper()
    page = api.request("GET", "/studies", params=params)
    t = Table(title=f"studies ({page['count']} total)")
    for col in ("id", "name", "status", "trials", "created", "error"):
        t.add_column(col)
    for s in page["data"]:
        t.add_row(
            s["id"], s["name"], styled_status(s["status"]), str(s["num_trials"]), s["created_at"][:19].replace("T", " "),
            (s.get("error") or "")[:60],
        )
    console.print(t)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    api = client(args)
    study = api.request("GET", f"/studies/{args.id}")
    print_study(study)
    trials = api.request("GET", f"/studies/{args.id}/trials")
    if trials["data"]:
        console.print(trials_table(trials["data"], study["objective"]))
    conf = confirmation_table(study)
    if conf is not None:
        console.print(conf)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    return watch(client(args), args.id)


def cmd_cancel(args: argparse.Namespace) -> int:
    study = client(args).request("POST", f"/studies/{args.id}/cancel")
    console.print(f"study {study['id']}: {styled_status(study['status'])}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    body = {"num_trials": args.trials} if args.trials is not None else None
    study = client(args).request("POST", f"/studies/{args.id}/resume", json=body)
    console.print(f"study {study['id']}: {styled_status(study['status'])} (job {study.get('submission_id')})")
    if args.watch:
        return watch(client(args), args.id)
    return 0
