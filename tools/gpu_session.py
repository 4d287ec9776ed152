"""One command for a lent GPU machine (tools/gpu_session.sh): build, check, time and profile everything in at most
9 minutes, each step under its own ``timeout``, carrying on after a failure, and leave at most 8 files in ``$OUT``.

    OUT=/some/folder tools/gpu_session.sh            # on the GPU machine, from a fresh copy of the repository
    tools/gpu_session.sh --dry-run --out /tmp/x      # on a CPU machine: the same flow at a tiny shape

The machine has no network: the build uses what is installed (no pip), and ``.ci/run`` is never run. The steps,
in the order they are worth running (a step that would end past the deadline is cut; one that cannot start in
time is skipped and says so):

1. ``env``: nvidia-smi, nvcc, ncu, compute-sanitizer, python / torch / triton / cuDNN versions, device.
2. ``build`` (``RNN_FAST_CUDA_ARCHS=90 MAX_JOBS=16 python setup.py build_ext --inplace``), while the Triton lane,
   which needs no build, runs alongside: ``triton-smoke`` (correctness at the classifier's shape) and
   ``triton-pytest``.
3. ``baseline``: correctness of the CUDA backend, then every backend against cuDNN with CUDA events.
4. ``variant-<name>``: the same for each CUDA kernel variant (``RNN_FAST_CUDA_VARIANTS``), one process each;
   a variant is timed only in the precisions where its smoke check passed.
5. ``ncu``: one profile of every recurrence kernel at the classifier's shape.
6. ``triton-sweep``: the Triton autotuner over its candidate tiles (no pin), for the next session's pin.
7. ``cuda-pytest`` alongside ``compute-sanitizer`` memcheck / racecheck / synccheck on a tiny shape (six at a
   time: correctness only, so they may share the GPU, unlike the timed steps before them).

Every child writes its JSON as it goes, so a step cut by its timeout still reports what it finished.

The budget of each step and what it is based on is in benchmarks/NOTES.md ("GPU session").
"""
import argparse
import datetime
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ROOT / "tools" / "gpu_checks.py"
sys.path.insert(0, str(ROOT / "tools"))
from cuda_variants import VARIANT_ENV, kernel_variants  # noqa: E402  (no torch: the session outlives a broken one)

TOTAL_SECONDS = 540
# Kept for packing the archive and writing the summary after the last step.
RESERVE_SECONDS = 20
# The tile the session pins (RNN_FAST_TRITON_TILE), so that it compiles one tile per kernel instead of autotuning
# six: 16 rows fill most of the 132 SMs at B=768 (48 programs per direction), and 8 warps is where the 16-row
# tiles need least stack under Triton 3.6 (README's table).
DEFAULT_TILE = "16x8"
# Seconds each step may take (see benchmarks/NOTES.md for what they rest on).
BUDGETS = {"env": 30, "build": 200, "triton-smoke": 100, "triton-pytest": 100, "baseline": 110, "variant": 35,
           "cuda-pytest": 120, "sanitizer": 100, "ncu": 60, "triton-sweep": 90}
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")
NCU_KERNELS = "regex:lstm_(forward|backward)_kernel"
NCU_SECTIONS = ("SpeedOfLight", "LaunchStats", "Occupancy", "MemoryWorkloadAnalysis_Tables", "WarpStateStats")
# Files in $OUT (at most 8 come back, 16 MiB each): these four and the results JSON; everything else goes into the
# archive, but for files over ARCHIVE_FILE_LIMIT (an outsized ncu report or log would keep the archive from coming
# back), which are listed in session.log instead.
OUT_FILES = ("summary.md", "session.log", "failures.log", "session-archive.tar.gz")
ARCHIVE_FILE_LIMIT = 6 * 2 ** 20


@dataclass
class Step:
    name: str
    command: List[str]
    budget: float
    env: Dict[str, str] = field(default_factory=dict)
    note: str = ""
    json: Optional[Path] = None


@dataclass
class Outcome:
    name: str
    status: str  # ok, failed, timeout, skipped
    seconds: float
    budget: float
    returncode: Optional[int] = None
    note: str = ""
    log: Optional[Path] = None
    record: Optional[dict] = None


