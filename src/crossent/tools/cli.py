"""``crossent demo``, ``crossent bench``, ``crossent info``."""

from __future__ import annotations

import argparse

import time
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

import crossent


def _attempt(fn: Callable[[], object]) -> str:
    """What a call says: its loss, or its error (type and first line)."""
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - showing what each library says is the point
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"[red]{type(e).__name__}[/red]: {first}"
    if isinstance(out, list):
        return "\n".join(f"[yellow]finding[/yellow]: {f}" for f in out) or "no finding"
    return f"loss {float(out):.4f}"


def seed_example_rows():
    """(case, what PyTorch says, what crossent says) for the seed example and its common mistakes."""
    torch.manual_seed(0)
    # four images: no dog nor cat, dog, cat, cat
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [-0.4, 0.2, 2.2], [0.0, 0.0, 0.5]])
    idx = torch.tensor([0, 1, 2, 2])
    one_hot = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]])
    w = torch.tensor([0.2, 1.0, 3.0])
    btc = torch.randn(2, 5, 10)
    bt = torch.randint(0, 10, (2, 5))
    rows = [
        ("indices [0, 1, 2, 2]", lambda: F.cross_entropy(logits, idx), lambda: crossent.cross_entropy(logits, idx)),
        ("one-hot rows (int64)", lambda: F.cross_entropy(logits, one_hot),
         lambda: crossent.cross_entropy(logits, one_hot)),
        ("one-hot rows (float) + class weights", lambda: F.cross_entropy(logits, one_hot.float(), w),
         lambda: crossent.cross_entropy(logits, one_hot.float(), w, target_format="one_hot")),
        ("...same, what indices give", lambda: F.cross_entropy(logits, idx, w),
         lambda: crossent.cross_entropy(logits, idx, w)),
        ("[B, T, C] logits, [B, T] targets", lambda: F.cross_entropy(btc, bt),
         lambda: crossent.cross_entropy(btc, bt)),
        ("...with dim=-1", lambda: F.cross_entropy(btc.transpose(1, 2), bt),
         lambda: crossent.cross_entropy(btc, bt, dim=-1)),
        ("label 3 with 3 classes", lambda: F.cross_entropy(logits, torch.tensor([0, 1, 3, 2])),
         lambda: crossent.cross_entropy(logits, torch.tensor([0, 1, 3, 2]))),
        ("padding -1, ignore_index left at -100", lambda: F.cross_entropy(logits, torch.tensor([0, 1, -1, 2])),
         lambda: crossent.cross_entropy(logits, torch.tensor([0, 1, -1, 2]))),
        ("float labels [0., 1., 2., 2.]", lambda: F.cross_entropy(logits, idx.float()),
         lambda: crossent.cross_entropy(logits, idx.float())),
        ("softmax applied before the loss", lambda: F.cross_entropy(logits.softmax(1), idx),
         lambda: crossent.diagnose(logits.softmax(1), idx)),
    ]
    return [(case, _attempt(a), _attempt(b)) for case, a, b in rows]


def train_digits(epochs: int = 40, progress: bool = True, seed: int = 0) -> float:
    """A small MLP on scikit-learn's bundled handwritten digits, trained with
    one-hot targets and label smoothing through ``crossent.CrossEntropyLoss``.
    Returns the test accuracy."""
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    n_test = len(y) // 5
    Xtr, ytr, Xte, yte = X[n_test:], y[n_test:], X[:n_test], y[:n_test]
    one_hot = F.one_hot(ytr, 10)  # int64 one-hot rows: PyTorch would reject these
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    loss_fn = crossent.CrossEntropyLoss(label_smoothing=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batches = [(Xtr[i:i + 64], one_hot[i:i + 64]) for i in range(0, len(ytr), 64)]

    def run_epoch() -> float:
        total = 0.0
        for xb, tb in batches:
            opt.zero_grad()
            loss = loss_fn(model(xb), tb)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(xb)
        return total / len(ytr)

    if progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("[bold]training[/bold]"), BarColumn(), TextColumn("epoch {task.completed}/{task.total}"),
                      TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn()) as bar:
            task = bar.add_task("train", total=epochs, loss=float("nan"))
            for _ in range(epochs):
                bar.update(task, advance=1, loss=run_epoch())
    else:
        for _ in range(epochs):
            run_epoch()
    with torch.no_grad():
        return float((model(Xte).argmax(1) == yte).float().mean())


