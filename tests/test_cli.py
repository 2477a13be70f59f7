"""The CLI's pieces: the seed-example table, the training run, the bench worker."""

import subprocess
import sys

import crossent
from crossent.tools import bench, cli


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


# --------------------------------------------------------------------------- crossent bench

import csv
import math
import os
import struct

import pytest
import torch

# the options that benchmarks/*.py and gpu_check.sh pass, and those of issue 10
BENCH_OPTIONS = ["--quick", "--kinds", "--impls", "--N", "--V", "--H", "--dtype", "--device", "--reps", "--warmup",
                 "--per", "--threads", "--out-dir", "--csv", "--png"]


def test_bench_help_mentions_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])  # `crossent bench --help`
    assert e.value.code == 0
    out = capsys.readouterr().out
    shown = [o for a in bench._parser()._actions if a.help != "==SUPPRESS==" for o in a.option_strings]
    for opt in set(BENCH_OPTIONS) | set(shown):
        assert opt in out, opt
    # every option with a value says its default (--quick's as well where it has one)
    for key in ("--kinds", "--impls", "--N", "--V", "--H", "--reps", "--warmup", "--per"):
        i = out.index("\n  " + key + " ")  # its entry in the options list, not the usage line
        entry = " ".join(out[i:out.index("\n  --", i + 1)].split())
        assert "default:" in entry and "with --quick:" in entry, key
    assert "cce" in out and "liger" in out and "examples:" in out


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", head[16:24])


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bench_sweep_writes_csv_and_png_and_skips_missing_peers(tmp_path, monkeypatch, capsys):
    # both peers made "not installed": they must be reported, never crash the run
    real = bench._installed
    monkeypatch.setattr(bench, "_installed", lambda m: False if m in ("liger_kernel", "cut_cross_entropy") else real(m))
    N, H, Vs = 128, 32, [256, 4096]
    bench.main(["--quick", "--N", str(N), "--H", str(H), "--V", ",".join(map(str, Vs)), "--reps", "2",
                "--impls", "torch,auto,cce,liger", "--threads", "1", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    rows = _read_csv(tmp_path / "bench_quick_cpu.csv")
    assert {"kind", "impl", "N", "H", "V", "time_ms", "peak_mb", "time_ratio", "mem_ratio", "note",
            "machine"} <= set(rows[0])
    # one row per impl x size
    assert sorted((r["impl"], int(r["V"])) for r in rows) == sorted(
        (i, v) for i in ("torch", "auto", "cce_torch_compile", "liger") for v in Vs)
    by = {(r["impl"], int(r["V"])): r for r in rows}
    for V in Vs:
        t, a = by["torch", V], by["auto", V]
        for r in (t, a):
            assert r["note"] == "" and float(r["time_ms"]) > 0 and r["machine"] == bench.machine()
            assert (int(r["N"]), int(r["H"]), r["kind"], r["dtype"]) == (N, H, "linear", "float32")
        # ratios are the times and memories of the same CSV over torch eager's (4 significant digits)
        assert float(a["time_ratio"]) == pytest.approx(float(a["time_ms"]) / float(t["time_ms"]), rel=2e-3)
        if float(t["peak_mb"]) > 0:
            assert float(a["mem_ratio"]) == pytest.approx(float(a["peak_mb"]) / float(t["peak_mb"]), rel=2e-3)
        else:  # no ratio to a zero
            assert a["mem_ratio"] == ""
        assert float(t["time_ratio"]) == 1.0
    # torch eager holds the [N, V] float32 logits, their log-softmax and their gradient at once (the
    # resident-memory method is meaningful from about a megabyte: the largest V, 2 MB of logits)
    assert float(by["torch", Vs[-1]]["peak_mb"]) >= 2 * N * Vs[-1] * 4 / 2**20
    for V in Vs:
        for peer, what in (("cce_torch_compile", "Cut Cross-Entropy"), ("liger", "Liger-Kernel")):
            r = by[peer, V]
            assert r["note"].startswith(f"skipped: {what} is not installed") and r["time_ms"] == ""
    assert "skipped" in out and "Liger-Kernel is not installed" in out and "machine:" in out
    w, h = _png_size(tmp_path / "bench_quick_cpu.png")
    assert w >= 800 and h >= 400 and os.path.getsize(tmp_path / "bench_quick_cpu.png") > 20_000
    import matplotlib.image

    img = matplotlib.image.imread(tmp_path / "bench_quick_cpu.png")
    assert img.shape[:2] == (h, w) and img[..., :3].std() > 0.05  # drawn on, not a blank canvas


def test_bench_csv_option_as_the_scripts_use_it(tmp_path):
    # benchmarks/gpu_check.sh's form: explicit kinds, shape, impls and --csv, each case in fresh processes
    # (run_case, as benchmarks/bench_cpu*.py through compare()): that CSV only, no PNG
    path = tmp_path / "ce.csv"
    bench.main(["--kinds", "index", "--dtype", "float32", "--N", "64", "--V", "300", "--device", "cpu",
                "--impls", "torch", "--reps", "1", "--warmup", "0", "--threads", "1", "--csv", str(path)])
    rows = _read_csv(path)
    assert [(r["impl"], r["kind"], r["V"], r["N"], r["dtype"]) for r in rows] == [("torch", "index", "300", "64",
                                                                                    "float32")]
    assert float(rows[0]["time_ms"]) > 0 and rows[0]["time_ratio"] == "1"
    assert os.listdir(tmp_path) == ["ce.csv"]


@pytest.mark.parametrize("args, says", [
    (["--V", "4k"], "--V '4k'"),
    (["--kinds", "linear"], "add --H"),
    (["--impls", "torch,ligr"], "unknown impl 'ligr'"),
    (["--kinds", "index:fwd"], "'index:fwd' is not a kind"),
    (["--N", "0"], "--N 0"),
    (["--threads", "0"], "--threads 0"),
])
def test_bench_bad_input_names_value_and_fix(args, says, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert says in err and ("e.g." in err or "use" in err)


@pytest.fixture
def no_measuring(monkeypatch):
    """Every function of ``crossent bench`` that measures or writes, replaced by one that records its
    call (and measures nothing): a bad output path must stop the command before any of them runs."""
    calls = []
    for name in ("sweep", "run_case", "_sweep_process", "_worker", "write_csv", "plot"):
        monkeypatch.setattr(bench, name, lambda *a, _name=name, **k: calls.append(_name) or [])
    return calls


def _bad_path_cases(tmp_path):
    folder, file = tmp_path / "a_folder", tmp_path / "a_file.csv"
    folder.mkdir()
    file.write_text("")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "bench_quick_cpu.png").mkdir()  # where --out-dir full would put the plot
    return {
        "csv is a folder": (["--csv", str(folder)], f"--csv {folder} is an existing folder"),
        "out-dir is a file": (["--out-dir", str(file)], f"--out-dir {file} is an existing file"),
        "png is a folder": (["--png", str(folder)], f"--png {folder} is an existing folder"),
        "csv under a file": (["--csv", str(file / "sub" / "r.csv")], f"cannot be created: {file} is a file"),
        "out-dir under a file": (["--out-dir", str(file / "res")], f"cannot be created: {file} is a file"),
        "out-dir holds a folder named as the plot": (["--out-dir", str(tmp_path / "full")],
                                                     f"its PNG {tmp_path / 'full' / 'bench_quick_cpu.png'} is an "
                                                     "existing folder"),
        "csv and png the same file": (["--csv", str(tmp_path / "r"), "--png", str(tmp_path / "r")],
                                      "--csv and --png both name"),
    }


@pytest.mark.parametrize("case", ["csv is a folder", "out-dir is a file", "png is a folder", "csv under a file",
                                  "out-dir under a file", "out-dir holds a folder named as the plot",
                                  "csv and png the same file"])
def test_bench_bad_output_path_stops_before_measuring(case, tmp_path, no_measuring, capsys):
    args, says = _bad_path_cases(tmp_path)[case]
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--quick", *args])  # `crossent bench --quick ...`
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("crossent bench: error: ") and says in err
    assert "; pass" in err or "; remove" in err  # ... and the fix
    assert no_measuring == []  # nothing measured, nothing written


def test_bench_unwritable_output_path_is_refused(tmp_path, monkeypatch, no_measuring, capsys):
    # permissions cannot be tested by chmod as root: the folder is made unwritable to os.access instead
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(bench.os, "access", lambda p, mode: os.path.abspath(p) != str(locked) and real(p, mode))
    for args, says in ((["--csv", str(locked / "new" / "r.csv")], f"the folder {locked} is not writable"),
                       (["--out-dir", str(locked)], f"--out-dir {locked} is not writable")):
        with pytest.raises(SystemExit) as e:
            cli.main(["bench", "--quick", *args])
        assert e.value.code == 2 and says in capsys.readouterr().err
    assert no_measuring == []


def test_bench_good_output_paths_still_measure(tmp_path, no_measuring):
    # a folder that does not exist yet is fine (write_csv and plot make it), as before
    out = tmp_path / "new" / "deeper"
    cli.main(["bench", "--quick", "--out-dir", str(out)])
    assert no_measuring == ["sweep", "write_csv", "plot"] and not out.exists()  # (write_csv is stubbed here)
    no_measuring.clear()
    cli.main(["bench", "--quick", "--csv", str(tmp_path / "a" / "r.csv"), "--png", str(tmp_path / "r.png")])
    assert no_measuring == ["sweep", "write_csv", "plot"]


def test_bench_cli_refuses_a_folder_as_csv_before_running(tmp_path):
    # the real command in its own process (the report: IsADirectoryError after the whole benchmark; the
    # default benchmark takes minutes, so the time limit below fails a run that measures first)
    folder, file = tmp_path / "results", tmp_path / "x.csv"
    folder.mkdir()
    file.write_text("")
    for args, says in ((["--csv", str(folder)], f"--csv {folder} is an existing folder, not a file"),
                       (["--out-dir", str(file)], f"--out-dir {file} is an existing file, not a folder")):
        proc = subprocess.run([sys.executable, "-m", "crossent", "bench", "--device", "cpu", *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert says in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(folder) == [] and file.read_text() == ""


def test_skip_reasons_name_the_cause(monkeypatch):
    monkeypatch.setattr(bench, "_installed", lambda m: True)  # as if every peer were installed
    assert bench.skip_reason("cce_torch_compile", "index", "cpu").endswith("(--kinds linear)")
    assert "need CUDA" in bench.skip_reason("cce_cce", "linear", "cpu")
    assert "need CUDA" in bench.skip_reason("liger", "index", "cpu")
    assert bench.skip_reason("cce_torch_compile", "linear", "cpu") is None
    assert "inplace_backward" in bench.skip_reason("auto_inplace", "linear", "cpu")
    assert bench.skip_reason("torch", "linear", "cpu") is None
    assert bench.resolve_impl("cce", "cpu") == "cce_torch_compile" and bench.resolve_impl("cce", "cuda") == "cce_cce"


# --------------------------------------------------------------------------- crossent demo, language model

from crossent.tools import demo_lm  # noqa: E402


@pytest.fixture(scope="module")
def small_corpus():
    return demo_lm.load_data(vocab_size=512, max_bytes=300_000)


@pytest.fixture
def one_thread():
    # on a CPU shared with other processes, two OpenMP threads that wait on each other take many
    # times longer than one: the training tests run single-threaded
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_tokenizer_round_trips_the_corpus(small_corpus):
    text, _ = demo_lm.stdlib_corpus(300_000)
    tok = small_corpus.tokenizer
    assert tok.vocab_size == 512 and len(set(tok.pieces)) == 256
    assert tok.decode(small_corpus.ids) == text
    sample = "def f(x):\n\tréturn x  # ünïcode ✓\n"
    assert tok.decode(tok.encode(sample)) == sample


def test_lm_losses_equal_with_and_without_logits(small_corpus, one_thread):
    kw = dict(steps=5, batch=4, context=32, seed=3)
    a, b = demo_lm.train_lms(["logits", "linear"], small_corpus, **kw)
    V = small_corpus.tokenizer.vocab_size
    assert len(a.losses) == len(b.losses) == len(a.check) == 5 and (a.loss, b.loss) == ("logits", "linear")
    # an untrained model's small logits give about log V; training lowers it
    assert a.losses[0] == pytest.approx(math.log(V), rel=0.1) and a.losses[-1] < a.losses[0]
    # the same weights and hidden states: linear_cross_entropy gives F.cross_entropy's loss
    assert a.check == pytest.approx(a.losses, rel=1e-6)
    # the same model, data and optimizer: the loss curves agree to float32 rounding, compounded
    assert b.losses[0] == pytest.approx(a.losses[0], rel=1e-6)
    assert b.losses == pytest.approx(a.losses, rel=1e-4)
    assert a.peak_bytes >= 2 * 4 * 32 * V * 4  # the logits and their log-softmax exist at once
    # a run alone is the same run; another seed is another run, which the comparison above tells apart
    assert demo_lm.train_lm("linear", small_corpus, **kw, measure_memory=False).losses == b.losses
    c = demo_lm.train_lm("linear", small_corpus, **{**kw, "seed": 4}, measure_memory=False)
    assert c.losses != pytest.approx(a.losses, rel=1e-4)


def test_loss_memory_with_and_without_logits(one_thread):
    g = torch.Generator().manual_seed(0)
    B, T, D, V = 8, 256, 64, 8192
    h, w = torch.randn(B, T, D, generator=g), torch.randn(V, D, generator=g) / 8
    ids = torch.randint(0, V, (B, T), generator=g)
    logits = B * T * V * 4  # 64 MB
    grads = (B * T * D + V * D) * 4  # of h and of the head weight, returned by both
    assert demo_lm.loss_peak_bytes("logits", h, w, ids) >= 2 * logits + grads
    # the logits exist a chunk of rows at a time
    assert grads <= demo_lm.loss_peak_bytes("linear", h, w, ids) < logits / 4


def test_peak_alloc_bytes_counts_what_a_step_allocates():
    def step():
        a = torch.empty(1 << 20)  # 4 MiB
        b = torch.empty(1 << 19)  # 2 MiB, both alive
        del a, b
        c = torch.empty(1 << 20)  # 4 MiB, after both were freed
        del c

    assert demo_lm.peak_alloc_bytes(step) == 6 << 20


def test_demo_lm_part_prints_both_losses_and_memory(capsys, one_thread):
    cli.main(["demo", "--part", "lm", "--lm-seconds", "1", "--lm-vocab", "300"])
    out = capsys.readouterr().out
    assert "run 1:" in out and "run 2:" in out and "F.cross_entropy" in out and "crossent.linear_" in out
    assert "On the same weights and hidden states the two losses agree to" in out
    assert "peak memory of the output layer + loss" in out and out.count(" MB with ") >= 1
    assert "handwritten digits" not in out  # --part lm runs the language model alone


def test_demo_bad_input_names_value_and_fix(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--lm-vocab", "100"])
    assert "--lm-vocab 100" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--lm-seconds", "-1"])
    assert "'-1' must be positive" in capsys.readouterr().err
