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
    profiler gives no allocation events (the event tree is not public API, and
    another torch version may lay it out differently).
    """
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:  # pragma: no cover - older torch
        return None
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = []
    try:
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            e = stack.pop()
            stack.extend(e.children)
            if e.tag == _EventType.Allocation and torch.device(e.extra_fields.device).type == "cpu":
                events.append((e.start_time_ns, e.extra_fields.alloc_size))
    except (AttributeError, RuntimeError, TypeError):  # pragma: no cover - another profiler layout
        return None
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
    (see :func:`peak_alloc_bytes`). Detached copies of ``h`` and ``head_weight``
    (same storage) are the leaves, so both gradients are allocated as in a fresh step,
    and nothing before the output layer is counted."""
    h = h.detach().requires_grad_(True)
    w = head_weight.detach().requires_grad_(True)

    def step():
        lm_loss(which, h, w, ids).backward()

    return peak_alloc_bytes(step)


@dataclass
class LMRun:
    """One training run: the loss of each step, the seconds of each step, the
    loss's peak memory (bytes, ``None`` if unmeasured), and, for a run trained
    with materialised logits, ``check``: ``linear_cross_entropy`` evaluated on
    the same hidden states and weights at each step."""

    loss: str
    losses: List[float] = field(default_factory=list)
    step_seconds: List[float] = field(default_factory=list)
    peak_bytes: Optional[int] = None
    check: List[float] = field(default_factory=list)


@dataclass
class LMData:
    """Token ids of the corpus, with its tokenizer and a description."""

    ids: torch.Tensor
    tokenizer: Tokenizer
    files: int
    chars: int


def load_data(vocab_size: int = 4096, max_bytes: int = 2_000_000) -> LMData:
    """The stdlib corpus (:func:`stdlib_corpus`) tokenized with a vocabulary of ``vocab_size``."""
    text, files = stdlib_corpus(max_bytes)
    tok = Tokenizer(text, vocab_size)
    return LMData(tok.encode(text), tok, files, len(text))


def train_lms(whiches: Sequence[str], data: LMData, *, steps: Optional[int] = None, seconds: Optional[float] = None,
              batch: int = 16, context: int = 128, dim: int = 128, layers: int = 2, lr: float = 3e-3,
              seed: int = 0, on_step: Optional[Callable[[int, List[float]], None]] = None,
              measure_memory: bool = True) -> List[LMRun]:
    """Train one :class:`TinyLM` per loss in ``whiches`` (see :func:`lm_loss`), in lockstep.

    Every model starts from the same weights (``seed``) and sees the same
    batches (random windows of ``context`` tokens, also from ``seed``); step
    ``k`` of each run is taken before step ``k + 1`` of any, so all runs have
    the same number of steps and share the machine's load alike. A run with
    ``"logits"`` also records, at each step, ``linear_cross_entropy`` on its
    own hidden states and weights (``LMRun.check``, no gradient).

    Args:
        whiches (sequence of str): ``"logits"`` and/or ``"linear"``.
        data (LMData): from :func:`load_data`.
        steps (int, optional): number of steps. One of ``steps`` and ``seconds`` is needed.
        seconds (float, optional): when ``steps`` is not given, take steps until
            this many seconds have passed (at least one).
        batch, context, dim, layers (int): the batch and model shape.
        lr (float): AdamW learning rate. Default: 3e-3.
        seed (int): seed of the weights and the batches. Default: 0.
        on_step (callable, optional): ``on_step(step, losses)`` after each step,
            with the loss of each run.
        measure_memory (bool): then measure each loss's peak memory on one
            more batch (:func:`loss_peak_bytes`). Default: ``True``.
    """
    for which in whiches:
        if which not in LOSSES:
            raise ValueError(f"loss {which!r}: use one of {LOSSES}")
    if steps is None and seconds is None:
        raise ValueError("train_lms needs steps= or seconds=")
    if steps is not None and steps < 1:
        raise ValueError(f"steps={steps}: pass at least 1")
    if data.ids.numel() <= context + 1:
        raise ValueError(f"the corpus has {data.ids.numel()} tokens, fewer than context={context} + 1: "
                         "read more text (max_bytes) or shorten the context")
    V = data.tokenizer.vocab_size
    models, opts = [], []
    for _ in whiches:
        torch.manual_seed(seed)
        models.append(TinyLM(V, dim, layers, context=context))
        opts.append(torch.optim.AdamW(models[-1].parameters(), lr=lr))
    gen = torch.Generator().manual_seed(seed)
    runs = [LMRun(which) for which in whiches]
    offsets = torch.arange(context)
    t_end = time.perf_counter() + (seconds or 0)

    def batch_ids() -> torch.Tensor:
        starts = torch.randint(0, data.ids.numel() - context, (batch, 1), generator=gen)
        return data.ids[starts + offsets]

    step = 0
    while step < steps if steps is not None else (step == 0 or time.perf_counter() < t_end):
        ids = batch_ids()
        for which, model, opt, run in zip(whiches, models, opts, runs):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            h = model.hidden(ids)
            loss = lm_loss(which, h, model.head.weight, ids)
            loss.backward()
            t1 = time.perf_counter()
            if which == "logits":  # the other loss on the same hidden states and weights (untimed)
                with torch.no_grad():
                    run.check.append(float(lm_loss("linear", h.detach(), model.head.weight.detach(), ids)))
            t2 = time.perf_counter()
            opt.step()
            run.step_seconds.append(time.perf_counter() - t2 + t1 - t0)
            run.losses.append(float(loss.detach()))
        step += 1
        if on_step:
            on_step(step, [r.losses[-1] for r in runs])
    if measure_memory:
        ids = batch_ids()
        for which, model, run in zip(whiches, models, runs):
            with torch.no_grad():
                h = model.hidden(ids)
            run.peak_bytes = loss_peak_bytes(which, h, model.head.weight, ids)
    return runs


