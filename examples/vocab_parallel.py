"""Vocab-parallel and data-parallel losses on CPU with gloo.

1. Tensor parallel: a small language model whose output layer (the [V, H] lm_head) is split
   across the ranks by rows trains a few steps with crossent.linear_cross_entropy(...,
   process_group=...); every step's loss equals a single-process run over the whole vocabulary.
2. Data parallel: each rank holds half the batch; num_items = the all-reduced count of valid
   tokens makes the sum of the ranks' losses exactly the full-batch mean.

    torchrun --nproc_per_node 2 examples/vocab_parallel.py
    python examples/vocab_parallel.py          # starts its own 2 processes
"""

import os
import socket

import torch
import torch.distributed as dist

import crossent

V, H, T, B, STEPS = 50, 16, 12, 4, 5


def model_and_data():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(V, H, generator=g, dtype=torch.float64) / 4
    mix = torch.randn(H, H, generator=g, dtype=torch.float64) / 4
    head = torch.randn(V, H, generator=g, dtype=torch.float64) / 4
    tokens = torch.randint(0, V, (B, T), generator=g)
    tokens[0, -3:] = -100  # padding: ignored
    return emb, mix, head, tokens


def hidden(emb, mix, tokens):
    return torch.tanh(emb[tokens.clamp(min=0)] @ mix)


def train(rank: int, world: int, group) -> list:
    """SGD steps; the lm_head holds rows [lo, hi) of the vocabulary on this rank (all of it without a group)."""
    emb, mix, head, tokens = model_and_data()
    lo, hi = (V * rank // world, V * (rank + 1) // world) if group is not None else (0, V)
    params = [emb.requires_grad_(True), mix.requires_grad_(True), head[lo:hi].clone().requires_grad_(True)]
    losses = []
    for _ in range(STEPS):
        loss = crossent.linear_cross_entropy(hidden(params[0], params[1], tokens), params[2], tokens, shift=True,
                                             label_smoothing=0.1, process_group=group)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= 0.5 * g
        losses.append(float(loss.detach()))
    return losses


def data_parallel(rank: int, world: int) -> None:
    _, _, head, tokens = model_and_data()
    emb, mix, _, _ = model_and_data()
    h = hidden(emb, mix, tokens)
    full = crossent.linear_cross_entropy(h, head, tokens, shift=True)
    mine = slice(rank * B // world, (rank + 1) * B // world)
    valid = (tokens[mine, 1:] != -100).sum()
    count = valid.clone()
    dist.all_reduce(count)  # every rank's valid tokens: the full batch's denominator
    part = crossent.linear_cross_entropy(h[mine], head, tokens[mine], shift=True, num_items=count)
    total = part.detach().clone()
    dist.all_reduce(total)
    if rank == 0:
        print(f"data parallel: sum of the ranks' losses {float(total):.12f}, full-batch mean {float(full):.12f}")
    assert torch.allclose(total, full, rtol=1e-12)


def main(rank: int, world: int) -> None:
    group = dist.group.WORLD
    parallel = train(rank, world, group)
    if rank == 0:
        single = train(0, 1, None)
        for step, (a, b) in enumerate(zip(parallel, single)):
            print(f"step {step}: vocab-parallel loss {a:.12f}   single process {b:.12f}")
        assert all(abs(a - b) <= 1e-10 * abs(b) for a, b in zip(parallel, single)), "losses differ"
        print(f"the vocab-parallel losses over {world} processes equal the single-process ones")
    data_parallel(rank, world)
    dist.barrier()


def _spawned(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        main(rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group("gloo")
        try:
            main(dist.get_rank(), dist.get_world_size())
        finally:
            dist.destroy_process_group()
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.spawn(_spawned, args=(2, port), nprocs=2)
