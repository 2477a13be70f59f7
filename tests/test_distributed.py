"""Vocab-parallel cross_entropy over gloo on CPU: 2, 3 and 4 processes, every rank's loss and
gradient shard against a single-process run over the full vocabulary, in float64.

Each world size runs every case in one spawn (process start-up dominates); a failing rank raises
in the test, and a hang is killed by the deadline instead of blocking the suite.
"""

import datetime
import os
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import crossent
from crossent import SparseTarget

DEADLINE_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cases(C: int):
    """(name, target kind, keyword options)."""
    g = torch.Generator().manual_seed(C)
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.1
    return [
        ("plain", "index", {}),
        ("smooth_weight_ignore", "index", dict(label_smoothing=0.1, weight=w)),
        ("zloss_softcap_sum", "index", dict(z_loss=1e-3, softcap=5.0, reduction="sum")),
        ("none", "index", dict(reduction="none", label_smoothing=0.2)),
        ("num_items", "index", dict(num_items=11)),
        ("one_hot", "one_hot", dict(label_smoothing=0.1, weight=w)),
        ("probs", "probs", dict(label_smoothing=0.1, weight=w)),
        ("probs_shard", "probs_shard", dict(z_loss=1e-3)),
        ("sparse", "sparse", dict(label_smoothing=0.05)),
        ("all_ignored", "ignored", {}),
        ("scaled_x1000", "index_big", dict(label_smoothing=0.1)),
    ]


def _inputs(kind: str, N: int, C: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, dtype=torch.float64) * (1000 if kind == "index_big" else 2)
    y = torch.randint(0, C, (N,), generator=g)
    y[1] = -100
    if kind in ("index", "index_big"):
        return x, y
    if kind == "ignored":
        return x, torch.full((N,), -100)
    if kind == "one_hot":
        t = torch.nn.functional.one_hot(y.clamp(min=0), C)
        t[1] = 0
        return x, t
    if kind in ("probs", "probs_shard"):
        return x, torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64), 1)
    idx = torch.randint(0, C, (N, 3), generator=g)
    idx[0, 2] = -100
    return x, SparseTarget(idx, torch.rand(N, 3, generator=g, dtype=torch.float64))


