"""The language-model part of ``crossent demo``: a small transformer over a
word-and-byte vocabulary, trained on the Python standard library's own source
files, once with materialised logits and once with
:func:`crossent.linear_cross_entropy`, from the same seed.

The corpus is on every machine that runs Python: the ``*.py`` files next to
``os.py``, read in sorted order. The vocabulary is the 256 bytes plus the most
frequent identifiers, numbers, indentation runs and punctuation of the corpus;
anything else is spelled in bytes, so every text can be encoded.

Peak memory is measured on one batch, for the output layer and the loss alone
(forward and backward, starting from detached hidden states): the bytes of the
tensors torch allocates, read from the allocation events of
:mod:`torch.profiler` (``profile_memory=True``), beyond those alive before the
step. The gradients of the hidden states and of the head weight, which both
variants return, are included.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import crossent

#: identifiers, numbers, runs of spaces (indentation), runs of newlines, then any other character
_TOKEN = re.compile(r"[A-Za-z_]\w*|\d+| +|\n+|\S|\s")

LOSSES = ("logits", "linear")
LOSS_NAMES = {"logits": "F.cross_entropy(head(h))", "linear": "crossent.linear_cross_entropy"}


def stdlib_corpus(max_bytes: int = 2_000_000) -> Tuple[str, int]:
    """Text of the standard library's top-level ``*.py`` files, in sorted order.

    Args:
        max_bytes (int): stop reading once this many characters are read. Default: 2 MB.

    Returns:
        ``(text, files)``: the text and the number of files it came from.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes}: pass a positive number of characters, e.g. 2_000_000")
    root = os.path.dirname(os.__file__)
    parts, size = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        parts.append(text[: max_bytes - size])
        size += len(parts[-1])
        if size >= max_bytes:
            break
    if not parts:
        raise RuntimeError(f"no *.py files found under {root}: the demo's corpus is the standard library's source")
    return "".join(parts), len(parts)


class Tokenizer:
    """Words, numbers, indentation runs and punctuation from a corpus, with byte fallback.

    Ids ``0..255`` are the bytes; ids ``256..`` are the ``vocab_size - 256`` most
    frequent pieces of ``text`` (ties broken by the piece, so the vocabulary is
    deterministic). A piece outside the vocabulary is encoded as its UTF-8 bytes.

    Args:
        text (str): the corpus to count pieces in.
        vocab_size (int): number of ids, at least 257.
    """

    def __init__(self, text: str, vocab_size: int):
        if vocab_size < 257:
            raise ValueError(f"vocab_size={vocab_size}: the 256 bytes take the first ids; pass at least 257")
        counts = collections.Counter(_TOKEN.findall(text))
        pieces = sorted((p for p in counts if len(p.encode()) > 1), key=lambda p: (-counts[p], p))
        self.pieces: List[str] = pieces[: vocab_size - 256]
        self.ids: Dict[str, int] = {p: 256 + i for i, p in enumerate(self.pieces)}
        self.vocab_size = 256 + len(self.pieces)

    def encode(self, text: str) -> torch.Tensor:
        """The ids of ``text`` as an int64 tensor."""
        out: List[int] = []
        ids = self.ids
        for piece in _TOKEN.findall(text):
            i = ids.get(piece)
            if i is None:
                out.extend(piece.encode())
            else:
                out.append(i)
        return torch.tensor(out, dtype=torch.int64)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (bytes that do not form UTF-8 are replaced)."""
        buf = bytearray()
        for i in ids:
            i = int(i)
            buf.extend(bytes([i]) if i < 256 else self.pieces[i - 256].encode())
        return buf.decode("utf-8", errors="replace")


class TinyLM(torch.nn.Module):
    """A causal transformer: token and position embeddings, pre-norm encoder
    layers with a causal mask, a final norm and a bias-free output layer.

    Args:
        vocab_size (int): number of token ids (rows of ``head.weight``).
        dim (int): embedding width. Default: 128.
        layers (int): transformer layers. Default: 2.
        heads (int): attention heads. Default: 4.
        context (int): longest sequence. Default: 128.
    """

    def __init__(self, vocab_size: int, dim: int = 128, layers: int = 2, heads: int = 4, context: int = 128):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab_size, dim)
        self.pos = torch.nn.Embedding(context, dim)
        layer = torch.nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True,
                                                 norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab_size, bias=False)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[B, T, dim]`` of token ids ``[B, T]``, before the output layer."""
        T = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(T, device=ids.device))
        mask = torch.nn.Transformer.generate_square_subsequent_mask(T, device=ids.device)
        return self.norm(self.blocks(x, mask=mask, is_causal=True))


