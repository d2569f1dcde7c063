"""``bonn-sweep studies report ID [--out DIR]``: the study report from the API (``GET
/studies/{id}/report``), written as ``report-<id>.html`` (one self-contained page: plots, tables,
links; opens offline) and ``report-<id>.json`` (the same data)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from service.launch.api_client import client
from service.launch.cli_errors import CliError
from service.launch.display import console


def cmd_report(args: argparse.Namespace) -> int:
    out = Path(args.out or ".").expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    api = client(args)
    data = api.request("GET", f"/studies/{args.id}/report")
    page = api.response("GET", f"/studies/{args.id}/report", params={"format": "html"}).text
    html_path, json_path = out / f"report-{args.id}.html", out / f"report-{args.id}.json"
    try:
        html_path.write_text(page, encoding="utf-8")
        json_path.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot write the report into {out}: {exc.strerror or exc}") from None
    best = data.get("best_trial") or {}
    console.print(f"study {args.id} ({data['study'].get('status')}): {len(data.get('trials') or [])} trials"
                  + (f", best #{best.get('number')} {data['objective'].get('metric')}={best.get('value')}" if best else ""))
    console.print(f"report: {html_path}\ndata:   {json_path}", soft_wrap=True)
    return 0
