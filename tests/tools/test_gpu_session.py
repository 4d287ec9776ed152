"""The GPU session (tools/gpu_session.sh) in its dry run on the CPU: the whole flow at a tiny size, its files in
``$OUT`` (at most 8), the results file in benchmarks/results/'s format, the summary, and the deadline that cuts and
skips steps. One variant stands for all of them, to keep this short."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SESSION = ROOT / "tools" / "gpu_session.sh"
VARIANT = "cluster_mbarrier"
STEPS = ["env", "build", "triton-tests", "bench", f"bench-{VARIANT}", "cuda-tests", f"cuda-tests-{VARIANT}",
         "sanitize-memcheck-cuda", "sanitize-memcheck-triton", "bench-triton-autotuned"]
# What $OUT holds besides the results file.
OUT_FILES = {"summary.md", "session.log", "failures.log", "session-archive.tar.gz"}


def run_session(out: Path, work: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SESSION), "--dry-run", "--out", str(out), "--work", str(work),
                           "--variants", VARIANT, *extra], env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    return run_session(out, work), out


def _results(out: Path) -> dict:
    (path,) = out.glob("*-session-*.json")
    return json.loads(path.read_text())


def test_every_step_runs_and_passes(dry_run):
    result, out = dry_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    steps = {step["name"]: step for step in _results(out)["steps"]}
    assert set(steps) == set(STEPS)
    assert all(step["status"] == "ok" for step in steps.values()), steps


def test_out_holds_at_most_eight_plain_files(dry_run):
    _result, out = dry_run
    names = sorted(path.name for path in out.iterdir())
    assert all(path.is_file() for path in out.iterdir()) and len(names) <= 8
    assert set(names) == OUT_FILES | {path.name for path in out.glob("*-session-*.json")}
    with tarfile.open(out / "session-archive.tar.gz") as archive:
        archived = archive.getnames()
    assert set(STEPS) <= {Path(name).stem for name in archived if name.startswith("logs/")}
    assert "triton-tests/junit.xml" in archived and any(name.startswith("bench/") for name in archived)


def test_results_file_is_a_results_record(dry_run):
    _result, out = dry_run
    results = _results(out)
    for key in ("device", "torch", "triton", "cuda", "date", "command"):
        assert results[key] is not None or key == "cuda"
    assert results["dry_run"] is True and "--dry-run" in results["command"]
    assert results["device"] == results["environment"]["device"]
    # The tests ran and passed: Triton's op checks and the classifier's stack on the CPU, and the stack on the cpu
    # backend standing in for cuda (CUDA's op tests skip here).
    for step in ("triton-tests", "cuda-tests", f"cuda-tests-{VARIANT}"):
        counts = results["tests"][step]
        assert counts["passed"] > 0 and counts["failed"] == 0, (step, counts)
        assert any(name.endswith("::test_within_twice_nn_lstm_error") for name in counts["by_test"])
    assert results["sanitizers"]["sanitize-memcheck-triton"]["tests"]["passed"] > 0
    # Speed against nn.LSTM for triton and the cpu backend standing in for cuda, as LSTM and BLSTM, every pass,
    # under the variant too, and Triton autotuned.
    timed = {(r["step"], r["backend"], r["variant"], r["bidirectional"], r["pass"]) for r in results["benchmarks"]}
    for step, backend, variant in (("bench", "triton", "baseline"), ("bench", "cpu", "baseline"),
                                   (f"bench-{VARIANT}", "cpu", VARIANT), ("bench-triton-autotuned", "triton",
                                                                          "baseline")):
        for bidirectional in (False, True):
            for pass_name in ("forward", "backward", "forward+backward"):
                assert (step, backend, variant, bidirectional, pass_name) in timed
    assert all(r["speedup_vs_cudnn"] > 0 and r["batch"] == 4 for r in results["benchmarks"])
    assert results["triton_tiles"]["bench"]["chosen"]["forward"] == {"every key": "16x8"}


def test_summary_has_every_section(dry_run):
    result, out = dry_run
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary
    for section in ("## Steps", "## Correctness", "## Speed against cuDNN", "## Triton tiles",
                    "## compute-sanitizer"):
        assert section in summary
    for step in STEPS:
        assert f"| {step} |" in summary
    assert summary.strip() in result.stdout  # what the device tool's output tail shows


def test_deadline_cuts_and_skips_steps(tmp_path):
    """With 26 s in all (20 of them kept for the report), the first step gets 6 s and the others are skipped;
    the files are written all the same."""
    result = run_session(tmp_path / "out", tmp_path / "work", "--total-seconds", "26")
    assert result.returncode == 1
    steps = {step["name"]: step for step in _results(tmp_path / "out")["steps"]}
    assert steps["env"]["status"] in ("ok", "timeout")
    skipped = [name for name, step in steps.items() if step["status"] == "skipped"]
    assert "bench" in skipped and "sanitize-memcheck-triton" in skipped
    assert all(steps[name]["note"] for name in skipped)
    assert (tmp_path / "out" / "summary.md").exists() and (tmp_path / "out" / "session-archive.tar.gz").exists()
