"""``bonn-sweep up | down | status | demo``: the embedded stack (service/launch/stack.py) from the
command line, and the demo study it runs."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from service.launch.api_client import client, home_of
from service.launch.cli_errors import CliError
from service.launch.display import console, fmt, print_urls, say_dim
from service.launch.gpu import env_flag
from service.launch.processes import StackError
from service.launch.stack import start_stack, stop_stack
from service.launch.stack_record import Stack
from service.launch.study_commands import deep_merge, watch

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


def want_mps(flag: bool | None) -> bool:
    """``--mps``, else ``BONN_SWEEP_MPS`` (1/true/yes/on); anything else there is a :class:`CliError`."""
    if flag is not None:
        return bool(flag)
    try:
        return env_flag("BONN_SWEEP_MPS")
    except ValueError as exc:
        raise CliError(str(exc)) from None


def cmd_up(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    try:
        stack = start_stack(home_of(args), num_cpus=args.num_cpus, prefer_default_ports=True, log=say_dim,
                            db_url=getattr(args, "db", None) or os.environ.get("BONN_SWEEP_DB_URL") or None,
                            num_gpus=getattr(args, "gpus", None), mps=want_mps(getattr(args, "mps", None)))
    except StackError as exc:
        raise CliError(f"bonn-sweep up failed: {exc}") from None
    console.print(f"[green]up[/green] in {time.monotonic() - t0:.1f}s (home {stack.home})")
    print_urls(stack)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stopped = stop_stack(home_of(args), quiet=True, log=say_dim)
    console.print("stopped: " + ", ".join(stopped) if stopped else f"nothing was running (home {home_of(args)})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
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


def cmd_demo(args: argparse.Namespace) -> int:
    """``up`` unless ``--api`` / ``BONN_SWEEP_API_URL`` names an API, then a digits study, watched live,
    and its best trial."""
    home = home_of(args)
    url = args.api or os.environ.get("BONN_SWEEP_API_URL")
    if not url:
        existing = Stack.load(home)
        if existing is None or not all(existing.alive().values()):
            console.print(f"starting the embedded stack in {home} ...")
        try:
            stack = start_stack(home, prefer_default_ports=True, log=say_dim,
                                db_url=os.environ.get("BONN_SWEEP_DB_URL") or None, mps=want_mps(None))
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
    if study["links"].get("optuna_dashboard"):
        console.print(f"Optuna dashboard: {study['links']['optuna_dashboard']}", soft_wrap=True)
    console.print("stop everything with: [bold]bonn-sweep down[/bold]" + (f" --home {home}" if args.home else ""))
    return rc