def train_lm(which: str, data: LMData, **kwargs) -> LMRun:
    """One run of :func:`train_lms`."""
    return train_lms([which], data, **kwargs)[0]


def _mb(b: Optional[int]) -> str:
    return "unmeasured" if b is None else f"{b / 2**20:.1f} MB"


def lm_demo(seconds: float = 50.0, vocab_size: int = 4096, max_bytes: int = 2_000_000, console=None,
            batch: int = 16, context: int = 128) -> Tuple[LMRun, LMRun]:
    """The demo's second part: train with materialised logits and with
    ``linear_cross_entropy`` in lockstep for ``seconds`` (:func:`train_lms`), then
    print both loss curves and both peak memories (:func:`loss_peak_bytes`).

    Returns:
        ``(logits_run, linear_run)``.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    if seconds <= 0:
        raise ValueError(f"seconds={seconds}: pass a positive time budget, e.g. --lm-seconds 50")
    console = console or Console()
    t0 = time.perf_counter()
    data = load_data(vocab_size, max_bytes)
    V = data.tokenizer.vocab_size
    console.print(f"Corpus: the standard library's own source, {data.files} files of "
                  f"{os.path.dirname(os.__file__)}, {data.chars / 1e6:.1f} M characters -> {data.ids.numel():,} "
                  f"tokens (vocabulary {V}: the 256 bytes + the most frequent words, numbers, indents and "
                  f"symbols), read in {time.perf_counter() - t0:.1f} s.")
    console.print(f"Model: 2-layer causal transformer, width 128, batches of {batch} x {context} tokens, AdamW; "
                  f"its [{batch}, {context}, {V}] float32 logits alone are "
                  f"{batch * context * V * 4 / 2**20:.0f} MB. The two runs take their steps in turn, "
                  f"for {seconds:g} s.\n")
    with Progress(TextColumn("[bold]training both[/bold]"), BarColumn(),
                  TextColumn("step {task.completed}"),
                  TextColumn("loss {task.fields[a]:.4f} (logits) / {task.fields[b]:.4f} (linear)"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("train", total=None, a=float("nan"), b=float("nan"))
        a, b = train_lms(LOSSES, data, seconds=seconds, batch=batch, context=context,
                         on_step=lambda s, ls: bar.update(task, completed=s, a=ls[0], b=ls[1]))
        bar.update(task, total=len(a.losses))
    n = len(a.losses)
    console.print("run 1: F.cross_entropy(head(h)); run 2: crossent.linear_cross_entropy(h, head.weight, tokens, "
                  "shift=True); check: linear_cross_entropy on run 1's own h and head weight, at each step.",
                  highlight=False)
    table = Table(title="loss at each step: same initial weights, same batches")
    for col in ("step", "run 1", "run 2", "run 2 - run 1", "check - run 1"):
        table.add_column(col, justify="right")
    shown = sorted({1, n} | {s for s in range(1, n + 1) if s % max(1, n // 6) == 0})
    for s in shown:
        x, y, c = a.losses[s - 1], b.losses[s - 1], a.check[s - 1]
        table.add_row(str(s), f"{x:.6f}", f"{y:.6f}", f"{y - x:+.1e}", f"{c - x:+.1e}")
    console.print(table)
    same = max(abs(c - x) / abs(x) for c, x in zip(a.check, a.losses))
    drift = max(abs(y - x) / abs(x) for x, y in zip(a.losses, b.losses))
    console.print(f"On the same weights and hidden states the two losses agree to {same:.1e} (relative, largest "
                  f"over {n} steps): float32 rounding. The two runs agree to {drift:.1e}: their rounding "
                  "differences feed into the next steps' weights and compound, as any change in the order "
                  "of float32 sums does.", highlight=False)
    ms = [1e3 * sorted(r.step_seconds)[len(r.step_seconds) // 2] for r in (a, b)]
    console.print(f"median step (model, loss, optimizer): {ms[0]:.0f} ms with materialised logits, {ms[1]:.0f} ms "
                  "with linear_cross_entropy (CPU; noisy on a shared machine)", highlight=False)
    ratio = (f" ({b.peak_bytes / a.peak_bytes:.2f}x)" if a.peak_bytes and b.peak_bytes is not None else "")
    console.print(f"peak memory of the output layer + loss, forward and backward, one batch: "
                  f"[bold]{_mb(a.peak_bytes)}[/bold] with materialised logits, "
                  f"[bold green]{_mb(b.peak_bytes)}[/bold green] with linear_cross_entropy{ratio}")
    console.print("  (bytes of the tensors torch allocates during the step beyond those alive before it, from "
                  "torch.profiler's allocation events; both include the gradients of the hidden states and of "
                  f"the head weight, {(batch * context * 128 + V * 128) * 4 / 2**20:.1f} MB)", highlight=False)
    return a, b
