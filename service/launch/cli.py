"""``bonn-sweep``: the embedded stack (up / down / status / demo), studies over the HTTP API, spaces.

    bonn-sweep up                      # Ray head + MLflow server + API on 127.0.0.1, state in ./.bonn-sweep
    bonn-sweep demo                    # up if needed, POST a digits study, live progress, best trial
    bonn-sweep studies create study.yaml | --preset digits-smoke [--name N] [--trials 8] [--set epochs=4]
    bonn-sweep studies list | show ID | watch ID | cancel ID | resume ID [--trials N]
    bonn-sweep studies report ID [--out DIR]
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

from rich.markup import escape

from service.launch.cli_errors import CliError
from service.launch.display import err_console
from service.launch.key_commands import cmd_keys_create, cmd_keys_list, cmd_keys_revoke
from service.launch.report_commands import cmd_report
from service.launch.stack_commands import cmd_demo, cmd_down, cmd_status, cmd_up
from service.launch.study_commands import cmd_cancel, cmd_create, cmd_list, cmd_resume, cmd_show, cmd_watch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bonn-sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--api", help="API URL (default: BONN_SWEEP_API_URL, the local stack, http://127.0.0.1:8000)")
    p.add_argument("--home", help="state folder of the embedded stack (default: BONN_SWEEP_HOME or ./.bonn-sweep)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start Ray head, MLflow server and the API on 127.0.0.1")
    up.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    up.add_argument("--db", default=None, metavar="URL",
                    help="postgresql://user[:password]@host[:port][/prefix]: keep the study store, Optuna and "
                         "MLflow on that server (default: BONN_SWEEP_DB_URL, else SQLite in the home folder)")
    up.add_argument("--gpus", type=int, default=None, metavar="N",
                    help="GPUs the stack offers to trials (default: every GPU visible here)")
    up.add_argument("--mps", action="store_true", default=None,
                    help="run an NVIDIA MPS daemon of the stack's own, so trials sharing a GPU "
                         "(gpus_per_trial < 1) run concurrently instead of time-sliced (also BONN_SWEEP_MPS=1)")
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
    rep = ss.add_parser("report", help="the study report: one self-contained HTML page and its data as JSON")
    rep.add_argument("id")
    rep.add_argument("--out", help="folder for report-<id>.html and report-<id>.json (default: the current one)")
    rep.set_defaults(fn=cmd_report)
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
    i = command_index(argv)
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


def command_index(argv: list[str]) -> int | None:
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
