"""The CLI's pieces: the seed-example table, the training run, the bench worker."""

import subprocess
import sys

import crossent
from crossent import bench, cli


def test_seed_rows_show_torch_failing_where_crossent_answers():
    rows = {case: (theirs, ours) for case, theirs, ours in cli.seed_example_rows()}
    idx_loss = rows["indices [0, 1, 2, 2]"][1]
    assert rows["one-hot rows (int64)"][1] == idx_loss
    assert "Error" in rows["one-hot rows (int64)"][0]
    assert rows["one-hot rows (float) + class weights"][1] == rows["...same, what indices give"][1]
    assert rows["one-hot rows (float) + class weights"][0] != rows["...same, what indices give"][0]
    assert "pass dim=-1" in rows["[B, T, C] logits, [B, T] targets"][1]
    assert "softmax" in rows["softmax applied before the loss"][1]


def test_training_on_digits_learns():
    assert cli.train_digits(epochs=8, progress=False) > 0.9


def test_bench_worker_measures():
    r = bench.run_worker("chunked", "index", 64, 300, "float32", "cpu", 2)
    assert r["time_ms"] > 0 and r["impl"] == "chunked"


def test_cli_info_runs():
    out = subprocess.run([sys.executable, "-m", "crossent", "info"], capture_output=True, text=True, check=True).stdout
    assert crossent.__version__ in out


def test_examples_run():
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent / "examples"
    for script in sorted(root.glob("*.py")):
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr[-1000:]}"
