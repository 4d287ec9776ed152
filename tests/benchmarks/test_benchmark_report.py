"""benchmarks/epoch.py on a tiny CPU epoch writes the results schema, and benchmarks/report.py turns it into the
README table and bar chart. Both run as the README runs them, as scripts."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import rnn_fast

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

# One LSTM with every CPU backend, and the CNN: each combination costs a fresh process.
MODELS = ["lstm", "cnn"]
BACKENDS = [name for name in ("torch", "cpu") if name in rnn_fast.available_backends()]
RECORD_KEYS = {"model", "precision", "backend", "seconds_per_epoch", "seconds_p20", "seconds_p80", "ms_per_iter",
               "speedup_vs_cudnn", "data_seconds_per_epoch", "data_share", "peak_mem_mb", "final_loss"}
TINY = ["--device", "cpu", "--iters", "2", "--epochs", "2", "--batch-size", "8", "--hidden", "8",
        "--cnn-width", "8"]


@pytest.fixture(scope="module")
def results_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("epoch") / "cpu-epoch-test.json"
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "epoch.py"), *TINY, "--models", *MODELS, "--backends", *BACKENDS,
         "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    return out


def test_epoch_results_schema(results_file):
    results = json.loads(results_file.read_text())
    assert {"device", "torch", "triton", "cuda", "date", "command", "baseline", "config", "load_average",
            "epoch", "skipped"} <= set(results)
    assert "benchmarks/epoch.py" in results["command"] and "--hidden 8" in results["command"]
    assert results["config"]["iters"] == 2 and results["config"]["hidden"] == 8
    expected = [(model, backend) for model in MODELS for backend in (BACKENDS if model != "cnn" else ["torch"])]
    assert [(r["model"], r["backend"]) for r in results["epoch"]] == expected
    assert results["config"]["precision"] == "fp32" and {r["precision"] for r in results["epoch"]} == {"fp32"}
    seconds = {(r["model"], r["backend"]): r["seconds_per_epoch"] for r in results["epoch"]}
    for record in results["epoch"]:
        assert set(record) == RECORD_KEYS
        assert 0 < record["seconds_p20"] <= record["seconds_per_epoch"] <= record["seconds_p80"]
        assert record["ms_per_iter"] == pytest.approx(1000 * record["seconds_per_epoch"] / 2)
        assert 0 < record["data_share"] < 1
        assert record["peak_mem_mb"] >= 0
        if record["model"] == "cnn":
            assert record["speedup_vs_cudnn"] is None
        else:
            assert record["speedup_vs_cudnn"] == pytest.approx(
                seconds[record["model"], "torch"] / record["seconds_per_epoch"])


def run_report(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / "report.py"), *map(str, arguments)], capture_output=True,
                          text=True, timeout=120)


def test_report_writes_table_and_chart(results_file, tmp_path):
    md, png = tmp_path / "table.md", tmp_path / "chart.png"
    completed = run_report(results_file, "--md", md, "--png", png)
    assert completed.returncode == 0, completed.stderr
    table = md.read_text()
    assert table in completed.stdout
    results = json.loads(results_file.read_text())
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(results["epoch"])
    assert "speedup vs torch" in rows[0] and "seed report" in rows[0] and "369-iter epoch" in rows[0]
    assert any(row.startswith("| LSTM | torch (ATen) |") and row.endswith("| 123 |") for row in rows)
    assert any(row.startswith("| CNN (M5) | torch (ATen) |") and row.endswith("| 386 |") for row in rows)
    assert results["command"] in table and results["device"] in table and "load average" in table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_rejects_other_results(tmp_path):
    kernel_results = tmp_path / "cpu-kernels.json"
    kernel_results.write_text(json.dumps({"device": "cpu", "kernels": []}))
    completed = run_report(kernel_results)
    assert completed.returncode != 0
    assert "ValueError" in completed.stderr and "not a benchmarks/epoch.py results file" in completed.stderr