def _entry(rank: int, world: int, port: int, result_dir: str, body, args):
    """One rank: join the gloo group, run ``body(rank, world, *args)``, report a failure to the parent."""
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        body(rank, world, *args)
        dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        with open(os.path.join(result_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    # Every check passed. Leave without the interpreter's teardown, where gloo's threads sometimes
    # abort the process ("terminate called without an active exception", about 1 run in 8 here)
    # after all the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_ranks(body, world: int, tmp_path, *args, deadline_s: float = DEADLINE_S):
    """Spawn ``world`` ranks running ``body``; a failing rank fails the test with every rank's traceback,
    a hang is killed at the deadline. A port that another process took between choosing and binding
    it (EADDRINUSE at the rendezvous) is retried on a new port, twice at most."""
    for attempt in range(3):
        for p in tmp_path.glob("rank*.err"):
            p.unlink()
        try:
            return _run_ranks_once(body, world, tmp_path, args, deadline_s)
        except pytest.fail.Exception:
            errs = "".join(p.read_text() for p in tmp_path.glob("rank*.err"))
            if "EADDRINUSE" not in errs or attempt == 2:
                raise


def _run_ranks_once(body, world: int, tmp_path, args, deadline_s: float):
    ctx = mp.start_processes(_entry, args=(world, _free_port(), str(tmp_path), body, args), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"ranks still running after {deadline_s} s: a rank is waiting (a hang)")
    except Exception:
        errs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("rank*.err")))
        pytest.fail(f"a rank failed:\n{errs}")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def _vocab_cases(rank: int, world: int, sizes):
    C = sum(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    N = 9
    for i, (name, kind, kw) in enumerate(_cases(C)):
        x, t = _inputs(kind, N, C, seed=i)
        ref_kw = dict(kw)
        xs = x[:, lo:hi].clone().requires_grad_(True)
        mine = dict(kw)
        if "weight" in kw:
            mine["weight"] = kw["weight"][lo:hi]
        tm = t[:, lo:hi] if kind == "probs_shard" else t
        loss = crossent.cross_entropy(xs, tm, process_group=dist.group.WORLD, return_extras=True, **mine)
        loss, extras = loss
        go = torch.rand_like(loss) + 0.5 if loss.dim() else torch.ones(())
        (gs,) = torch.autograd.grad(loss, xs, go)
        xr = x.clone().requires_grad_(True)
        ref, rex = crossent.cross_entropy(xr, t, impl="torch", return_extras=True, **ref_kw)
        (gr,) = torch.autograd.grad(ref, xr, go)
        tol = dict(rtol=1e-10, atol=1e-10, equal_nan=True)
        assert torch.allclose(loss, ref, **tol), (name, loss, ref)
        assert torch.allclose(gs, gr[:, lo:hi], **tol), (name, (gs - gr[:, lo:hi]).abs().max())
        assert torch.allclose(extras["lse"], rex["lse"], **tol), name
        assert torch.equal(extras["predicted"], rex["predicted"]), name
    # collectives: forward = an exchange of 4 numbers per rank (shard size, positions, refusal, options),
    # one all-gather of O(N) stats and one packed all-reduce [N, 4]; the backward none
    from torch.distributed.tensor.debug import CommDebugMode

    x, t = _inputs("index", N, C, seed=0)
    xs = x[:, lo:hi].clone().requires_grad_(True)
    with crossent.checks(False):
        with CommDebugMode() as fwd:
            loss = crossent.cross_entropy(xs, t, label_smoothing=0.1, process_group=dist.group.WORLD)
    with CommDebugMode() as bwd:
        loss.backward()
    counts = {str(k).split(".")[-1]: v for k, v in fwd.get_comm_counts().items()}
    assert sum(counts.values()) == 3 and bwd.get_total_counts() == 0, (counts, bwd.get_comm_counts())
    # O(N) numbers per collective, whatever the vocabulary: record what crosses
    sent = []
    real_gather, real_reduce = dist.all_gather, dist.all_reduce
    dist.all_gather = lambda out, t, **kw: sent.append(t.numel()) or real_gather(out, t, **kw)
    dist.all_reduce = lambda t, **kw: sent.append(t.numel()) or real_reduce(t, **kw)
    try:
        with crossent.checks(False):
            crossent.cross_entropy(xs, t, label_smoothing=0.1, process_group=dist.group.WORLD)
    finally:
        dist.all_gather, dist.all_reduce = real_gather, real_reduce
    assert len(sent) == 3 and max(sent) <= 4 * N, sent
    _check_linear(rank, world, lo, hi, C)
    _check_dtensor(rank, world, C)
    # a label past the global vocabulary raises on every rank
    with pytest.raises(ValueError, match="out of range"):
        crossent.cross_entropy(torch.randn(2, hi - lo, dtype=torch.float64), torch.tensor([0, C]),
                               process_group=dist.group.WORLD)
    # ranks that disagree on the positions raise on every rank, never hang
    with pytest.raises(ValueError, match="different numbers of positions"):
        n = 3 + rank
        crossent.cross_entropy(torch.randn(n, hi - lo), torch.zeros(n, dtype=torch.long),
                               process_group=dist.group.WORLD)


def _check_linear(rank, world, lo, hi, C):
    """linear_weight rows [lo, hi) on this rank, hidden states replicated: loss, the full input gradient
    (summed over ranks) and this rank's weight and bias gradient rows equal the single-process ones."""
    g = torch.Generator().manual_seed(99)
    h = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    W = torch.randn(C, 6, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (2, 5), generator=g)
    y[0, 3] = -100
    kw = dict(shift=True, label_smoothing=0.1, z_loss=1e-3)
    ins = [h.clone().requires_grad_(True), W[lo:hi].clone().requires_grad_(True), b[lo:hi].clone().requires_grad_(True)]
    loss = crossent.linear_cross_entropy(ins[0], ins[1], y, ins[2], process_group=dist.group.WORLD, **kw)
    grads = torch.autograd.grad(loss, ins)
    ref_in = [t.clone().requires_grad_(True) for t in (h, W, b)]
    ref = crossent.linear_cross_entropy(ref_in[0], ref_in[1], y, ref_in[2], impl="torch", **kw)
    rg = torch.autograd.grad(ref, ref_in)
    tol = dict(rtol=1e-10, atol=1e-10)
    assert torch.allclose(loss, ref, **tol)
    assert torch.allclose(grads[0], rg[0], **tol)
    assert torch.allclose(grads[1], rg[1][lo:hi], **tol) and torch.allclose(grads[2], rg[2][lo:hi], **tol)
    # reduce_input_grad=False: each rank keeps its part of dL/dx (a Megatron-style layer sums them)
    x = h.clone().requires_grad_(True)
    part = torch.autograd.grad(crossent.linear_cross_entropy(x, W[lo:hi], y, b[lo:hi], process_group=dist.group.WORLD,
                                                             reduce_input_grad=False, **kw), x)[0]
    dist.all_reduce(part)
    assert torch.allclose(part, rg[0], **tol)
    # the backward's collectives: one all-reduce of the input gradient, none when switched off
    from torch.distributed.tensor.debug import CommDebugMode

    for reduce_input_grad, expected in ((True, 1), (False, 0)):
        x = h.clone().requires_grad_(True)
        with crossent.checks(False):
            loss = crossent.linear_cross_entropy(x, W[lo:hi], y, b[lo:hi], process_group=dist.group.WORLD,
                                                 reduce_input_grad=reduce_input_grad, **kw)
        with CommDebugMode() as bwd:
            loss.backward()
        assert bwd.get_total_counts() == expected, bwd.get_comm_counts()


def _check_dtensor(rank, world, C):
    """DTensor logits sharded on the class dim, and an lm_head weight sharded on dim 0, with no extra
    argument: a replicated loss equal to the single-process one, gradients placed like the inputs."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (6,), generator=g)
    xd = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_(True)
    loss = crossent.cross_entropy(xd, y, label_smoothing=0.1)
    loss.backward()
    xr = x.clone().requires_grad_(True)
    ref = crossent.cross_entropy(xr, y, label_smoothing=0.1, impl="torch")
    ref.backward()
    assert torch.allclose(loss.full_tensor(), ref, rtol=1e-10)
    assert torch.allclose(xd.grad.full_tensor(), xr.grad, rtol=1e-10, atol=1e-12)
    h = torch.randn(6, 4, generator=g, dtype=torch.float64)
    W = torch.randn(C, 4, generator=g, dtype=torch.float64)
    Wd = distribute_tensor(W, mesh, [Shard(0)]).requires_grad_(True)
    loss = crossent.linear_cross_entropy(h, Wd, y)
    loss.backward()
    Wr = W.clone().requires_grad_(True)
    ref = crossent.linear_cross_entropy(h, Wr, y, impl="torch")
    ref.backward()
    assert torch.allclose(loss.full_tensor(), ref, rtol=1e-10)
    assert torch.allclose(Wd.grad.full_tensor(), Wr.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sizes", [(20, 20), (13, 1, 6), (7, 30, 1, 62), (0, 12, 5)],
                         ids=["2-even", "3-uneven", "4-7/30/1/62", "3-empty-shard"])
def test_vocab_parallel_equals_single_process(sizes, tmp_path):
    _run_ranks(_vocab_cases, len(sizes), tmp_path, list(sizes))


def test_process_group_without_init_is_a_clear_error():
    with pytest.raises(ValueError, match="init_process_group"):
        crossent.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), process_group=object())


def _refusals(rank: int, world: int):
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    for checks in (True, False):  # checks off, the refusal travels with the forward's all-gather
        with crossent.checks(checks):
            crossent.cross_entropy(x, t, process_group=dist.group.WORLD)  # learn the sizes
            bad = dict(label_smoothing=2.0) if rank == 1 else {}
            with pytest.raises(ValueError, match="label_smoothing" if rank == 1 else r"rank\(s\) \[1\] refused"):
                crossent.cross_entropy(x, t, process_group=dist.group.WORLD, **bad)
    # a target that only one rank gets wrong (checks on: checked against the global vocabulary)
    tt = torch.tensor([0, 1, 2, 99]) if rank == 0 else t
    with pytest.raises(ValueError, match="out of range" if rank == 0 else "refused its target"):
        crossent.cross_entropy(x, tt, process_group=dist.group.WORLD)


def test_a_rank_that_refuses_its_arguments_stops_every_rank(tmp_path):
    _run_ranks(_refusals, 3, tmp_path, deadline_s=120)


def _agreement(rank: int, world: int):
    """What the fourth hostile probe found: disagreements between ranks raise on every rank, stale shard
    sizes cannot arise, and the single-process numbers hold at the edges."""
    W = dist.group.WORLD
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 13, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 5, 12, 7])
    lo, hi = (0, 4) if rank == 0 else (4, 13)
    mine = x[:, lo:hi]
    refused_elsewhere = r"rank\(s\) \[\d\] refused"
    # options, dtypes and arguments that differ between ranks
    for kw in (dict(label_smoothing=0.1 * rank), dict(reduction=["mean", "sum"][rank]),
               dict(softcap=[None, 2.0][rank])):
        with pytest.raises(ValueError, match="different options"):
            crossent.cross_entropy(mine, y, process_group=W, **kw)
    with pytest.raises(ValueError, match="different options"):
        crossent.cross_entropy(mine.float() if rank else mine, y, process_group=W)
    with pytest.raises((ValueError, TypeError), match="dim=5" if rank == 0 else refused_elsewhere):
        crossent.cross_entropy(mine, y, process_group=W, dim=5 if rank == 0 else 1)
    with pytest.raises(ValueError, match="impl" if rank == 1 else refused_elsewhere):
        crossent.cross_entropy(mine, y, process_group=W, impl="bogus" if rank == 1 else "auto")
    h = torch.randn(4, 6, generator=g, dtype=torch.float64)
    Wt = torch.randn(13, 6, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="hidden size" if rank == 1 else refused_elsewhere):
        crossent.linear_cross_entropy(h[:, :3] if rank == 1 else h, Wt[lo:hi], y, process_group=W)
    # checks off, two heads of different splits on the same group: no stale sizes
    with crossent.checks(False):
        for split in ((0, 4), (0, 9)):
            cut = split[1]
            part = x[:, :cut] if rank == 0 else x[:, cut:]
            got = crossent.cross_entropy(part, y, label_smoothing=0.1, process_group=W)
            assert torch.allclose(got, torch.nn.functional.cross_entropy(x, y, label_smoothing=0.1), rtol=1e-10)
    # a label on a shard that is all -inf: +inf, as in one process
    xd = x.clone()
    xd[:, :4] = float("-inf")
    got = crossent.cross_entropy(xd[:, lo:hi], torch.tensor([0, 1, 5, 6]), reduction="none", process_group=W)
    ref = torch.nn.functional.cross_entropy(xd, torch.tensor([0, 1, 5, 6]), reduction="none")
    assert torch.equal(torch.isinf(got), torch.isinf(ref)) and torch.allclose(got[2:], ref[2:], rtol=1e-10)
    # +inf in one shard: NaN gradient for the row on every rank, as in one process
    xi = x.clone()
    xi[0, 8] = float("inf")
    xs = xi[:, lo:hi].clone().requires_grad_(True)
    crossent.cross_entropy(xs, y, process_group=W).backward()
    assert torch.isnan(xs.grad[0]).all() and torch.isfinite(xs.grad[1:]).all()
    # float64 probabilities promote float32 logits, as in one process
    q = torch.softmax(torch.randn(4, 13, generator=g, dtype=torch.float64), 1)
    got = crossent.cross_entropy(x[:, lo:hi].float(), q, process_group=W)
    assert got.dtype == torch.float64
    # a DTensor lm_head with return_extras
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    loss, ex = crossent.linear_cross_entropy(h, distribute_tensor(Wt, mesh, [Shard(0)]), y, return_extras=True)
    assert torch.allclose(loss.full_tensor(), torch.nn.functional.cross_entropy(h @ Wt.T, y), rtol=1e-10)
    assert torch.equal(ex["predicted"], (h @ Wt.T).argmax(1))


def test_ranks_that_disagree_raise_everywhere_and_edges_match_one_process(tmp_path):
    _run_ranks(_agreement, 2, tmp_path, deadline_s=120)


def _training_stack(rank: int, world: int):
    """Issue 15: ranks that disagree on data raise on every rank; what one device does, every rank does."""
    W = dist.group.WORLD
    g = torch.Generator().manual_seed(11)
    C = 10
    x = torch.randn(6, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (6,), generator=g)
    lo, hi = (0, 4) if rank == 0 else (4, C)
    mine = x[:, lo:hi]
    # different targets, num_items or hidden states on each rank: every rank raises, none returns a number
    with pytest.raises(ValueError, match="different targets"):
        crossent.cross_entropy(mine, (y + rank) % C, process_group=W)
    with pytest.raises(ValueError, match="different num_items"):
        crossent.cross_entropy(mine, y, reduction="sum", num_items=[0.97, 0.48][rank], process_group=W)
    with pytest.raises(ValueError, match="different num_items"):
        crossent.cross_entropy(mine, y, num_items=torch.tensor([3.0, 4.0][rank]), process_group=W)
    with pytest.raises(ValueError, match="different targets"):
        q = torch.softmax(torch.randn(6, C, generator=g, dtype=torch.float64) + rank, 1)
        crossent.cross_entropy(mine, q, process_group=W)
    # an FSDP-sharded weight seen outside the module's forward, each data-parallel rank with its own batch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 16, bias=False, dtype=torch.float64)
    fully_shard(head, mesh=mesh)
    h = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float64)
    yy = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(200 + rank))
    with pytest.raises(ValueError, match="different hidden states.*fully_shard"):
        crossent.linear_cross_entropy(h, head.weight, yy, shift=True)
    # value checks that differ between ranks are caught too
    with crossent.checks(rank == 0):
        with pytest.raises(ValueError, match="value checks"):
            crossent.cross_entropy(mine, y, process_group=W)
    # inplace_backward under a group marks the logits as overwritten, as on one device
    base = x.clone().requires_grad_(True)
    logits = base * 1.0
    part = logits[:, lo:hi]
    part_owned = part.clone()
    crossent.cross_entropy(part_owned, y, process_group=W, inplace_backward=True).backward()
    with pytest.raises(RuntimeError, match="inplace_backward"):
        crossent.cross_entropy(part_owned, y, process_group=W)
    # a NaN in one rank's shard of the probabilities: every rank raises
    q = torch.softmax(torch.randn(6, C, generator=g, dtype=torch.float64), 1)
    qs = q[:, lo:hi].clone()
    if rank == 1:
        qs[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN" if rank == 1 else r"rank\(s\) \[1\] refused its target"):
        crossent.cross_entropy(mine, qs, process_group=W)
    # the full [C] class weight (replicated, as loss_parallel takes it) equals the single-device weighted loss
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.1
    ref = torch.nn.functional.cross_entropy(x, y, weight=w, label_smoothing=0.1)
    for ww in (w, w[lo:hi]):
        got = crossent.cross_entropy(mine, y, weight=ww, label_smoothing=0.1, process_group=W)
        assert torch.allclose(got, ref, rtol=1e-12), (got, ref)
    xd = distribute_tensor(x, mesh, [Shard(1)])
    for ww in (w, distribute_tensor(w, mesh, [Replicate()])):
        got = crossent.cross_entropy(xd, y, weight=ww, label_smoothing=0.1)
        assert torch.allclose(got.full_tensor(), ref, rtol=1e-12)
    with pytest.raises(ValueError, match="weight on rank"):
        crossent.cross_entropy(mine, y, weight=w[:3], process_group=W)
    # vocab-parallel linear CE with shift >= T: no position, as one device (mean: NaN, sum: 0)
    Wt = torch.randn(C, 8, generator=g, dtype=torch.float64)
    hh = torch.randn(2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    lab = torch.randint(0, C, (2, 3), generator=g)
    for red, shift in (("mean", 3), ("sum", 3), ("sum", 5), ("none", 4)):
        got = crossent.linear_cross_entropy(hh, Wt[lo:hi], lab, shift=shift, reduction=red, process_group=W)
        one = crossent.linear_cross_entropy(hh, Wt, lab, shift=shift, reduction=red)
        assert got.shape == one.shape and torch.allclose(got, one, equal_nan=True), (red, shift, got, one)
    got.sum().backward() if got.numel() else None
    _hostile_round(rank, world, x, y, mine, lo, hi, C, g, mesh)


def _hostile_round(rank, world, x, y, mine, lo, hi, C, g, mesh):
    """What the hostile probe of issue 15 found (D1-D9), each as one device or PyTorch behaves."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    W = dist.group.WORLD
    ref = torch.nn.functional.cross_entropy(x, y)
    # D1: a float one-hot as wide as the shard, read as one-hot: the full vocabulary is expected (a clear
    # error on every rank), never a shard's local indices read as global labels
    oh = torch.nn.functional.one_hot(y, C).double()
    with pytest.raises(ValueError):
        crossent.cross_entropy(mine, oh[:, lo:hi], target_format="one_hot", process_group=W)
    assert torch.allclose(crossent.cross_entropy(mine, oh, target_format="one_hot", process_group=W), ref)
    # D2: targets that a plain checksum cannot tell apart (+2 at 0, -1 at 1 with weights 1, 2) still differ
    yy = torch.tensor([1, 5, 2, 6, 0, 0]) if rank == 0 else torch.tensor([3, 4, 2, 6, 0, 0])
    with pytest.raises(ValueError, match="different targets"):
        crossent.cross_entropy(mine, yy, process_group=W)
    # D4: probability shards of different dtypes: a clear error on every rank, not a collective mismatch
    q = torch.softmax(torch.randn(6, C, generator=torch.Generator().manual_seed(9), dtype=torch.float64), 1)
    qs = q[:, lo:hi] if rank == 0 else q[:, lo:hi].float()
    with pytest.raises(ValueError, match="different options or dtypes"):
        crossent.cross_entropy(mine.float(), qs, process_group=W)
    # D5: an empty shard and full probabilities, the same on every rank: no false "different targets"
    full = x if rank == 0 else x[:, :0]
    got = crossent.cross_entropy(full, q, process_group=W)
    assert torch.allclose(got, torch.nn.functional.cross_entropy(x, q), rtol=1e-12)
    # D6: DTensor class weights (replicated or sharded), targets and num_items beside plain logits
    w = torch.rand(C, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    wref = torch.nn.functional.cross_entropy(x, y, weight=w)
    for wd in (distribute_tensor(w, mesh, [Replicate()]),):
        assert torch.allclose(crossent.cross_entropy(mine, y, weight=wd, process_group=W), wref, rtol=1e-12)
    yd = distribute_tensor(y, mesh, [Replicate()])
    assert torch.allclose(crossent.cross_entropy(mine, yd, process_group=W), ref, rtol=1e-12)
    # D8: full class weights whose values differ between ranks: every rank raises
    with pytest.raises(ValueError, match="different class weights"):
        crossent.cross_entropy(mine, y, weight=w * (1 + rank), process_group=W)
    # D3: DTensor logits overwritten by inplace_backward are refused on their next use
    xd = distribute_tensor(x.clone(), mesh, [Shard(1)]).requires_grad_(True) * 1.0
    crossent.cross_entropy(xd, y, inplace_backward=True).backward()
    with pytest.raises(RuntimeError, match="inplace_backward"):
        crossent.cross_entropy(xd, y)
    # D7: a NaN probability with inplace_backward refuses before writing: the logits keep their values
    qn = q[:, lo:hi].clone()
    if rank == 1:
        qn[0, 0] = float("nan")
    logits = (x * 1.0)[:, lo:hi].clone()
    before = logits.clone()
    with pytest.raises(ValueError):
        crossent.cross_entropy(logits, qn, process_group=W, inplace_backward=True)
    assert torch.equal(logits, before)


def test_training_stack_ranks_disagreeing_raise_everywhere_and_match_one_device(tmp_path):
    _run_ranks(_training_stack, 2, tmp_path, deadline_s=150)


class _StandInGroup:
    """A one-rank group object as Megatron creates without torch.distributed (size() is 1)."""

    def size(self):
        return 1

    def rank(self):
        return 0


class _StandInPair(_StandInGroup):
    def size(self):
        return 2


def test_a_larger_stand_in_group_without_init_says_init():
    with pytest.raises(ValueError, match="init_process_group"):
        crossent.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), process_group=_StandInPair())


