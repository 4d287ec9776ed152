"""The GPU session (tools/gpu_session.sh) in its dry run on the CPU: the whole flow at a tiny shape, its files in
``$OUT`` (at most 8), the results JSON in benchmarks/results/'s format, the summary, and the deadline that cuts and
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
sys.path.insert(0, str(ROOT / "tools"))
from gpu_session import OUT_FILES  # noqa: E402

STEPS = ["env", "build", "triton-smoke", "triton-pytest", "baseline", "variant-cluster_mbarrier", "cuda-pytest",
         "sanitize-memcheck-cuda", "sanitize-memcheck-triton", "ncu", "triton-sweep"]


def run_session(out: Path, work: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SESSION), "--dry-run", "--out", str(out), "--work", str(work),
                           "--variants", "cluster_mbarrier", *extra], env=env, capture_output=True, text=True,
                          timeout=900)


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
    assert set(names) == set(OUT_FILES) | {path.name for path in out.glob("*-session-*.json")}
    with tarfile.open(out / "session-archive.tar.gz") as archive:
        logged = {Path(name).stem for name in archive.getnames() if name.startswith("logs/")}
    assert set(STEPS) <= logged


def test_results_json_is_a_results_record(dry_run):
    _result, out = dry_run
    results = _results(out)
    for key in ("device", "torch", "triton", "cuda", "date", "command"):
        assert key in results
    assert results["dry_run"] is True and "--dry-run" in results["command"]
    smoke = {(r["backend"], r["variant"], r["case"], r["precision"]): r for r in results["smoke"]}
    # Both backends (cpu standing in for cuda) and the variant are checked on every case in IEEE fp32.
    for backend, variant in (("triton", "baseline"), ("cuda", "baseline"), ("cuda", "cluster_mbarrier")):
        for case in ("L2-uni", "L2-bi", "L2-bi-packed"):
            record = smoke[(backend, variant, case, "fp32")]
            assert record["ok"] and record["worst_error"] < 1e-5, record
    assert smoke[("triton", "baseline", "inference-op", "fp32")]["ok"]
    timed = {(r["backend"], r["variant"], r["pass"]) for r in results["benchmarks"] if r["kind"] == "stack"}
    assert {("triton", "baseline", "forward+backward"), ("cuda", "cluster_mbarrier", "backward")} <= timed
    assert [v["variant"] for v in results["variants"]] == ["baseline", "cluster_mbarrier"]
    assert results["triton_tiles"]["forward"] == {"every key": "16x8"}


def test_summary_has_every_section(dry_run):
    result, out = dry_run
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary
    for section in ("## Steps", "## Correctness (batch", "## Speed against cuDNN", "## Recurrence ops alone",
                    "## CUDA kernel variants", "## Triton tiles", "## compute-sanitizer", "## pytest", "## ncu"):
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
    assert "triton-sweep" in skipped and "baseline" in skipped
    assert all(steps[name]["note"] for name in skipped)
    assert (tmp_path / "out" / "summary.md").exists() and (tmp_path / "out" / "session-archive.tar.gz").exists()