class Session:
    def __init__(self, args):
        self.args = args
        self.dry_run = args.dry_run
        self.start = time.monotonic()
        self.deadline = self.start + args.total_seconds - RESERVE_SECONDS
        self.work = Path(args.work or tempfile.mkdtemp(prefix="rnn_fast_gpu_session_"))
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.outcomes: List[Outcome] = []
        self.lock = threading.Lock()
        self.session_log = (self.logs / "session.log").open("w")
        self.python = sys.executable
        self.base_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
            [str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "TRITON_CACHE_DIR": str(self.work / "triton-cache"), "RNN_FAST_TRITON_TILE": args.triton_tile}
        self.base_env.pop(VARIANT_ENV, None)
        if self.dry_run:
            self.base_env["TRITON_INTERPRET"] = "1"

    # ------------------------------------------------------------------------------------------------ running
    def log(self, line: str) -> None:
        stamp = f"[{time.monotonic() - self.start:6.1f}s]"
        with self.lock:
            print(f"{stamp} {line}", flush=True)
            self.session_log.write(f"{stamp} {line}\n")
            self.session_log.flush()

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, step: Step) -> Outcome:
        """Runs ``step`` under ``timeout`` (its budget, cut to the deadline), its output into its own log."""
        log_path = self.logs / f"{step.name}.log"
        allowed = min(step.budget, self.seconds_left())
        if allowed < 5:
            return self._record(Outcome(step.name, "skipped", 0.0, step.budget, note="out of time", log=None))
        self.log(f"start {step.name} (budget {step.budget:.0f} s, allowed {allowed:.0f} s): "
                 f"{shlex.join(step.command)}")
        began = time.monotonic()
        with log_path.open("w") as log_file:
            log_file.write(f"$ {shlex.join(step.command)}\n")
            log_file.flush()
            command = ["timeout", "--kill-after=5", f"{allowed:.0f}", *step.command]
            try:
                process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT,
                                           env={**self.base_env, **step.env}, start_new_session=True)
                try:
                    returncode = process.wait(timeout=allowed + 15)
                except subprocess.TimeoutExpired:  # timeout itself hung: take the whole group down
                    os.killpg(process.pid, 9)
                    returncode = process.wait()
            except OSError as error:
                log_file.write(f"could not start: {error}\n")
                returncode = 127
        seconds = time.monotonic() - began
        status = "ok" if returncode == 0 else "timeout" if returncode in (124, 137, -9) else "failed"
        record = None
        if step.json is not None and step.json.exists():
            try:
                record = json.loads(step.json.read_text())
            except ValueError as error:
                step.note += f" (unreadable JSON: {error})"
        outcome = Outcome(step.name, status, seconds, step.budget, returncode, step.note.strip(), log_path, record)
        return self._record(outcome)

    def _record(self, outcome: Outcome) -> Outcome:
        with self.lock:
            self.outcomes.append(outcome)
        self.log(f"end {outcome.name}: {outcome.status} in {outcome.seconds:.1f} s"
                 f"{' (rc ' + str(outcome.returncode) + ')' if outcome.returncode not in (None, 0) else ''}"
                 f"{' - ' + outcome.note if outcome.note else ''}")
        return outcome

    def skip(self, name: str, budget: float, note: str) -> Outcome:
        return self._record(Outcome(name, "skipped", 0.0, budget, note=note))

    def lanes(self, *lanes: List[Step]) -> None:
        """Runs each list of steps in order, the lists side by side."""
        def run_lane(steps):
            for step in steps:
                self.run(step)

        with ThreadPoolExecutor(len(lanes)) as pool:
            for future in [pool.submit(run_lane, lane) for lane in lanes]:
                future.result()

    def pool(self, steps: List[Step], workers: int) -> None:
        """Runs ``steps`` on ``workers`` at once, in order; those that cannot start in time are skipped."""
        with ThreadPoolExecutor(workers) as pool:
            for future in [pool.submit(self.run, step) for step in steps]:
                future.result()

    # ------------------------------------------------------------------------------------------------- steps
    def checks(self, name: str, budget: float, *arguments: str, env=None, note="") -> Step:
        record = self.work / f"{name}.json"
        command = [self.python, str(CHECKS), *arguments, "--json", str(record)]
        if self.dry_run:
            command.append("--dry-run")
        return Step(name, command, budget, env or {}, note, record)

    def env_step(self) -> Step:
        tools = "; ".join(f"echo '$ {tool}'; {tool} 2>&1 | head -40 || true" for tool in (
            "nvidia-smi", "nvcc --version", "ncu --version", "compute-sanitizer --version", "ninja --version",
            "nproc", "free -g", "git -C . log -1 --oneline"))
        pip_list = (f"{shlex.quote(self.python)} -m pip list 2>/dev/null "
                    "| grep -iE '^(torch|triton|pytest|numpy)' || true")
        checks = self.checks("env", BUDGETS["env"], "env")
        script = f"{tools}; echo '$ pip list'; {pip_list}; {shlex.join(checks.command)}"
        return Step("env", ["bash", "-c", script], BUDGETS["env"], json=checks.json)

    def build_step(self) -> Step:
        if self.dry_run:
            # CI has built the extension already; evaluating setup.py checks its flags and source lists.
            return Step("build", [self.python, "setup.py", "--name"], BUDGETS["build"],
                        {"RNN_FAST_CUDA_ARCHS": "90", "MAX_JOBS": "16"}, note="dry run: setup.py evaluated, not built")
        return Step("build", [self.python, "setup.py", "build_ext", "--inplace"], BUDGETS["build"],
                    {"RNN_FAST_CUDA_ARCHS": "90", "MAX_JOBS": "16"})

    def pytest_step(self, name: str, budget: float, paths: List[str], keyword: str) -> Step:
        if self.dry_run:
            # The flow and the junit handling, on one quick test.
            paths, keyword = ["tests/ops/test_gemm_precision.py"], "matmul_precision"
        junit = self.logs / f"{name}.xml"
        command = [self.python, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}",
                   "-k", keyword, *paths]
        if importlib.util.find_spec("pytest_timeout"):
            command.insert(3, "--timeout=60")
        if importlib.util.find_spec("xdist") and not self.dry_run:
            command[3:3] = ["-n", "4"]
        return Step(name, command, budget, note=f"junit {junit.name}")

    def sanitizer_step(self, tool: str, backend: str, variant: str = "") -> Step:
        name = f"sanitize-{tool}-{backend}{'-' + variant if variant else ''}"
        target = [self.python, str(CHECKS), "sanitize", "--backend", backend]
        env = {VARIANT_ENV: variant} if variant else {}
        if self.dry_run or not shutil.which("compute-sanitizer"):
            note = "dry run" if self.dry_run else "compute-sanitizer not found"
            return Step(name, target + (["--dry-run"] if self.dry_run else []), BUDGETS["sanitizer"], env,
                        note=f"{note}: the target without the sanitizer")
        return Step(name, ["compute-sanitizer", "--tool", tool, "--error-exitcode", "1", "--print-limit", "50",
                           *target], BUDGETS["sanitizer"], env)

    def ncu_step(self) -> Step:
        report = self.work / "ncu-recurrence"
        profile = [self.python, str(CHECKS), "profile", "--backends", "triton,cuda", "--precisions", "tf32,bf16"]
        if self.dry_run or not shutil.which("ncu"):
            note = "dry run" if self.dry_run else "ncu not found"
            return Step("ncu", profile + (["--dry-run"] if self.dry_run else []), BUDGETS["ncu"],
                        note=f"{note}: the target without ncu")
        capture = ["ncu", "--clock-control", "none", "--target-processes", "all", "--kernel-name", NCU_KERNELS,
                   "--export", str(report), "--force-overwrite"]
        sections = [arg for name in NCU_SECTIONS for arg in ("--section", name)]
        details = ["ncu", "--import", f"{report}.ncu-rep", "--csv", "--page", "details"]
        # If this ncu does not know a section, its default set still gives durations, registers and occupancy.
        script = (f"{shlex.join(capture + sections + profile)} || {{ echo 'retrying with the default sections'; "
                  f"{shlex.join(capture + profile)}; }}; status=$?; "
                  f"{shlex.join(details)} > {shlex.quote(str(self.logs / 'ncu.csv'))}; exit $status")
        return Step("ncu", ["bash", "-c", script], BUDGETS["ncu"], note="details in ncu.csv")

    # --------------------------------------------------------------------------------------------- the session
    def run_all(self) -> int:
        self.log(f"rnn_fast GPU session{' (dry run)' if self.dry_run else ''}: deadline "
                 f"{self.args.total_seconds} s, work folder {self.work}, out {self.out}")
        self.run(self.env_step())

        # Triton needs no build: its correctness checks and tests run while nvcc builds the CUDA kernels.
        self.lanes([self.build_step()],
                   [self.checks("triton-smoke", BUDGETS["triton-smoke"], "run", "--smoke", "triton"),
                    self.pytest_step("triton-pytest", BUDGETS["triton-pytest"],
                                     ["tests/ops/test_triton_recurrence.py", "tests/modules/test_lstm.py"], "triton")])
        built = self._status("build") == "ok"

        if built:
            # (The dry run times one direction: the flow is the same, and the interpreter is slow.)
            directions = "bi" if self.dry_run else "bi,uni"
            baseline = self.run(self.checks("baseline", BUDGETS["baseline"], "run", "--smoke", "cuda",
                                            "--bench", "triton,cuda", "--directions", directions))
        else:
            baseline = self.skip("baseline", BUDGETS["baseline"], "no build")
        variants = self.args.variants.split(",") if self.args.variants else list(kernel_variants())
        for variant in variants:
            if not built:
                self.skip(f"variant-{variant}", BUDGETS["variant"], "no build")
                continue
            self.run(self.checks(f"variant-{variant}", BUDGETS["variant"], "run", "--smoke", "cuda", "--bench",
                                 "cuda", "--directions", "bi", env={VARIANT_ENV: variant}))

        # Timing-sensitive steps run alone; the correctness checks after them share the machine.
        self.run(self.ncu_step())
        self.run(self.checks("triton-sweep", BUDGETS["triton-sweep"], "sweep", "--precisions", "tf32,bf16",
                             env={"RNN_FAST_TRITON_TILE": ""}))

        checks = [self.pytest_step("cuda-pytest", BUDGETS["cuda-pytest"],
                                   ["tests/ops/test_cuda_recurrence.py", "tests/ops/test_gemm_precision.py",
                                    "tests/modules/test_lstm.py"], "not triton")]
        # Without the sanitizer (the dry run) every tool and variant would run the same program: once per backend.
        tools = ("memcheck",) if self.dry_run else SANITIZER_TOOLS
        checks += [self.sanitizer_step(tool, backend) for backend in ("cuda", "triton") for tool in tools]
        if not self.dry_run:
            # The variants: every tool on the first (the cluster exchange, where a race would be), memcheck on all.
            checks += [self.sanitizer_step(tool, "cuda", variants[0]) for tool in tools[1:] if variants]
            checks += [self.sanitizer_step("memcheck", "cuda", variant) for variant in variants]
        if built:
            self.pool(checks, workers=2 if self.dry_run else 6)
        else:
            for step in checks:
                if "triton" in step.name:
                    self.run(step)
                else:
                    self.skip(step.name, step.budget, "no build")

        return self.finish()

    def _status(self, name: str) -> Optional[str]:
        return next((outcome.status for outcome in self.outcomes if outcome.name == name), None)

    # ----------------------------------------------------------------------------------------------- reporting
    def finish(self) -> int:
        environment = self._environment()
        results = self.results(environment)
        summary = render_summary(results, self.outcomes, self.logs)
        date = environment.get("date") or datetime.date.today().isoformat()
        slug = re.sub(r"[^a-z0-9]+", "-", str(environment.get("device", "unknown")).lower()).strip("-")
        results_path = self.out / f"{slug}-session-{date}.json"
        results_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        (self.out / "summary.md").write_text(summary)
        failures = []
        for outcome in self.outcomes:
            if outcome.status in ("failed", "timeout") and outcome.log and outcome.log.exists():
                tail = outcome.log.read_text(errors="replace")[-6000:]
                failures.append(f"===== {outcome.name}: {outcome.status} (rc {outcome.returncode})\n{tail}\n")
        (self.out / "failures.log").write_text("".join(failures) or "no step failed\n")
        self.log(f"wrote {results_path.name}, summary.md, failures.log; packing the archive")
        packed = [path for path in sorted(self.work.rglob("*")) if path.is_file()
                  and "triton-cache" not in path.relative_to(self.work).parts]
        for path in packed:
            if path.stat().st_size > ARCHIVE_FILE_LIMIT:
                self.log(f"left out of the archive (over {ARCHIVE_FILE_LIMIT >> 20} MiB): {path.name}, "
                         f"{path.stat().st_size >> 20} MiB")
        self.session_log.close()
        shutil.copy(self.logs / "session.log", self.out / "session.log")
        with tarfile.open(self.out / "session-archive.tar.gz", "w:gz") as archive:
            for path in packed:
                if path.stat().st_size <= ARCHIVE_FILE_LIMIT:
                    archive.add(path, arcname=str(path.relative_to(self.work)))
        print(summary, flush=True)
        return 0 if all(outcome.status == "ok" for outcome in self.outcomes) else 1

    def _environment(self) -> dict:
        for name in ("baseline", "env", "triton-smoke"):
            record = next((o.record for o in self.outcomes if o.name == name and o.record), None)
            if record:
                return record.get("environment", record)
        return {}

    def results(self, environment: dict) -> dict:
        """The benchmarks/results/ record: environment first (device, versions, date, command), then the
        session's findings."""
        runs = [o.record for o in self.outcomes if o.record and "smoke" in o.record]
        env = {key: environment.get(key) for key in ("device", "torch", "triton", "cuda", "date")}
        env["command"] = shlex.join(["tools/gpu_session.sh", *sys.argv[1:]])
        sweep = next((o.record for o in self.outcomes if o.name == "triton-sweep" and o.record), None)
        return {**env, "environment": environment, "dry_run": self.dry_run,
                "config": runs[0]["shape"] if runs else None, "triton_tile_pin": self.args.triton_tile,
                "steps": [{"name": o.name, "status": o.status, "seconds": round(o.seconds, 1), "budget": o.budget,
                           "returncode": o.returncode, "note": o.note} for o in self.outcomes],
                "smoke": [record for run in runs for record in run["smoke"]],
                "benchmarks": [record for run in runs for record in run["benchmarks"]],
                "triton_tiles": next((run["triton_tiles"] for run in runs if run.get("triton_tiles")), None),
                "variants": variant_verdicts(runs),
                "sanitizers": {o.name: sanitizer_errors(o) for o in self.outcomes if o.name.startswith("sanitize")},
                "pytest": {o.name: pytest_counts(o) for o in self.outcomes if o.name.endswith("pytest")},
                "ncu": ncu_rows(self.logs / "ncu.csv"), "triton_sweep": sweep}


