"""One command for a lent GPU machine (tools/gpu_session.sh): build, then run the project's own GPU tests and
benchmarks, each step under its own ``timeout`` and carrying on after a failure, and gather what they report into
one results file and a summary, at most 8 files in ``$OUT``, in at most 9 minutes.

    OUT=/some/folder tools/gpu_session.sh            # on the GPU machine, from a fresh copy of the repository
    tools/gpu_session.sh --dry-run --out /tmp/x      # on a CPU machine: the same flow at a tiny size

The machine has no network: the build uses what is installed (no pip), and ``.ci/run`` is never run. Every child
is ``python -m pytest`` run from the repository root, so it imports this copy of rnn_fast. The steps, in the order
they are worth running (a step that would end past the deadline is cut; one that cannot start in time is skipped
and says so):

1. ``env``: nvidia-smi, nvcc, compute-sanitizer, the Python packages, and the environment record
   (``rnn_fast.testing.environment``: device, torch, triton, CUDA, date).
2. ``build`` (``RNN_FAST_CUDA_ARCHS=90 MAX_JOBS=16 python setup.py build_ext --inplace``), while the Triton lane,
   which needs no build, runs alongside: ``triton-tests``, its op and module tests against the naive reference and
   nn.LSTM, and the classifier's stack against cuDNN, with the Triton tile pinned.
3. ``bench``: benchmarks/test_gpu_lstm.py at B=768, cuDNN against triton (pinned tile) and cuda, as LSTM and BLSTM,
   in TF32 and bf16, forward, backward and forward+backward.
4. ``bench-<variant>``: the same for cuda under each CUDA kernel variant (``RNN_FAST_CUDA_VARIANTS``), one process
   each, against cuDNN in the same process.
5. Correctness, side by side (six at a time: nothing is timed, so they may share the GPU): ``cuda-tests`` (the CUDA
   op tests, each variant's accuracy against the baseline kernels among them, the module tests and the classifier's
   stack), ``cuda-tests-<variant>`` (the classifier's stack under the variant), and compute-sanitizer (memcheck,
   racecheck, synccheck) around each backend's ``test_ops_in_every_precision_match_naive``: every tool on cuda,
   triton and the first variant, memcheck on the other variants.
6. ``bench-triton-autotuned``: triton with no tile pinned, so that the autotuner compares its tiles; the benchmark
   records the tile it kept and the timings of the others.

Every pytest child writes a junit file and the benchmarks their results files, as they go, so a step cut by its
timeout still reports what it finished. The budgets are in benchmarks/NOTES.md ("GPU session").
"""
import argparse
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

# Both modules sit beside this script; neither imports torch, so the session outlives a broken install.
from cuda_variants import VARIANT_ENV, kernel_variants
from gpu_session_report import ARCHIVE_FILE_LIMIT, Outcome, archive_contents, pack_archive, write_report

ROOT = Path(__file__).resolve().parents[1]
TOTAL_SECONDS = 540
# Kept for writing the results, the summary and the archive after the last step.
RESERVE_SECONDS = 20
# The tile the session pins (RNN_FAST_TRITON_TILE), so that it compiles one tile per kernel instead of autotuning
# six: 16 rows fill most of the 132 SMs at B=768 (48 programs per direction), and 8 warps is where the 16-row
# tiles need least stack under Triton 3.6 (README's table).
DEFAULT_TILE = "16x8"
BATCH = 768
# Rounds of each variant's benchmark (the baseline's are the benchmark's 30): five variants must fit the deadline.
VARIANT_ROUNDS = "20"
# Seconds each step may take (see benchmarks/NOTES.md for what they rest on).
BUDGETS = {"env": 30, "build": 200, "triton-tests": 150, "bench": 120, "bench-variant": 40,
           "bench-triton-autotuned": 100, "cuda-tests": 150, "cuda-tests-variant": 60, "sanitizer": 120}
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")
TRITON_TESTS = ["tests/library/ops/test_triton_recurrence.py", "tests/library/modules/test_lstm.py",
                "tests/library/modules/test_classifier_stack.py"]
