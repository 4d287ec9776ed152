"""The recipe study (rnn_fast.nsynth.recipe_study): its report, written again from the recorded runs, is the one
in docs/, and each ablation row shows the flags that run added."""
import json
import shlex

from rnn_fast.nsynth.recipe_study import COMMON, REPO, RESULTS, ablation_table, load_results, write_report


def test_the_report_in_docs_is_what_the_recorded_runs_give(tmp_path):
    written = write_report(load_results(RESULTS / "nsynth-dev-final.json"),
                           load_results(RESULTS / "nsynth-dev-ablation.json"),
                           json.loads((RESULTS / "nsynth-dev-epoch.json").read_text()), tmp_path)
    assert written.read_text() == (REPO / "docs" / "nsynth-dev" / "report.md").read_text()
    assert (tmp_path / "confusion_comparison.png").stat().st_size > 10_000


def test_ablation_rows_show_the_flags_between_the_common_ones_and_the_seed():
    command = shlex.join(["python", "examples/train_nsynth.py", "--data-dir", "/data/gm-proxy", *COMMON,
                          "--recipe", "robust", "--mixup", "0.2", "--seed", "1", "--out", "runs/x", "--overwrite"])
    record = {"name": "robust+mixup", "seed": 1, "command": command, "val_accuracy": 0.9, "test_accuracy": 0.5,
              "tested_epoch": 7, "epochs_run": 20}
    assert ablation_table({"robust+mixup/seed1": record}).splitlines()[-1] == (
        "| robust+mixup (seed 1) | `--recipe robust --mixup 0.2` | 90.0% | 50.0% | 7/20 |")