def variant_verdicts(runs: List[dict]) -> List[dict]:
    """Per CUDA variant (baseline included): correct in which precisions, and fwd+bwd ratios vs cuDNN."""
    verdicts = []
    for run in runs:
        cuda_smoke = [record for record in run["smoke"] if record["backend"] == "cuda"
                      and record["case"].startswith("L2")]
        if not cuda_smoke:
            continue
        ratios = {f"{'bi' if r['bidirectional'] else 'uni'}-{r['precision']}": round(r["speedup_vs_cudnn"], 3)
                  for r in run["benchmarks"] if r.get("kind") == "stack" and r.get("backend") == "cuda"
                  and r.get("pass") == "forward+backward"}
        unsupported = {r["precision"] for r in cuda_smoke if str(r["status"]).startswith("unsupported")}
        failing = {r["precision"] for r in cuda_smoke if not r["ok"]} - unsupported
        steps = {f"{r['precision']}-{r['op']}": round(r["us_per_step"], 2) for r in run["benchmarks"]
                 if r.get("kind") == "recurrence" and r.get("backend") == "cuda" and "us_per_step" in r}
        verdicts.append({"variant": run["variant"],
                         "correct": sorted({r["precision"] for r in cuda_smoke} - failing - unsupported),
                         "incorrect": sorted(failing), "unsupported": sorted(unsupported),
                         "fwd_bwd_speedup_vs_cudnn": ratios, "recurrence_us_per_step": steps})
    return verdicts