def lm_loss(which: str, h: torch.Tensor, head_weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token loss of hidden states ``h [B, T, D]`` against ``ids [B, T]``.

    ``which="logits"`` builds the ``[B, T, V]`` logits and calls
    ``torch.nn.functional.cross_entropy`` on the shifted positions, as a model's
    own training loss does; ``which="linear"`` calls
    ``crossent.linear_cross_entropy(h, head_weight, ids, shift=True)``, which never
    builds them. Both are the mean over the ``B * (T - 1)`` predicted positions.
    """
    if which == "logits":
        V = head_weight.shape[0]
        logits = h @ head_weight.t()
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    if which == "linear":
        return crossent.linear_cross_entropy(h, head_weight, ids, shift=True)
    raise ValueError(f"loss {which!r}: use one of {LOSSES}")


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the C-level stderr (the profiler's start/stop lines) for the block."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def peak_alloc_bytes(step: Callable[[], None]) -> Optional[int]:
    """Peak bytes of CPU tensors allocated by ``step()`` beyond those alive when it starts.

    The running sum of torch's allocation and free events, in time order, from
    :mod:`torch.profiler` with ``profile_memory=True``. Returns ``None`` where the
    profiler gives no allocation events.
    """
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:  # pragma: no cover - older torch
        return None
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and torch.device(e.extra_fields.device).type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
    if not events:
        return None
    events.sort()
    now = peak = 0
    for _, size in events:
        now += size
        peak = max(peak, now)
    return peak


def loss_peak_bytes(which: str, h: torch.Tensor, head_weight: torch.Tensor, ids: torch.Tensor) -> Optional[int]:
    """Peak memory of the output layer + loss, forward and backward, on one batch
    (see :func:`peak_alloc_bytes`). ``h`` is detached first; ``head_weight``'s
    ``.grad`` is cleared so that its gradient is allocated as in a fresh step."""
    h = h.detach().requires_grad_(True)
    w = head_weight.detach().requires_grad_(True)

    def step():
        lm_loss(which, h, w, ids).backward()

    return peak_alloc_bytes(step)


@dataclass
class LMRun:
    """One training run: the loss of each step, the seconds of each step, and
    the loss's peak memory (bytes, ``None`` if unmeasured)."""

    loss: str
    losses: List[float] = field(default_factory=list)
    step_seconds: List[float] = field(default_factory=list)
    peak_bytes: Optional[int] = None


@dataclass
class LMData:
    """Token ids of the corpus, with its tokenizer and a description."""

    ids: torch.Tensor
    tokenizer: Tokenizer
    files: int
    chars: int


def load_data(vocab_size: int = 8192, max_bytes: int = 2_000_000) -> LMData:
    """The stdlib corpus (:func:`stdlib_corpus`) tokenized with a vocabulary of ``vocab_size``."""
    text, files = stdlib_corpus(max_bytes)
    tok = Tokenizer(text, vocab_size)
    return LMData(tok.encode(text), tok, files, len(text))


def train_lm(which: str, data: LMData, *, steps: Optional[int] = None, seconds: Optional[float] = None,
             batch: int = 16, context: int = 128, dim: int = 128, layers: int = 2, lr: float = 3e-3,
             seed: int = 0, on_step: Optional[Callable[[int, float], None]] = None,
             measure_memory: bool = True) -> LMRun:
    """Train :class:`TinyLM` with loss ``which`` (see :func:`lm_loss`).

    The model's initial weights and the batches (random windows of ``context``
    tokens) depend only on ``seed``, so two runs with different losses see the
    same model and data; their losses agree up to float32 rounding.

    Args:
        which (str): ``"logits"`` or ``"linear"``.
        data (LMData): from :func:`load_data`.
        steps (int, optional): number of steps. One of ``steps`` and ``seconds`` is needed.
        seconds (float, optional): train until this many seconds have passed
            (at least one step), when ``steps`` is not given.
        batch, context, dim, layers (int): the batch and model shape.
        lr (float): AdamW learning rate. Default: 3e-3.
        seed (int): seed of the weights and the batches. Default: 0.
        on_step (callable, optional): called as ``on_step(step, loss)`` after each step.
        measure_memory (bool): measure the loss's peak memory on one more batch
            after training (:func:`loss_peak_bytes`). Default: ``True``.
    """
    if which not in LOSSES:
        raise ValueError(f"loss {which!r}: use one of {LOSSES}")
    if steps is None and seconds is None:
        raise ValueError("train_lm needs steps= or seconds=")
    if steps is not None and steps < 1:
        raise ValueError(f"steps={steps}: pass at least 1")
    if data.ids.numel() <= context + 1:
        raise ValueError(f"the corpus has {data.ids.numel()} tokens, fewer than context={context} + 1: "
                         "read more text (max_bytes) or shorten the context")
    V = data.tokenizer.vocab_size
    torch.manual_seed(seed)
    model = TinyLM(V, dim, layers, context=context)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    run = LMRun(which)
    offsets = torch.arange(context)
    t_end = None if steps is not None else time.perf_counter() + seconds

    def batch_ids() -> torch.Tensor:
        starts = torch.randint(0, data.ids.numel() - context, (batch, 1), generator=gen)
        return data.ids[starts + offsets]

    step = 0
    while (step < steps) if steps is not None else (step == 0 or time.perf_counter() < t_end):
        ids = batch_ids()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(which, model.hidden(ids), model.head.weight, ids)
        loss.backward()
        opt.step()
        run.step_seconds.append(time.perf_counter() - t0)
        run.losses.append(float(loss.detach()))
        step += 1
        if on_step:
            on_step(step, run.losses[-1])
    if measure_memory:
        ids = batch_ids()
        with torch.no_grad():
            h = model.hidden(ids)
        run.peak_bytes = loss_peak_bytes(which, h, model.head.weight, ids)
    return run


def _mb(b: Optional[int]) -> str:
    return "unmeasured" if b is None else f"{b / 2**20:.1f} MB"


def lm_demo(seconds: float = 60.0, vocab_size: int = 8192, max_bytes: int = 2_000_000, console=None,
            batch: int = 16, context: int = 128) -> Tuple[LMRun, LMRun]:
    """The demo's second part: train twice, print both loss curves and both peak memories.

    The first run (materialised logits) trains for ``seconds / 2``; the second
    (``linear_cross_entropy``) for the same number of steps.

    Returns:
        ``(logits_run, linear_run)``.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    if seconds <= 0:
        raise ValueError(f"seconds={seconds}: pass a positive time budget, e.g. --lm-seconds 60")
    console = console or Console()
    t0 = time.perf_counter()
    data = load_data(vocab_size, max_bytes)
    V = data.tokenizer.vocab_size
    console.print(f"Corpus: the standard library's own source, {data.files} files of "
                  f"{os.path.dirname(os.__file__)}, {data.chars / 1e6:.1f} M characters -> {data.ids.numel():,} "
                  f"tokens (vocabulary {V}: 256 bytes + the most frequent words, numbers, indents and symbols), "
                  f"read in {time.perf_counter() - t0:.1f} s.")
    console.print(f"Model: 2-layer causal transformer, width 128, batch {batch} x {context} tokens, AdamW; "
                  f"the [{batch}, {context}, {V}] float32 logits alone are "
                  f"{batch * context * V * 4 / 2**20:.0f} MB.\n")

    runs: List[LMRun] = []
    with Progress(TextColumn("[bold]{task.description}[/bold]"), BarColumn(),
                  TextColumn("step {task.completed}"), TextColumn("loss {task.fields[loss]:.4f}"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        budget = seconds / 2
        task = bar.add_task(LOSS_NAMES["logits"], total=None, loss=float("nan"))
        runs.append(train_lm("logits", data, seconds=budget, batch=batch, context=context,
                             on_step=lambda s, l: bar.update(task, completed=s, loss=l)))
        n = len(runs[0].losses)
        task = bar.add_task(LOSS_NAMES["linear"], total=n, loss=float("nan"))
        runs.append(train_lm("linear", data, steps=n, batch=batch, context=context,
                             on_step=lambda s, l: bar.update(task, completed=s, loss=l)))
    a, b = runs
    n = len(a.losses)
    table = Table(title="same seed, same batches: the loss at each step")
    table.add_column("step", justify="right")
    table.add_column(LOSS_NAMES["logits"], justify="right")
    table.add_column(LOSS_NAMES["linear"], justify="right")
    table.add_column("|difference|", justify="right")
    shown = sorted({1, n} | {s for s in range(1, n + 1) if s % max(1, n // 8) == 0})
    for s in shown:
        x, y = a.losses[s - 1], b.losses[s - 1]
        table.add_row(str(s), f"{x:.6f}", f"{y:.6f}", f"{abs(x - y):.1e}")
    console.print(table)
    worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a.losses, b.losses))
    console.print(f"largest relative difference over all {n} steps: {worst:.1e} (float32 rounding)")
    ms = [1e3 * sorted(r.step_seconds)[len(r.step_seconds) // 2] for r in runs]
    console.print(f"median step: {ms[0]:.0f} ms with materialised logits, {ms[1]:.0f} ms with "
                  f"linear_cross_entropy (whole step: model, loss, optimizer; CPU, noisy)")
    ratio = (f" ({b.peak_bytes / a.peak_bytes:.2f}x)" if a.peak_bytes and b.peak_bytes is not None else "")
    console.print(f"peak memory of the output layer + loss, forward and backward, one batch: "
                  f"[bold]{_mb(a.peak_bytes)}[/bold] with materialised logits, "
                  f"[bold green]{_mb(b.peak_bytes)}[/bold green] with linear_cross_entropy{ratio}")
    console.print("  (bytes of the tensors torch allocates during the step beyond those alive before it, from "
                  "torch.profiler's allocation events; both include the hidden-state and head-weight gradients, "
                  f"{(batch * context * 128 + V * 128) * 4 / 2**20:.1f} MB)")
    return a, b
