"""``bonn-sweep spaces``: list, show, validate and preview search spaces.

    bonn-sweep spaces list                      # preset names and descriptions
    bonn-sweep spaces show NAME [--json]        # a preset's YAML (or a file's, normalised)
    bonn-sweep spaces validate FILE [FILE ...]  # exit 0 "OK: ..." / 1, one error per line on stderr
    bonn-sweep spaces sample NAME [-n 5] [--seed 0]   # trial configs a sweep would start with

``main(argv)`` returns the exit code and never prints a traceback for a bad space, a missing file
or a YAML syntax error. The service's CLI calls ``search_spaces.cli.main(argv)`` for
``bonn-sweep spaces ...``; :func:`add_spaces_commands` registers the same commands on an existing
argparse sub-parser set instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from search_spaces.loading import describe_presets, list_presets, load, preset_text
from search_spaces.errors import SearchSpaceError

__all__ = ["main", "build_parser", "add_spaces_commands", "run"]


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = parser.add_subparsers(dest="spaces_command", required=True, metavar="COMMAND")
    sub.add_parser("list", help="list the preset search spaces")
    show = sub.add_parser("show", help="print a preset's YAML (or a space file, normalised)")
    show.add_argument("name", metavar="NAME", help="preset name or path to a YAML/JSON file")
    show.add_argument("--json", action="store_true", help="print the validated space as JSON")
    validate = sub.add_parser("validate", help="validate search-space files (exit 1 on errors)")
    validate.add_argument("files", metavar="FILE", nargs="+", help="YAML/JSON file (or preset name)")
    sample = sub.add_parser("sample", help="print trial configs drawn from a space (JSON lines)")
    sample.add_argument("name", metavar="NAME", help="preset name or path to a YAML/JSON file")
    sample.add_argument("-n", type=int, default=5, help="number of configs (default 5)")
    sample.add_argument("--seed", type=int, default=0, help="RandomSampler seed (default 0)")
    sample.add_argument("--no-warm-start", action="store_true", help="do not start with the warm-start points")
    parser.set_defaults(func=run)
    return parser


def build_parser(prog: str = "bonn-sweep spaces") -> argparse.ArgumentParser:
    return _configure(argparse.ArgumentParser(prog=prog, description="Search spaces: list, show, validate, sample."))


def add_spaces_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``spaces`` to an argparse ``add_subparsers()`` object; dispatch with ``args.func(args)``."""
    return _configure(subparsers.add_parser("spaces", help="list, show, validate and sample search spaces"))


def _print_errors(exc: SearchSpaceError, source: str | None = None) -> None:
    for line in exc.lines:
        if source and not exc.source and not line.startswith(source):
            line = f"{source}: {line}"
        print(line, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Execute parsed ``spaces`` arguments; returns the exit code."""
    cmd = args.spaces_command
    try:
        if cmd == "list":
            presets = describe_presets()
            width = max(len(n) for n, _ in presets)
            for name, description in presets:
                print(f"{name:<{width}}  {description}")
            return 0
        if cmd == "show":
            if args.json:
                print(load(args.name).model_dump_json(indent=2))
            elif args.name in list_presets():
                print(preset_text(args.name), end="")
            else:
                print(load(args.name).to_yaml(), end="")
            return 0
        if cmd == "validate":
            status = 0
            for path in args.files:
                try:
                    space = load(path)
                except SearchSpaceError as exc:
                    _print_errors(exc, path)
                    status = 1
                    continue
                n_params = len(space.parameters)
                print(
                    f"OK: {path}: space {space.name!r}, {n_params} parameter{'s' * (n_params != 1)} "
                    f"({', '.join(space.names)}), {len(space.fixed)} fixed, "
                    f"{len(space.warm_start)} warm-start point{'s' * (len(space.warm_start) != 1)}"
                )
            return status
        if cmd == "sample":
            import optuna

            from search_spaces.optuna import sample_configs

            if args.n < 1:
                print("error: -n must be >= 1", file=sys.stderr)
                return 2
            space = load(args.name)
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            for config in sample_configs(space, args.n, seed=args.seed, warm_start=not args.no_warm_start):
                print(json.dumps(config))
            return 0
    except SearchSpaceError as exc:
        _print_errors(exc)
        return 1
    raise AssertionError(f"unhandled command {cmd!r}")  # pragma: no cover


def main(argv: list[str] | None = None) -> int:
    """``bonn-sweep spaces ARGV...``; returns the exit code (argparse usage errors: 2)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    return run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
