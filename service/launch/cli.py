"""``bonn-sweep``: the embedded stack (up / down / status / demo), studies over the HTTP API, spaces.

    bonn-sweep up                      # Ray head + MLflow server + API on 127.0.0.1, state in ./.bonn-sweep
    bonn-sweep demo                    # up if needed, POST a digits study, live progress, best trial
    bonn-sweep studies create study.yaml | --preset digits-smoke [--name N] [--trials 8] [--set epochs=4]
    bonn-sweep studies list | show ID | watch ID | cancel ID | resume ID [--trials N]
    bonn-sweep spaces list | show NAME | validate FILE ...
    bonn-sweep keys create [--name N] | list | revoke ID     # API keys (stored hashed in the study store)
    bonn-sweep down                    # stops exactly what `up` started (by pid)

The API URL: ``--api URL``, else ``BONN_SWEEP_API_URL``, else the stack recorded in the home's
``stack.json``, else ``http://127.0.0.1:8000``. The API key: ``BONN_SWEEP_API_KEY``, else the local
stack's ``<home>/api-key`` (written by ``up``; sent only to a loopback API URL). API errors print one
line per field and exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

console = Console(soft_wrap=False)
err_console = Console(stderr=True, soft_wrap=True)

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "INTERRUPTED"}
DEMO_STUDY: dict[str, Any] = {
    "name": "digits-demo",
    "search_space": "digits-smoke",
    # 12 cosine epochs at lr 0.1: ~3 s of training per trial on one core, val_acc ~0.8 for good lam/theta/nu
    "base": {"epochs": 12, "lr": 0.1, "schedule": "cosine"},
    "objective": {"metric": "val_acc", "mode": "max"},
    "sampler": {"type": "tpe", "seed": 0},
    "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
    "budget": {"num_trials": 8, "max_concurrent_trials": 2, "max_failed_trials": 2},
    "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0},
}


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit code 1."""

    def __init__(self, *lines: str) -> None:
        super().__init__("\n".join(lines))
        self.lines = list(lines)


# -- HTTP -------------------------------------------------------------------------------------------


class Api:
    def __init__(self, url: str, timeout: float = 60.0, key: str | None = None) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def request(self, method: str, path: str, **kw: Any) -> Any:
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
        return r.json()


def error_lines(r: httpx.Response) -> list[str]:
    """``HTTP 422: budget.num_trials: Input should be ...``, one line per error item."""
    try:
        detail = r.json().get("detail")
    except ValueError:
        return [f"HTTP {r.status_code}: {r.text[:500]}"]
    if not isinstance(detail, list):
        return [f"HTTP {r.status_code}: {detail}"]
    out = []
    for d in detail:
        loc = ".".join(str(p) for p in d.get("loc", []) if p != "body")
        out.append(f"HTTP {r.status_code}: {loc + ': ' if loc else ''}{d.get('msg', '')}")
    return out or [f"HTTP {r.status_code}"]


def api_url(args: argparse.Namespace) -> str:
    if args.api:
        return args.api
    if os.environ.get("BONN_SWEEP_API_URL"):
        return os.environ["BONN_SWEEP_API_URL"]
    from service.launch.local import Stack

    stack = Stack.load(home_of(args))
    if stack is not None and stack.api_url:
        return stack.api_url
    from service.core.settings import Settings

    return Settings().api_url or "http://127.0.0.1:8000"


def is_loopback_url(url: str) -> bool:
    import ipaddress
    from urllib.parse import urlsplit

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
    url = url or api_url(args)
    return Api(url, key=api_key(args, url))


def home_of(args: argparse.Namespace) -> Path:
    return Path(args.home or os.environ.get("BONN_SWEEP_HOME") or ".bonn-sweep").expanduser().absolute()


# -- stack commands ---------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from service.launch.local import StackError, start_stack

    t0 = time.monotonic()
    try:
        stack = start_stack(
            home_of(args), num_cpus=args.num_cpus, prefer_default_ports=True, log=lambda m: console.print(f"[dim]{m}[/dim]")
        )
    except StackError as exc:
        raise CliError(f"bonn-sweep up failed: {exc}") from None
    console.print(f"[green]up[/green] in {time.monotonic() - t0:.1f}s (home {stack.home})")
    print_urls(stack)
    return 0


