#!/usr/bin/env bash
# Time bench_train.py at two commits side by side, alternating runs so load changes hit both alike.
#   bash benchmarks/compare_commits.sh OLD NEW ROUNDS -- <bench_train.py arguments>
# e.g. the CPU step before and after the fused/graph work (issue 9):
#   bash benchmarks/compare_commits.sh bb192a4 HEAD 3 -- --model wrn22 --width 16 --device cpu \
#       --steps 10 --batch-size 64 --modes none,bonn
# Each commit is checked out in a temporary git worktree and run with this checkout's .venv.
set -euo pipefail
old="$1"; new="$2"; rounds="$3"; shift 4
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$root/.venv/bin/python"
tmp="$(mktemp -d)"
trap 'for c in a b; do git -C "$root" worktree remove --force "$tmp/$c" >/dev/null 2>&1 || true; done; rm -rf "$tmp"' EXIT
git -C "$root" worktree add -q --detach "$tmp/a" "$old"
git -C "$root" worktree add -q --detach "$tmp/b" "$new"
for r in $(seq 1 "$rounds"); do
  for c in a b; do
    label=$([ "$c" = a ] && echo "$old" || echo "$new")
    (cd "$tmp/$c" && "$py" benchmarks/bench_train.py "$@" 2>/dev/null) \
      | grep '^| random\|^| real' | sed "s/^/| $label | round $r /"
  done
done