CUDA_TESTS = ["tests/library/ops/test_cuda_recurrence.py", "tests/library/modules/test_lstm.py",
              "tests/library/modules/test_classifier_stack.py"]
# Under a variant: the classifier's stack against cuDNN. Each variant's accuracy against the baseline kernels is in
# test_cuda_recurrence.py, which cuda-tests runs for all of them, and memcheck runs the op checks under each.
VARIANT_TESTS = [CUDA_TESTS[2]]
# Each backend's op tests, whose test_ops_in_every_precision_match_naive compute-sanitizer runs.
OP_TESTS = {"cuda": "tests/library/ops/test_cuda_recurrence.py",
            "triton": "tests/library/ops/test_triton_recurrence.py"}
SANITIZED_TEST = "ops_in_every_precision_match_naive"
# Writes the environment record and the results file's name; python -c puts the repository root first on sys.path,
# as python -m pytest does.
ENVIRONMENT_SCRIPT = ("import json, sys, torch; from rnn_fast.testing import environment, results_file_name; "
                      "record = environment(torch.device('cuda' if torch.cuda.is_available() else 'cpu')); "
                      "record['results_file'] = results_file_name(record, 'session'); "
                      "json.dump(record, open(sys.argv[1], 'w'))")


@dataclass
class Step:
    name: str
    command: List[str]
    budget: float
    env: Dict[str, str] = field(default_factory=dict)
    note: str = ""
    kind: str = "other"  # tests, bench, sanitizer, or other


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
        # In the dry run the cpu backend stands in for cuda in the benchmarks and the module tests (the same driver,
        # other ops); CUDA's op tests skip.
        self.cuda_backend = "cpu" if self.dry_run else "cuda"
        self.base_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_CACHE_DIR": str(self.work / "triton-cache"),
                         "RNN_FAST_TRITON_TILE": args.triton_tile, "RNN_FAST_BENCH_BATCHES": str(BATCH)}
        self.base_env.pop(VARIANT_ENV, None)
        if self.dry_run:
            self.base_env.update(TRITON_INTERPRET="1", RNN_FAST_BENCH_DRY_RUN="1", RNN_FAST_BENCH_BATCHES="4")

    # ------------------------------------------------------------------------------------------------ running
    def log(self, line: str) -> None:
        stamp = f"[{time.monotonic() - self.start:6.1f}s]"
        with self.lock:
            print(f"{stamp} {line}", flush=True)
            self.session_log.write(f"{stamp} {line}\n")
            self.session_log.flush()

    def run(self, step: Step) -> Outcome:
        """Runs ``step`` under ``timeout`` (its budget, cut to the deadline), its output into its own log."""
        allowed = min(step.budget, self.deadline - time.monotonic())
        if allowed < 5:
            return self.skip(step, "out of time")
        log_path = self.logs / f"{step.name}.log"
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
        status = "ok" if returncode == 0 else "timeout" if returncode in (124, 137, -9) else "failed"
        return self._record(Outcome(step.name, step.kind, status, time.monotonic() - began, step.budget,
                                    returncode, step.note, log_path, self.work / step.name))

    def skip(self, step: Step, note: str) -> Outcome:
        return self._record(Outcome(step.name, step.kind, "skipped", 0.0, step.budget, note=note))

    def _record(self, outcome: Outcome) -> Outcome:
        with self.lock:
            self.outcomes.append(outcome)
        self.log(f"end {outcome.name}: {outcome.status} in {outcome.seconds:.1f} s"
                 f"{' (rc ' + str(outcome.returncode) + ')' if outcome.returncode not in (None, 0) else ''}"
                 f"{' - ' + outcome.note if outcome.note else ''}")
        return outcome

    def lanes(self, *lanes: List[Step]) -> None:
        """Runs each list of steps in order, the lists side by side."""
        with ThreadPoolExecutor(len(lanes)) as pool:
            for future in [pool.submit(lambda steps: [self.run(step) for step in steps], lane) for lane in lanes]:
                future.result()

    def pool(self, steps: List[Step], workers: int) -> None:
        """Runs ``steps`` on ``workers`` at once, in order; those that cannot start in time are skipped."""
        with ThreadPoolExecutor(workers) as pool:
            for future in [pool.submit(self.run, step) for step in steps]:
                future.result()

    # ------------------------------------------------------------------------------------------------- steps
    def env_step(self) -> Step:
        tools = "; ".join(f"echo '$ {tool}'; {tool} 2>&1 | head -40 || true" for tool in (
            "nvidia-smi", "nvcc --version", "compute-sanitizer --version", "ninja --version", "nproc", "free -g",
            "git -C . log -1 --oneline"))
        pip_list = (f"{shlex.quote(self.python)} -m pip list 2>/dev/null "
                    "| grep -iE '^(torch|triton|pytest|numpy)' || true")
        record = shlex.join([self.python, "-c", ENVIRONMENT_SCRIPT, str(self.work / "environment.json")])
        return Step("env", ["bash", "-c", f"{tools}; echo '$ pip list'; {pip_list}; {record}"], BUDGETS["env"])

    def build_step(self) -> Step:
        env = {"RNN_FAST_CUDA_ARCHS": "90", "MAX_JOBS": "16"}
        if self.dry_run:
            # CI has built the extension already; evaluating setup.py checks its flags and source lists.
            return Step("build", [self.python, "setup.py", "--name"], BUDGETS["build"], env,
                        note="dry run: setup.py evaluated, not built")
        return Step("build", [self.python, "setup.py", "build_ext", "--inplace"], BUDGETS["build"], env)

    def pytest_command(self, name: str, paths: List[str], keyword: str, workers: int = 1) -> List[str]:
        """pytest on ``paths`` (tests matching ``keyword``), its junit file in the step's own folder."""
        command = [self.python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
                   f"--junitxml={self.work / name / 'junit.xml'}", "-k", keyword, *paths]
        if importlib.util.find_spec("pytest_timeout"):
            command.insert(3, "--timeout=120")
        if workers > 1 and importlib.util.find_spec("xdist"):
            command[3:3] = ["-n", str(workers)]
        return command

    def tests_step(self, name: str, budget: float, paths: List[str], keyword: str, env=None, note="") -> Step:
        if self.dry_run:
            # The flow and the junit handling on the quick tests: the op checks and the classifier's (tiny) stack.
            keyword = f"({keyword}) and ({SANITIZED_TEST} or within_twice_nn_lstm)"
        workers = 1 if self.dry_run else 4
        return Step(name, self.pytest_command(name, paths, keyword, workers), budget, env or {}, note, "tests")

    def bench_step(self, name: str, budget: float, keyword: str, env=None, note="") -> Step:
        command = [self.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
                   "benchmarks/test_gpu_lstm.py", "-k", keyword]
        return Step(name, command, budget, {"RNN_FAST_RESULTS_DIR": str(self.work / name), **(env or {})}, note,
                    "bench")

    def sanitizer_step(self, tool: str, backend: str, variant: str = "") -> Step:
        name = f"sanitize-{tool}-{backend}{'-' + variant if variant else ''}"
        target = self.pytest_command(name, [OP_TESTS[backend]], SANITIZED_TEST)
        env = {VARIANT_ENV: variant} if variant else {}
        if self.dry_run or not shutil.which("compute-sanitizer"):
            note = "dry run" if self.dry_run else "compute-sanitizer not found"
            return Step(name, target, BUDGETS["sanitizer"], env, f"{note}: the tests without the sanitizer",
                        "sanitizer")
        return Step(name, ["compute-sanitizer", "--tool", tool, "--error-exitcode", "1", "--print-limit", "50",
                           *target], BUDGETS["sanitizer"], env, kind="sanitizer")

    # --------------------------------------------------------------------------------------------- the session
    def run_all(self) -> int:
        self.log(f"rnn_fast GPU session{' (dry run)' if self.dry_run else ''}: deadline "
                 f"{self.args.total_seconds} s, work folder {self.work}, out {self.out}")
        self.run(self.env_step())

        # Triton needs no build: its tests run while nvcc builds the CUDA kernels.
        self.lanes([self.build_step()],
                   [self.tests_step("triton-tests", BUDGETS["triton-tests"], TRITON_TESTS, "triton")])
        built = any(outcome.name == "build" and outcome.status == "ok" for outcome in self.outcomes)
        variants = self.args.variants.split(",") if self.args.variants else list(kernel_variants())
        cuda = self.cuda_backend

        # Timed steps run alone, one after the other.
        timed = [self.bench_step("bench", BUDGETS["bench"], "")]
        timed += [self.bench_step(f"bench-{variant}", BUDGETS["bench-variant"], f"{cuda} or cudnn",
                                  env={VARIANT_ENV: variant, "RNN_FAST_BENCH_ROUNDS": VARIANT_ROUNDS})
                  for variant in variants]
        self.run_built(timed, built)

        checks = [self.tests_step("cuda-tests", BUDGETS["cuda-tests"], CUDA_TESTS, cuda)]
        checks += [self.tests_step(f"cuda-tests-{variant}", BUDGETS["cuda-tests-variant"], VARIANT_TESTS, cuda,
                                   env={VARIANT_ENV: variant}) for variant in variants]
        # Without the sanitizer (the dry run) every tool and variant would run the same tests: once per backend.
        tools = ("memcheck",) if self.dry_run else SANITIZER_TOOLS
        checks += [self.sanitizer_step(tool, backend) for backend in OP_TESTS for tool in tools]
        if not self.dry_run:
            # The variants: every tool on the first (the cluster exchange, where a race would be), memcheck on all.
            checks += [self.sanitizer_step(tool, "cuda", variants[0]) for tool in tools[1:] if variants]
            checks += [self.sanitizer_step("memcheck", "cuda", variant) for variant in variants]
        if not built:
            for step in [step for step in checks if "triton" not in step.name]:
                self.skip(step, "no build")
            checks = [step for step in checks if "triton" in step.name]
        self.pool(checks, workers=2 if self.dry_run else 6)

        # Last, as the least needed: the tiles the autotuner would pick, and what the others cost.
        self.run_built([self.bench_step("bench-triton-autotuned", BUDGETS["bench-triton-autotuned"],
                                        "triton or cudnn", env={"RNN_FAST_TRITON_TILE": ""},
                                        note="no tile pinned: the autotuner's")], built)
        return self.finish()

    def run_built(self, steps: List[Step], built: bool) -> None:
        """Runs ``steps`` one after the other, or skips them when the build failed."""
        for step in steps:
            if built:
                self.run(step)
            else:
                self.skip(step, "no build")

    def finish(self) -> int:
        """The results file, summary.md and failures.log in ``$OUT``, then session.log and the archive of every
        step's files; the summary also goes to stdout, which is what the device tool's output tail shows."""
        command = shlex.join(["tools/gpu_session.sh", *sys.argv[1:]])
        summary, written = write_report(self.outcomes, self.work, self.out, command, self.dry_run,
                                        self.args.triton_tile)
        archived, too_large = archive_contents(self.work)
        for path in too_large:
            self.log(f"left out of the archive (over {ARCHIVE_FILE_LIMIT >> 20} MiB): {path.relative_to(self.work)}")
        self.log(f"wrote {', '.join(written)}; packing the archive")
        self.session_log.close()
        shutil.copy(self.logs / "session.log", self.out / "session.log")
        pack_archive(self.work, archived, self.out / "session-archive.tar.gz")
        print(summary, flush=True)
        return 0 if all(outcome.status == "ok" for outcome in self.outcomes) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no GPU tools: the flow only")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="where the (at most 8) files go; default $OUT")
    parser.add_argument("--work", help="scratch folder for logs and caches (default: a new temporary folder)")
    parser.add_argument("--total-seconds", type=float, default=TOTAL_SECONDS)
    parser.add_argument("--triton-tile", default=DEFAULT_TILE, help="RNN_FAST_TRITON_TILE for every step but the "
                                                                    "autotuned benchmark")
    parser.add_argument("--variants", help="comma-separated CUDA variants to run (default: all the header names)")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("--out is required when $OUT is not set")
    return Session(args).run_all()


if __name__ == "__main__":
    sys.exit(main())