def test_overwritten_logits_marked_through_a_temporary_view_stay_refused():
    logits = (torch.randn(6, 8, requires_grad=True) * 1.0)
    crossent.cross_entropy(logits.view(6, 8), torch.arange(6), inplace_backward=True).backward()
    with pytest.raises(RuntimeError, match="inplace_backward"):
        crossent.cross_entropy(logits.view(6, 8), torch.arange(6))


def test_a_one_rank_stand_in_group_without_init_is_one_device():
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 4, 2])
    got = crossent.cross_entropy(x, y, process_group=_StandInGroup())
    assert torch.allclose(got, torch.nn.functional.cross_entropy(x, y), rtol=1e-12)


def _linear_hostile(rank: int, world: int):
    """What the second hostile probe found in vocab-parallel linear CE, each as one device behaves."""
    from crossent.config import CONFIG

    W = dist.group.WORLD
    g = torch.Generator().manual_seed(21)
    C, H = 13, 6
    lo, hi = (0, 6) if rank == 0 else (6, C)
    h = torch.randn(2, 5, H, generator=g, dtype=torch.float64)
    Wt = torch.randn(C, H, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (2, 5), generator=g)
    # 1. one rank refuses its target while inputs require grad: every rank raises, none hangs
    bad = y.clone()
    if rank == 1:
        bad[0, 0] = C
    hh = h.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="out of range" if rank == 1 else r"rank\(s\) \[1\] refused its target"):
        crossent.linear_cross_entropy(hh, Wt[lo:hi], bad, process_group=W)
    # 2. ranks whose default chunk budgets differ run the same chunks (the least budget): no collective mismatch
    real = CONFIG.linear_chunk_bytes
    CONFIG.linear_chunk_bytes = 4 * 7 * 32 if rank == 0 else 4 * 7 * 64  # 32 vs 64 rows of the largest shard
    try:
        big = torch.randn(100, H, generator=g, dtype=torch.float64)
        yb = torch.randint(0, C, (100,), generator=g)
        got = crossent.linear_cross_entropy(big, Wt[lo:hi], yb, process_group=W)
        assert torch.allclose(got, torch.nn.functional.cross_entropy(big @ Wt.T, yb), rtol=1e-12)
    finally:
        CONFIG.linear_chunk_bytes = real
    # 3. create_graph=True: a clear error, never a silently dropped second-order term
    hh = h.clone().requires_grad_(True)
    loss = crossent.linear_cross_entropy(hh, Wt[lo:hi].clone().requires_grad_(True), y, process_group=W)
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(loss, hh, create_graph=True)
    # 4. reduce_input_grad that differs between ranks: every rank raises in the forward (no hang in the backward)
    with pytest.raises(ValueError, match="different options"):
        crossent.linear_cross_entropy(h, Wt[lo:hi], y, process_group=W, reduce_input_grad=rank == 0)
    # 5. a +inf logit: the row's loss is NaN, as torch's log_softmax gives
    b = torch.zeros(C, dtype=torch.float64)
    b[0] = float("inf")
    got = crossent.linear_cross_entropy(h, Wt[lo:hi], y, b[lo:hi], reduction="none", process_group=W)
    ref = torch.nn.functional.cross_entropy((h @ Wt.T + b).reshape(-1, C), y.reshape(-1), reduction="none")
    assert torch.equal(torch.isnan(got.reshape(-1)), torch.isnan(ref)), (got, ref)
    # 6. float32 hidden states with float64 probabilities compute in float64, as on one device
    q = torch.softmax(torch.randn(2, 5, C, generator=g, dtype=torch.float64), -1)
    got = crossent.linear_cross_entropy(h.float(), Wt[lo:hi].float(), q, process_group=W)
    one = crossent.linear_cross_entropy(h.float(), Wt.float(), q)
    assert got.dtype == one.dtype == torch.float64 and torch.allclose(got, one, rtol=1e-12)


def test_vocab_parallel_linear_hostile_cases(tmp_path):
    _run_ranks(_linear_hostile, 2, tmp_path, deadline_s=150)
