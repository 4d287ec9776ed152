#!/usr/bin/env bash
# The GPU session: one command for a lent GPU machine, from a fresh copy of the repository, no network.
#
#   OUT=/folder tools/gpu_session.sh               # builds (no pip), runs the GPU tests, benchmarks and sanitizers
#   tools/gpu_session.sh --dry-run --out /tmp/x    # the same flow on a CPU machine, at a tiny size
#
# Never runs .ci/run. At most 8 files land in $OUT (summary.md, the results file, session.log, failures.log and
# session-archive.tar.gz with every step's log, junit and benchmark results). Steps, budgets and options:
# tools/gpu_session.py --help and benchmarks/NOTES.md ("GPU session").
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" tools/gpu_session.py "$@"