def sanitizer_errors(outcome: Outcome) -> dict:
    text = outcome.log.read_text(errors="replace") if outcome.log and outcome.log.exists() else ""
    found = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    return {"status": outcome.status, "errors": int(found[-1]) if found else None, "note": outcome.note}


def pytest_counts(outcome: Outcome) -> dict:
    """From the junit file; failing that (a cut run writes none), from pytest's last line."""
    counts = {"status": outcome.status}
    junit = outcome.log.with_suffix(".xml") if outcome.log else None
    if junit and junit.exists():
        try:
            suite = ElementTree.parse(junit).getroot()
            suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
            counts.update({key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")})
            counts["failed_tests"] = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                                      if case.find("failure") is not None or case.find("error") is not None][:30]
            return counts
        except ElementTree.ParseError:
            pass
    text = outcome.log.read_text(errors="replace") if outcome.log and outcome.log.exists() else ""
    counts.update({word: int(number) for number, word in re.findall(r"(\d+) (passed|failed|skipped|error)", text)})
    return counts


def ncu_rows(path: Path) -> List[dict]:
    """Per profiled kernel: its name and a few metrics of ncu's details page."""
    if not path.exists():
        return []
    import csv

    wanted = {"Duration", "Registers Per Thread", "Achieved Occupancy", "Compute (SM) Throughput",
              "Memory Throughput", "DRAM Throughput", "Local Memory Spilling Requests", "Block Size", "Grid Size",
              "Dynamic Shared Memory Per Block"}
    kernels: Dict[tuple, dict] = {}
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.startswith('"')]
    for row in csv.DictReader(lines):
        name = row.get("Metric Name")
        if name in wanted:
            key = (row.get("ID"), row.get("Kernel Name", "")[:80])
            kernels.setdefault(key, {"id": key[0], "kernel": key[1]})[name] = \
                f"{row.get('Metric Value')} {row.get('Metric Unit', '')}".strip()
    return list(kernels.values())


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_summary(results: dict, outcomes: List[Outcome], logs: Path) -> str:
    lines = [f"# rnn_fast GPU session{' (DRY RUN on the CPU: no GPU figure here)' if results['dry_run'] else ''}",
             "", f"device {results.get('device')}, torch {results.get('torch')}, triton {results.get('triton')}, "
             f"CUDA {results.get('cuda')}, {results.get('date')}; Triton tile pinned to {results['triton_tile_pin']}",
             f"command: `{results['command']}`", "", "## Steps", "",
             "| step | status | seconds | budget | note |", "|---|---|---:|---:|---|"]
    lines += [f"| {o.name} | {o.status} | {o.seconds:.0f} | {o.budget:.0f} | {o.note} |" for o in outcomes]
    shape = results.get("config") or {}
    lines += ["", "## Correctness (" + ", ".join(f"{key} {shape[key]}" for key in
                                                 ("batch", "seq_len", "input_size", "hidden", "layers") if key in shape)
              + ")", "",
              "Relative error (Frobenius) of the worst tensor against float64, nn.LSTM's own error on that tensor in "
              "brackets. Pass: every tensor within 2x nn.LSTM's own error, or within 2e-5.", "",
              "| backend | variant | case | precision | pass | worst tensor | ours [nn.LSTM] | status |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results["smoke"]:
        error = (f"{r['worst_error']:.2e} [{r['torch_error_same_tensor']:.2e}]" if "worst_error" in r else "")
        lines.append(f"| {r['backend']} | {r.get('variant', '')} | {r['case']} | {r.get('precision', '')} | "
                     f"{'yes' if r['ok'] else '**NO**'} | {r.get('worst_tensor', '')} | {error} | "
                     f"{str(r['status'])[:160]} |")
    stacks = [r for r in results["benchmarks"] if r.get("kind") == "stack" and "ours" in r]
    lines += ["", "## Speed against cuDNN (same process, CUDA events, median of rounds)", "",
              "| backend | variant | dirs | precision | pass | cuDNN ms | ours ms [p20, p80] | speedup |",
              "|---|---|---|---|---|---:|---:|---:|"]
    for r in stacks:
        ours = r["ours"]
        lines.append(f"| {r['backend']} | {r['variant']} | {'bi' if r['bidirectional'] else 'uni'} | "
                     f"{r['precision']} | {r['pass']} | {_fmt(r['cudnn']['median_ms'])} | "
                     f"{_fmt(ours['median_ms'])} [{_fmt(ours['p20_ms'])}, {_fmt(ours['p80_ms'])}] | "
                     f"**{r['speedup_vs_cudnn']:.2f}x** |")
    recurrence = [r for r in results["benchmarks"] if r.get("kind") == "recurrence" and "us_per_step" in r]
    lines += ["", "## Recurrence ops alone (both directions in one launch, µs per step)", "",
              "| backend | variant | precision | op | µs / step | ms |", "|---|---|---|---|---:|---:|"]
    lines += [f"| {r['backend']} | {r['variant']} | {r['precision']} | {r['op']} | {r['us_per_step']:.2f} | "
              f"{r['median_ms']:.2f} |" for r in recurrence]
    errors = [r for r in results["benchmarks"] if "error" in r]
    lines += [f"- benchmark error: {r.get('backend', '')} {r.get('precision', '')} {r.get('pass', '')}: "
              f"{r['error'][:200]}" for r in errors]
    lines += ["", "## CUDA kernel variants", "",
              "Correct in: every case (uni, bi, and in fp32 packed) passed in that precision. Timed only where "
              "correct.",
              "", "| variant | correct in | incorrect in | unsupported | fwd+bwd speedup vs cuDNN "
              "| recurrence µs / step |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {v['variant']} | {', '.join(v['correct']) or '-'} | {', '.join(v['incorrect']) or '-'} | "
              f"{', '.join(v['unsupported']) or '-'} | "
              f"{', '.join(f'{k}: {x:.2f}x' for k, x in v['fwd_bwd_speedup_vs_cudnn'].items()) or '-'} | "
              f"{', '.join(f'{k}: {x:.2f}' for k, x in v['recurrence_us_per_step'].items()) or '-'} |"
              for v in results["variants"]]
    lines += ["", "## Triton tiles", "", f"```\n{json.dumps(results['triton_tiles'], indent=1)}\n```"]
    sweep = results.get("triton_sweep") or {}
    lines += [f"- sweep {s['kernel']} {s['precision']} D={s['directions']}: "
              + ", ".join(f"{tile} {_fmt(ms, 3)} ms" for tile, ms in s["ms_by_tile"].items())
              for s in sweep.get("sweeps", [])]
    lines += ["", "## compute-sanitizer", "", "| run | status | errors | note |", "|---|---|---:|---|"]
    lines += [f"| {name} | {s['status']} | {'-' if s['errors'] is None else s['errors']} | {s['note']} |"
              for name, s in results["sanitizers"].items()]
    lines += ["", "## pytest", ""]
    for name, counts in results["pytest"].items():
        lines.append(f"- {name}: " + ", ".join(f"{key} {value}" for key, value in counts.items()
                                               if key != "failed_tests"))
        lines += [f"  - FAILED {test}" for test in counts.get("failed_tests", [])]
    lines += ["", "## ncu (recurrence kernels)", ""]
    for row in results["ncu"]:
        lines.append("- " + ", ".join(f"{key}: {value}" for key, value in row.items()))
    if not results["ncu"]:
        lines.append("- no ncu data")
    lines += ["", f"Logs of every step: session-archive.tar.gz (logs/); this summary, the results JSON, "
              f"session.log and failures.log beside it.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no GPU tools: the flow only")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="where the (at most 8) files go; default $OUT")
    parser.add_argument("--work", help="scratch folder for logs and caches (default: a new temporary folder)")
    parser.add_argument("--total-seconds", type=float, default=TOTAL_SECONDS)
    parser.add_argument("--triton-tile", default=DEFAULT_TILE, help="RNN_FAST_TRITON_TILE for every step but the sweep")
    parser.add_argument("--variants", help="comma-separated CUDA variants to run (default: all the backend has)")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("--out is required when $OUT is not set")
    return Session(args).run_all()


if __name__ == "__main__":
    sys.exit(main())
