"""What the GPU session (tools/gpu_session.py) makes of its steps: the junit files of its pytest runs, the results
files of its benchmarks and the logs of compute-sanitizer, gathered into one results file in benchmarks/results/'s
format (``<device>-session-<date>.json``), a summary, a log of the failures and an archive of everything.

Each reader gives what it can of a step that was cut or failed, and says so rather than raise: the report is written
whatever happened before it.
"""
import datetime
import json
import re
import tarfile
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

# At most 8 files of 16 MiB each come back from $OUT: the archive leaves out any file over this, which would keep it
# from coming back (session.log lists them).
ARCHIVE_FILE_LIMIT = 6 * 2 ** 20
ENVIRONMENT_KEYS = ("device", "torch", "triton", "cuda", "date")


@dataclass
class Outcome:
    """How a step ended (``status``: ok, failed, timeout or skipped) and where its files are: its log, and the
    folder its junit and benchmark results files go to."""
    name: str
    kind: str
    status: str
    seconds: float
    budget: float
    returncode: Optional[int] = None
    note: str = ""
    log: Optional[Path] = None
    folder: Optional[Path] = None


def _text(path: Optional[Path]) -> str:
    return path.read_text(errors="replace") if path and path.exists() else ""


def pytest_counts(outcome: Outcome) -> dict:
    """Passed, failed, errors and skipped of a pytest step, per test function too, and the failing tests: from its
    junit file, or from pytest's last line where a cut run wrote none."""
    counts = {"status": outcome.status}
    junit = outcome.folder / "junit.xml" if outcome.folder else None
    try:
        root = ElementTree.parse(junit).getroot()
    except (OSError, TypeError, ElementTree.ParseError):
        counts.update({word: int(number) for number, word in
                       re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", _text(outcome.log))})
        return counts
    by_test: Dict[str, Dict[str, int]] = {}
    failed = []
    for case in root.iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name', '').split('[')[0]}"
        result = ("failed" if case.find("failure") is not None or case.find("error") is not None
                  else "skipped" if case.find("skipped") is not None else "passed")
        by_test.setdefault(test, {"passed": 0, "failed": 0, "skipped": 0})[result] += 1
        if result == "failed":
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    for result in ("passed", "failed", "skipped"):
        counts[result] = sum(test[result] for test in by_test.values())
    counts.update(by_test=by_test, failed_tests=failed)
    return counts


def sanitizer_errors(outcome: Outcome) -> dict:
    """compute-sanitizer's error count (None where it did not run or print one) beside the tests it ran."""
    found = re.findall(r"ERROR SUMMARY: (\d+) error", _text(outcome.log))
    return {"status": outcome.status, "errors": int(found[-1]) if found else None, "note": outcome.note,
            "tests": pytest_counts(outcome)}


def benchmark_files(outcome: Outcome) -> List[dict]:
    """The results files a benchmark step wrote (benchmarks/test_gpu_lstm.py: one per fused backend)."""
    files = sorted(outcome.folder.glob("*.json")) if outcome.folder and outcome.folder.exists() else []
    records = []
    for path in files:
        try:
            records.append(json.loads(path.read_text()))
        except ValueError as error:
            records.append({"unreadable": f"{path.name}: {error}"})
    return records


def speed_rows(step: str, record: dict) -> List[dict]:
    """One row per case of a benchmark results file: the fused backend and cuDNN, their medians and the speedup."""
    settings = record.get("settings", {})
    medians = {}
    for result in record.get("results", []):
        case = tuple(result[key] for key in ("batch", "bidirectional", "precision", "pass"))
        medians.setdefault(case, {})[result["implementation"]] = result
    rows = []
    for case, by_implementation in medians.items():
        cudnn = by_implementation.pop("cudnn", None)
        for backend, ours in by_implementation.items():
            if cudnn is None:
                continue
            rows.append({"step": step, "backend": backend,
                         "variant": settings.get("RNN_FAST_CUDA_VARIANTS") or "baseline",
                         "triton_tile": settings.get("RNN_FAST_TRITON_TILE") or "autotuned",
                         **dict(zip(("batch", "bidirectional", "precision", "pass"), case)),
                         "cudnn": _timing(cudnn), "ours": _timing(ours),
                         "speedup_vs_cudnn": cudnn["median_ms"] / ours["median_ms"]})
    return rows


def _timing(result: dict) -> dict:
    return {key: result[key] for key in ("median_ms", "p20_ms", "p80_ms", "rounds")}


def results_record(outcomes: List[Outcome], environment: dict, command: str, dry_run: bool,
                   triton_tile: str) -> dict:
    """The benchmarks/results/ record: environment first (device, versions, date, command), then the findings."""
    tests = {o.name: pytest_counts(o) for o in outcomes if o.kind == "tests"}
    benchmarks, tiles, unreadable = [], {}, []
    for outcome in (o for o in outcomes if o.kind == "bench"):
        for record in benchmark_files(outcome):
            if "unreadable" in record:
                unreadable.append(record["unreadable"])
                continue
            benchmarks += speed_rows(outcome.name, record)
            if "triton_tiles" in record:
                tiles[outcome.name] = {"chosen": record["triton_tiles"], "timings": record["triton_tile_timings"]}
    return {**{key: environment.get(key) for key in ENVIRONMENT_KEYS}, "command": command,
            "environment": environment, "dry_run": dry_run, "triton_tile_pin": triton_tile,
            "steps": [{"name": o.name, "status": o.status, "seconds": round(o.seconds, 1), "budget": o.budget,
                       "returncode": o.returncode, "note": o.note} for o in outcomes],
            "tests": tests, "benchmarks": benchmarks, "unreadable_results": unreadable, "triton_tiles": tiles,
            "sanitizers": {o.name: sanitizer_errors(o) for o in outcomes if o.kind == "sanitizer"}}


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_summary(results: dict) -> str:
    lines = [f"# rnn_fast GPU session{' (DRY RUN on the CPU: no GPU figure here)' if results['dry_run'] else ''}",
             "", f"device {results['device']}, torch {results['torch']}, triton {results['triton']}, "
             f"CUDA {results['cuda']}, {results['date']}; Triton tile pinned to {results['triton_tile_pin']} "
             "but in bench-triton-autotuned", f"command: `{results['command']}`", "", "## Steps", "",
             "| step | status | seconds | budget | note |", "|---|---|---:|---:|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['budget']:.0f} | {s['note']} |"
              for s in results["steps"]]
    lines += ["", "## Correctness (pytest: against the naive reference and nn.LSTM / cuDNN)", "",
              "| tests | status | passed | failed | skipped |", "|---|---|---:|---:|---:|"]
    for name, counts in results["tests"].items():
        lines.append(f"| {name} | {counts['status']} | {counts.get('passed', '-')} | {counts.get('failed', '-')} | "
                     f"{counts.get('skipped', '-')} |")
    lines += [f"- FAILED in {name}: {test}" for name, counts in results["tests"].items()
              for test in counts.get("failed_tests", [])[:20]]
    lines += ["", "## Speed against cuDNN (same process, medians)", "",
              "| backend | kernels | model | B | precision | pass | cuDNN ms | ours ms [p20, p80] | speedup |",
              "|---|---|---|---:|---|---|---:|---:|---:|"]
    for r in results["benchmarks"]:
        ours = r["ours"]
        kernels = f"tile {r['triton_tile']}" if r["backend"] == "triton" else r["variant"]
        lines.append(f"| {r['backend']} | {kernels} | "
                     f"{'BLSTM' if r['bidirectional'] else 'LSTM'} | {r['batch']} | {r['precision']} | {r['pass']} | "
                     f"{_fmt(r['cudnn']['median_ms'])} | {_fmt(ours['median_ms'])} [{_fmt(ours['p20_ms'])}, "
                     f"{_fmt(ours['p80_ms'])}] | **{r['speedup_vs_cudnn']:.2f}x** |")
    lines += [f"- unreadable results file: {name}" for name in results["unreadable_results"]]
    lines += ["", "## Triton tiles", ""]
    for step, tiles in results["triton_tiles"].items():
        lines.append(f"- {step}: {json.dumps(tiles['chosen'])}")
        lines += [f"  - tuned at {t['case']}, {t['kernel']}: "
                  + ", ".join(f"{tile} {_fmt(ms, 3)} ms" for tile, ms in t["ms_by_tile"].items())
                  for t in tiles["timings"]]
    lines += ["", "## compute-sanitizer", "", "| run | status | errors | tests passed | note |",
              "|---|---|---:|---:|---|"]
    lines += [f"| {name} | {s['status']} | {'-' if s['errors'] is None else s['errors']} | "
              f"{s['tests'].get('passed', '-')} | {s['note']} |" for name, s in results["sanitizers"].items()]
    lines += ["", "Logs of every step: session-archive.tar.gz (logs/, and each step's junit and results files); "
              "this summary, the results file, session.log and failures.log beside it.", ""]
    return "\n".join(lines)


def write_report(outcomes: List[Outcome], work: Path, out: Path, command: str, dry_run: bool,
                 triton_tile: str) -> Tuple[str, List[str]]:
    """Writes the results file, summary.md and failures.log to ``out``; returns the summary and the names."""
    try:
        environment = json.loads((work / "environment.json").read_text())
    except (OSError, ValueError) as error:
        environment = {"unreadable": str(error)}
    results = results_record(outcomes, environment, command, dry_run, triton_tile)
    summary = render_summary(results)
    # The env step names the file (rnn_fast.testing.results_file_name); without it, the device is unknown.
    results_name = environment.get("results_file") or f"unknown-session-{datetime.date.today().isoformat()}.json"
    (out / results_name).write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "summary.md").write_text(summary)
    failures = [f"===== {o.name}: {o.status} (rc {o.returncode})\n{_text(o.log)[-6000:]}\n" for o in outcomes
                if o.status in ("failed", "timeout")]
    (out / "failures.log").write_text("".join(failures) or "no step failed\n")
    return summary, [results_name, "summary.md", "failures.log"]


def archive_contents(work: Path) -> Tuple[List[Path], List[Path]]:
    """The work folder's files for the archive, and those left out for their size (the Triton cache stays out)."""
    files = [path for path in sorted(work.rglob("*"))
             if path.is_file() and "triton-cache" not in path.relative_to(work).parts]
    return ([path for path in files if path.stat().st_size <= ARCHIVE_FILE_LIMIT],
            [path for path in files if path.stat().st_size > ARCHIVE_FILE_LIMIT])


def pack_archive(work: Path, files: List[Path], path: Path) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for file in files:
            archive.add(file, arcname=str(file.relative_to(work)))
