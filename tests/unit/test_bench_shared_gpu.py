"""benchmarks/bench_shared_gpu.py and bench_shared_gpu_service.py on the CPU: the rows, the JSON, the
MPS rows through the stand-in driver programs (tests/fakes), a daemon that cannot start as a one-line
row, and the service benchmark's arithmetic on made-up trials. The GPU figures come from
benchmarks/gpu_fill.sh on a lent machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAKES = REPO / "tests" / "fakes"
sys.path.insert(0, str(REPO))

from benchmarks.bench_shared_gpu import best_rows, table  # noqa: E402
from benchmarks.bench_shared_gpu_service import summarize  # noqa: E402


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA_MPS_", "FAKE_"))}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(PATH=f"{FAKES}{os.pathsep}{env['PATH']}", FAKE_GPUS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


def _bench(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "shared.json"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_shared_gpu.py"), "--device", "cpu",
                        "--model", "small_cnn", "--batch-size", "16", "--seconds", "0.5", "--warmup", "2",
                        "--workdir", str(tmp_path / "wd"), "--out", str(out), *args],
                       capture_output=True, text=True, timeout=240, env=_env(**env), cwd=tmp_path)
    return p, json.loads(out.read_text())


@pytest.mark.slow
def test_cpu_rows_timeslice_and_mps(tmp_path):
    p, doc = _bench(tmp_path, "--procs", "1,2", "--sharing", "timeslice,mps")
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [(r["sharing"], r["procs"]) for r in doc["rows"]]
    assert rows == [("timeslice", 1), ("mps", 1), ("timeslice", 2), ("mps", 2)]  # N by N
    for r in doc["rows"]:
        assert r["aggregate"] > 0 and len(r["per_proc"]) == r["procs"] and all(v > 0 for v in r["per_proc"])
        assert r["finite"]
    assert doc["best"]["overall"]["procs"] in (1, 2)
    assert "| mps | 2 |" in p.stdout and "best N with mps" in p.stdout
    assert not (tmp_path / "wd" / "mps" / "pipe" / "control").exists()  # the daemon was quit


def test_mps_that_cannot_start_is_a_row(tmp_path):
    p, doc = _bench(tmp_path, "--procs", "1", "--sharing", "mps", FAKE_MPS_FAIL="no GPU for the MPS server")
    assert p.returncode == 1  # nothing was measured
    (row,) = doc["rows"]
    assert row["sharing"] == "mps" and row.get("aggregate") is None
    assert "no GPU for the MPS server" in row["error"] and "\n" not in row["error"]
    assert "not measured: MPS:" in p.stdout


def test_table_and_best():
    meta = {"device_name": "card", "torch": "t", "model": "wrn22", "width": 16, "binarize": "bonn",
            "batch_size": 128, "data": "real", "seconds": 5, "step": "graph", "device": "cuda"}
    rows = [{"sharing": s, "procs": n, "aggregate": a, "per_proc_mean": a / n, "warmup_s_max": 1.0, "graph": True,
             "max_allocated_mib_per_proc": 900.0, "max_reserved_mib_per_proc": 1000.0}
            for s, n, a in (("timeslice", 1, 40e3), ("timeslice", 4, 44e3), ("mps", 1, 39e3), ("mps", 4, 80e3))]
    rows.append({"sharing": "mps", "procs": 8, "error": "1 of 8 processes failed (exit codes [1])"})
    best = best_rows(rows)
    assert best["timeslice"]["procs"] == 4 and best["overall"] == {"sharing": "mps", "procs": 4, "aggregate": 80e3}
    md = table(meta, rows)
    assert "| mps | 4 | 80000 | 20000 | 2.05x | 900 / 1000 |" in md
    assert "| mps | 8 | not measured: 1 of 8" in md


def test_service_summary_arithmetic():
    t = [{"number": i, "state": "COMPLETE", "start": 100.0 + i, "end": 130.0 + i, "error": None,
          "images_per_s": [5000.0, 20000.0, 22000.0, 21000.0], "result_ts": [110.0 + i, 115.0, 120.0, 125.0 + i]}
         for i in range(2)]
    row = summarize("mps", 2, t, wall_s=60.0, status="SUCCEEDED", imgs=45000, epochs=4)
    assert row["steady_per_trial"] == [21000.0, 21000.0] and row["steady"] == 42000.0
    assert row["overlap"] == pytest.approx((125.0 - 111.0) / (126.0 - 110.0))
    assert row["span"] == pytest.approx(2 * 4 * 45000 / 31.0) and row["wall"] == pytest.approx(2 * 4 * 45000 / 60.0)
    assert "error" not in row
    short = summarize("mps", 3, t, wall_s=60.0, status="FAILED", imgs=45000, epochs=4)
    assert short["error"].startswith("FAILED: 2 of 3 trials")