def print_urls(stack: Any) -> None:
    t = Table(show_header=False, box=None)
    t.add_row("API", f"{stack.api_url}  (docs: {stack.api_url}/docs)")
    t.add_row("MLflow", stack.mlflow_uri)
    t.add_row("Ray dashboard", stack.ray_dashboard_url)
    t.add_row("Ray address", stack.ray_address)
    t.add_row("API key", f"{Path(stack.home) / 'api-key'}  (the CLI sends it; others: Authorization: Bearer <key>)")
    t.add_row("logs", str(Path(stack.home) / "logs"))
    console.print(t)


def cmd_down(args: argparse.Namespace) -> int:
    from service.launch.local import stop_stack

    stopped = stop_stack(home_of(args), quiet=True, log=lambda m: console.print(f"[dim]{m}[/dim]"))
    console.print("stopped: " + ", ".join(stopped) if stopped else f"nothing was running (home {home_of(args)})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from service.launch.local import Stack

    stack = Stack.load(home_of(args))
    if stack is None:
        console.print(f"no stack recorded in {home_of(args)} (start one with `bonn-sweep up`)")
        return 1
    alive = stack.alive()
    for name, ok in alive.items():
        p = stack.procs[name]
        console.print(f"{name:7s} pid {p.pid:<8d} {'[green]running[/green]' if ok else '[red]not running[/red]'}")
    print_urls(stack)
    return 0 if all(alive.values()) else 1


# -- studies ----------------------------------------------------------------------------------------


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["epochs=4", "budget.num_trials=8"]`` -> nested dict; a bare key goes to ``base``; values are YAML
    (``1e-3`` is a number)."""
    from search_spaces.schema import SearchSpaceError, parse_yaml

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
    from search_spaces.schema import SearchSpaceError, parse_yaml

    if args.file and args.preset:
        raise CliError("give a study FILE or --preset NAME, not both")
    if args.file:
        path = Path(args.file)
        try:
            spec = parse_yaml(path.read_text(encoding="utf-8"), source=str(path))
        except OSError as exc:
            raise CliError(f"{path}: {exc.strerror}") from None
        except SearchSpaceError as exc:
            raise CliError(*_lines(exc)) from None
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
                raise CliError(*[f"search_space: {line}" for line in _lines(exc)]) from None
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


def _lines(exc: Exception) -> list[str]:
    lines = getattr(exc, "lines", None)
    lines = lines() if callable(lines) else lines
    return list(lines) if lines else [str(exc)]


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


# -- presentation -----------------------------------------------------------------------------------

STATUS_STYLE = {
    "PENDING": "yellow", "RUNNING": "cyan", "STOPPING": "magenta", "SUCCEEDED": "green", "FAILED": "red",
    "CANCELLED": "magenta", "INTERRUPTED": "red", "COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "WAITING": "dim",
}


def styled_status(s: str) -> str:
    return f"[{STATUS_STYLE.get(s, 'white')}]{s}[/]"


def fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return "" if v is None else str(v)


def print_study(study: dict[str, Any]) -> None:
    console.print(study_panel(study))


def study_panel(study: dict[str, Any], elapsed: float | None = None) -> Panel:
    t = Table(show_header=False, box=None)
    t.add_column(no_wrap=True, style="bold")
    t.add_column(overflow="fold")  # URLs wrap, never get cut
    t.add_row("study", f"{study['id']}  {study['name']}")
    t.add_row("status", styled_status(study["status"]) + (f"  ({elapsed:.0f}s)" if elapsed is not None else ""))
    c = study.get("trial_counts")
    if c:
        t.add_row(
            "trials",
            f"{c['complete']} done, {c['running']} running, {c['pruned']} pruned, {c['failed']} failed"
            f"  of {study['num_trials']}",
        )
    obj = study.get("objective") or {}
    best = study.get("best_trial")
    if best:
        params = ", ".join(f"{k}={fmt(v)}" for k, v in best["params"].items())
        t.add_row("best", f"#{best['number']} {obj.get('metric')}={fmt(best['value'])} (epoch {fmt(best.get('epoch'))})  {params}")
    links = study.get("links") or {}
    if links.get("mlflow_run"):
        t.add_row("MLflow", links["mlflow_run"])
    if links.get("ray_job"):
        t.add_row("Ray job", links["ray_job"])
    if study.get("error"):
        t.add_row("error", f"[red]{escape(study['error'][:800])}[/red]")
    return Panel(t, title="bonn-sweep", expand=False)


def trials_table(trials: list[dict[str, Any]], objective: dict[str, str]) -> Table:
    names: list[str] = []
    for tr in trials:
        names += [k for k in tr["params"] if k not in names]
    t = Table(title="trials")
    for col in ("#", "state", objective.get("metric", "value"), "epochs", *names, "stop"):
        t.add_column(col, no_wrap=True)
    for tr in trials:
        value = tr["value"] if tr["value"] is not None else tr.get("last_value")
        t.add_row(
            str(tr["number"]), styled_status(tr["state"]), fmt(value), fmt(tr.get("epochs_done")),
            *[fmt(tr["params"].get(n), 3) for n in names], (tr.get("stop_reason") or "").replace("early_stopped", "asha"),
        )
    return t


def watch(api: Api, study_id: str, interval: float = 1.0) -> int:
    t0 = time.monotonic()
    study: dict[str, Any] = {}
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        while True:
            study = api.request("GET", f"/studies/{study_id}")
            trials = api.request("GET", f"/studies/{study_id}/trials")["data"]
            parts: list[Any] = [study_panel(study, time.monotonic() - t0)]
            if trials:
                parts.append(trials_table(trials[-12:], study["objective"]))
            live.update(Group(*parts))
            if study["status"] in TERMINAL:
                break
            time.sleep(interval)
    return 0 if study.get("status") == "SUCCEEDED" else 1


# -- demo -------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from service.launch.local import Stack, StackError, start_stack

    home = home_of(args)
    url = args.api or os.environ.get("BONN_SWEEP_API_URL")
    stack = None
    if not url:
        existing = Stack.load(home)
        if existing is None or not all(existing.alive().values()):
            console.print(f"starting the embedded stack in {home} ...")
        try:
            stack = start_stack(home, prefer_default_ports=True, log=lambda m: console.print(f"[dim]{m}[/dim]"))
        except StackError as exc:
            raise CliError(f"bonn-sweep up failed: {exc}") from None
        url = stack.api_url
    api = client(args, url or "")
    spec = deep_merge(DEMO_STUDY, {"budget": {"num_trials": args.trials}})
    t0 = time.monotonic()
    study = api.request("POST", "/studies", json=spec)
    console.print(f"posted study {study['id']} in {time.monotonic() - t0:.2f}s: {args.trials} trials of BONN small_cnn on digits")
    rc = watch(api, study["id"])
    study = api.request("GET", f"/studies/{study['id']}")
    best = study.get("best_trial")
    console.print()
    if best:
        console.print(
            f"[bold green]best trial[/bold green] #{best['number']}: {study['objective']['metric']}={fmt(best['value'])} "
            f"at epoch {fmt(best.get('epoch'))} with "
            + ", ".join(f"{k}={fmt(v)}" for k, v in best["params"].items())
        )
        if best.get("checkpoint_uri"):
            console.print(f"checkpoint:    {best['checkpoint_uri']}", soft_wrap=True)
    console.print(f"MLflow:        {study['links'].get('mlflow_run')}", soft_wrap=True)
    console.print(f"Ray dashboard: {study['links'].get('ray_job')}", soft_wrap=True)
    console.print("stop everything with: [bold]bonn-sweep down[/bold]" + (f" --home {home}" if args.home else ""))
    return rc


# -- API keys ---------------------------------------------------------------------------------------


def _key_store(args: argparse.Namespace) -> Any:
    from service.core.settings import Settings
    from service.core.store import StudyStore

    settings = Settings(home=home_of(args))
    settings.ensure_dirs()
    store = StudyStore(settings.store_url or "")
    store.create_all()
    return store


def cmd_keys_create(args: argparse.Namespace) -> int:
    from service.core.auth import hash_key, new_key

    store = _key_store(args)
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
    store = _key_store(args)
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
    store = _key_store(args)
    try:
        row = store.revoke_api_key(args.id)
    finally:
        store.close()
    if row is None:
        raise CliError(f"no API key with id {args.id!r} (see `bonn-sweep keys list`)")
    console.print(f"revoked {row.id} (the API stops accepting it within a few seconds: BONN_SWEEP_API_KEY_CACHE_S)")
    return 0


# -- parser -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bonn-sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--api", help="API URL (default: BONN_SWEEP_API_URL, the local stack, http://127.0.0.1:8000)")
    p.add_argument("--home", help="state folder of the embedded stack (default: BONN_SWEEP_HOME or ./.bonn-sweep)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start Ray head, MLflow server and the API on 127.0.0.1")
    up.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    up.set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop what `up` started (by pid)").set_defaults(fn=cmd_down)
    sub.add_parser("status", help="processes and URLs of the local stack").set_defaults(fn=cmd_status)

    demo = sub.add_parser("demo", help="up if needed, run a small digits study, show its progress")
    demo.add_argument("--trials", type=int, default=8)
    demo.set_defaults(fn=cmd_demo)

    st = sub.add_parser("studies", help="create / list / show / watch / cancel / resume studies")
    ss = st.add_subparsers(dest="studies_cmd", required=True, metavar="ACTION")
    c = ss.add_parser("create", help="POST a study from a YAML/JSON file or a preset")
    c.add_argument("file", nargs="?", help="study spec (YAML or JSON)")
    c.add_argument("--preset", help="search-space preset (name defaults to it)")
    c.add_argument("--name")
    c.add_argument("--trials", type=int, help="budget.num_trials")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. epochs=4 (base), budget.max_concurrent_trials=2")
    c.add_argument("--idempotency-key")
    c.add_argument("--watch", action="store_true", help="follow the study until it ends")
    c.set_defaults(fn=cmd_create)
    ls = ss.add_parser("list")
    ls.add_argument("--status")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--offset", type=int, default=0)
    ls.set_defaults(fn=cmd_list)
    for name, fn, helptext in (
        ("show", cmd_show, "status, best trial and trials"),
        ("watch", cmd_watch, "live progress until the study ends"),
        ("cancel", cmd_cancel, "stop the study (Tune saves its state)"),
    ):
        x = ss.add_parser(name, help=helptext)
        x.add_argument("id")
        x.set_defaults(fn=fn)
    r = ss.add_parser("resume", help="continue a CANCELLED, FAILED or INTERRUPTED study")
    r.add_argument("id")
    r.add_argument("--trials", type=int, help="new total number of trials")
    r.add_argument("--watch", action="store_true")
    r.set_defaults(fn=cmd_resume)

    k = sub.add_parser("keys", help="API keys: create / list / revoke (in the study store, hashed)")
    ks = k.add_subparsers(dest="keys_cmd", required=True, metavar="ACTION")
    kc = ks.add_parser("create", help="print a new key (once); only its hash is stored")
    kc.add_argument("--name", help="who or what uses it")
    kc.set_defaults(fn=cmd_keys_create)
    ks.add_parser("list", help="ids, names, created / revoked").set_defaults(fn=cmd_keys_list)
    kr = ks.add_parser("revoke", help="stop accepting a key")
    kr.add_argument("id")
    kr.set_defaults(fn=cmd_keys_revoke)

    sp = sub.add_parser("spaces", help="search spaces: list, show, validate (see `bonn-sweep spaces --help`)", add_help=False)
    sp.add_argument("rest", nargs=argparse.REMAINDER)
    sp.set_defaults(fn=None)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    i = _command_index(argv)
    if i is not None and argv[i] == "spaces":
        # everything after `spaces` (its own --help included) goes to search_spaces.cli
        from search_spaces.cli import main as spaces_main

        return spaces_main(argv[i + 1 :])
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except CliError as exc:
        for line in exc.lines:
            err_console.print(f"[red]error:[/red] {escape(line)}", highlight=False)
        return 1
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as exc:  # a bug: one line, the traceback only on request
        if os.environ.get("BONN_SWEEP_DEBUG"):
            raise
        err_console.print(f"[red]error:[/red] {escape(f'{type(exc).__name__}: {exc}')} (BONN_SWEEP_DEBUG=1 shows the traceback)")
        return 1


def _command_index(argv: list[str]) -> int | None:
    """Index of the first positional argument (the command), skipping ``--api URL`` / ``--home DIR``."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--api", "--home"):
            i += 2
        elif a.startswith("-"):
            i += 1
        else:
            return i
    return None


if __name__ == "__main__":
    sys.exit(main())
