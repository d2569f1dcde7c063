"""What the CLI prints (rich): the consoles, a study's panel, the trials table, the stack's URLs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from service.launch.stack_record import Stack

console = Console(soft_wrap=False)
err_console = Console(stderr=True, soft_wrap=True)

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


def say_dim(message: str) -> None:
    """A progress line of the stack (``up``, ``down``, ``demo``)."""
    console.print(f"[dim]{message}[/dim]")


def print_urls(stack: Stack) -> None:
    """Where the servers of the stack answer, its API key file and its logs."""
    t = Table(show_header=False, box=None)
    t.add_row("API", f"{stack.api_url}  (docs: {stack.api_url}/docs)")
    t.add_row("MLflow", stack.mlflow_uri)
    t.add_row("Ray dashboard", stack.ray_dashboard_url)
    t.add_row("Ray address", stack.ray_address)
    t.add_row("databases", stack.db_display)
    t.add_row("GPUs", f"{stack.num_gpus}" + (f", MPS (pipe dir {stack.mps_dirs[0]})" if stack.mps_dirs
                                             else (", time-sliced when shared (no --mps)" if stack.num_gpus else "")))
    if stack.optuna_dashboard_url and "optuna_dashboard" in stack.procs:
        t.add_row("Optuna dashboard", stack.optuna_dashboard_url)
    t.add_row("API key", f"{Path(stack.home) / 'api-key'}  (the CLI sends it; others: Authorization: Bearer <key>)")
    t.add_row("logs", str(Path(stack.home) / "logs"))
    console.print(t)


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


def _pm(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return ""
    std = stat.get("std")
    return f"{stat['mean']:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def confirmation_table(study: dict[str, Any]) -> Table | None:
    """The confirmation stage: per configuration its seeds' val/test accuracy, mean ± std, and the
    difference best - reference with its 95% interval (the caption). None without a confirmation."""
    conf = study.get("confirmation")
    if not conf:
        return None
    t = Table(title=f"confirmation over seeds {conf['seeds']} ({conf['runs_done']}/{conf['runs_total']} runs, "
                    f"{conf.get('epochs')} epochs)")
    for col in ("configuration", "role", "search value", "val_acc per seed", "val_acc", "test_acc per seed",
                "test_acc"):
        t.add_column(col, no_wrap=col in ("configuration", "val_acc", "test_acc"))  # per-seed lists may wrap
    for c in conf["configurations"]:
        label = c["label"] + (" [bold green]*best*[/]" if c["label"] == conf.get("best") else "")
        t.add_row(label, c["role"], fmt(c.get("search_value")),
                  " ".join(fmt(r.get("val_acc")) for r in c["runs"]), _pm(c.get("val_acc")),
                  " ".join(fmt(r.get("test_acc")) for r in c["runs"]), _pm(c.get("test_acc")))
    d = conf.get("difference")
    if d and d.get("diff") is not None:
        ci = (f"95% interval [{d['low']:+.4f}, {d['high']:+.4f}]" if d.get("low") is not None
              else "no interval (fewer than 2 runs a side)")
        t.caption = f"best - reference, test_acc: {d['diff']:+.4f}, {ci}; {d['method']}"
    return t