def demo(epochs: int = 40, part: str = "all", lm_seconds: float = 50.0, lm_vocab: int = 4096) -> None:
    """``crossent demo``: the seed example beside PyTorch and a classifier trained with one-hot
    targets (part ``"classifier"``), then a small language model trained twice, with
    materialised logits and with ``linear_cross_entropy`` (part ``"lm"``,
    :func:`crossent.tools.demo_lm.lm_demo`).

    Args:
        epochs (int): epochs of the classifier. Default: 40.
        part (str): ``"all"`` | ``"classifier"`` | ``"lm"``. Default: ``"all"``.
        lm_seconds (float): the language model's time budget, both runs together. Default: 50.
        lm_vocab (int): the language model's vocabulary size. Default: 4096.
    """
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if part in ("all", "classifier"):
        console.rule("[bold]crossent demo: the loss[/bold]")
        console.print("Four images -- no dog nor cat, dog, cat, cat -- as logits [4, 3], and the usual ways to "
                      "hand the labels to a cross-entropy loss:\n")
        table = Table(show_lines=True)
        table.add_column("case", style="bold")
        table.add_column("torch.nn.functional.cross_entropy")
        table.add_column("crossent.cross_entropy")
        for case, theirs, ours in seed_example_rows():
            table.add_row(case, theirs, ours)
        console.print(table)
        console.print("\nTraining a small classifier on scikit-learn's handwritten digits (1797 images, 8x8), "
                      "one-hot targets, label smoothing 0.1, crossent.CrossEntropyLoss:")
        t0 = time.perf_counter()
        acc = train_digits(epochs)
        console.print(f"test accuracy: [bold green]{acc:.1%}[/bold green]  ({time.perf_counter() - t0:.1f} s)")
    if part in ("all", "lm"):
        from .demo_lm import lm_demo

        console.print()
        console.rule("[bold]crossent demo: a language model without its logits[/bold]")
        console.print("A small language model trained twice from the same seed on the same batches: once with "
                      "materialised logits (torch.nn.functional.cross_entropy on head(h)), once with "
                      "crossent.linear_cross_entropy(h, head.weight, tokens, shift=True).")
        lm_demo(lm_seconds, lm_vocab, console=console)


def info() -> None:
    from rich.console import Console
    from rich.table import Table

    from ..config import CONFIG
    from ..impl.registry import explain, resolve
    from .machine import machine

    t = Table(title=f"crossent {crossent.__version__}")
    t.add_column("")
    t.add_column("")
    t.add_row("machine", machine())
    t.add_row("torch", torch.__version__)
    t.add_row("CUDA", torch.cuda.get_device_name() if torch.cuda.is_available() else "not available")
    try:
        import triton

        t.add_row("triton", triton.__version__)
    except Exception:  # noqa: BLE001
        t.add_row("triton", "not installed (pip install 'crossent[triton]')")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    auto = resolve("auto", dev, torch.float32)
    t.add_row("impl='auto' here", f"{auto.name}: {auto.reason}")
    t.add_row(f"impls on {dev.type}", "\n".join(explain(dev)))
    t.add_row("value checks", "on" if crossent.checks_enabled() else "off (CROSSENT_CHECKS=0)")
    t.add_row("knobs (crossent.config)", ", ".join(f"{k}={v}" for k, v in vars(CONFIG).items()
                                                   if not k.endswith("_configs")))
    Console().print(t)


def _positive(kind: type, what: str):
    """An argparse type: a positive ``kind`` (int or float), with an error naming the value and the fix."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}: "
                                             f"pass {what}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive: pass {what}")
        return v

    return parse


def main(argv: Optional[List[str]] = None) -> None:
    """The ``crossent`` command: ``demo``, ``info`` and ``bench`` (``crossent bench --help``)."""
    ap = argparse.ArgumentParser(prog="crossent", description="A drop-in cross-entropy for PyTorch.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the seed example beside PyTorch, a short classifier run, then a small "
                       "language model trained with and without its logits",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--part", choices=("all", "classifier", "lm"), default="all",
                   help="which part to run: the seed example and classifier, the language model, or both")
    d.add_argument("--epochs", type=_positive(int, "a number of epochs, e.g. --epochs 40"), default=40,
                   help="epochs of the digits classifier")
    d.add_argument("--lm-seconds", type=_positive(float, "a time budget in seconds, e.g. --lm-seconds 50"),
                   default=50.0, help="time budget of the language model, both runs together (the second run "
                   "takes as many steps as the first made in half of it)")
    d.add_argument("--lm-vocab", type=_positive(int, "a vocabulary size of at least 257, e.g. --lm-vocab 4096"),
                   default=4096, help="vocabulary of the language model: the 256 bytes + the most frequent words")
    d.add_argument("--threads", type=_positive(int, "a number of threads, e.g. --threads 1"), default=None,
                   help="torch's CPU threads (default: torch's own choice; on a CPU shared with other work, 1 "
                   "avoids threads that wait on each other)")
    sub.add_parser("info", help="versions, devices and the impl 'auto' picks")
    sub.add_parser("bench", help="time and peak memory beside PyTorch and peers, as a table, CSV and plot "
                   "(crossent bench --help)", add_help=False)
    args, rest = ap.parse_known_args(argv)
    if args.cmd == "bench":
        from .bench import main as bench_main

        bench_main(rest)
        return
    if rest:
        ap.error(f"unrecognized arguments for 'crossent {args.cmd}': {' '.join(rest)} "
                 f"(see crossent {args.cmd} --help)")
    if args.cmd == "demo":
        if args.lm_vocab < 257:
            d.error(f"--lm-vocab {args.lm_vocab}: the 256 bytes take the first ids; pass at least 257, "
                    "e.g. --lm-vocab 4096")
        if args.threads:
            torch.set_num_threads(args.threads)
        demo(args.epochs, args.part, args.lm_seconds, args.lm_vocab)
    else:
        info()


if __name__ == "__main__":
    main()
