"""crossent's linear mode where large-vocabulary models are trained: FSDP2 (root only, per layer, the
head alone; applied before and after sharding; bf16 mixed precision), Hugging Face's own
``DistributedConfig`` FSDP and tensor parallel, and torch's ``ColwiseParallel`` head, on 2 gloo ranks.

The oracle is the stock model sharded the same way, on the same data: every rank's loss and every
gradient shard. Data-parallel ranks get different batches; tensor-parallel ranks the same one. The
harness (deadlines, a failing rank fails the test with every rank's traceback) is test_distributed's.
"""

import copy
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

import torch.distributed as dist  # noqa: E402

from crossent.integrations import transformers as ct  # noqa: E402

from test_distributed import _run_ranks  # noqa: E402

V, HID = 256, 32


def _config():
    return transformers.LlamaConfig(vocab_size=V, hidden_size=HID, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=False, attn_implementation="eager",
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _model():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(_config()).float().train()


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2, 10), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _compare(stock, ours, ids, labels, rtol, what, calls=None):
    """One forward and backward of each; the same loss and the same gradient shard for every parameter."""
    a = stock(input_ids=ids, labels=labels)
    b = ours(input_ids=ids, labels=labels)
    assert b.logits is None, f"{what}: crossent did not run (logits were built)"
    torch.testing.assert_close(_local(b.loss).float(), _local(a.loss).float(), rtol=rtol, atol=0, msg=what)
    a.loss.backward()
    b.loss.backward()
    theirs = dict(stock.named_parameters())
    n = 0
    for name, q in ours.named_parameters():
        p = theirs[name]
        assert (p.grad is None) == (q.grad is None), (what, name)
        if p.grad is None:
            continue
        gp, gq = _local(p.grad).float(), _local(q.grad).float()
        scale = max(gp.abs().max().item(), 1e-6)
        err = (gp - gq).abs().max().item()
        assert err <= rtol * scale * 10, f"{what}: {name} gradient differs by {err:.3g} (scale {scale:.3g})"
        n += 1
    assert n >= 10, what


def _fsdp_cases(rank: int, world: int):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ids, labels = _batch(100 + rank)  # data parallel: each rank its own batch

    def shard(model, layout, mp=None):
        kw = {} if mp is None else {"mp_policy": mp}
        if layout in ("per_layer", "head_alone"):
            for layer in model.model.layers:
                fully_shard(layer, **kw)
        if layout == "head_alone":
            fully_shard(model.lm_head, **kw)
        fully_shard(model, **kw)
        return model

    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layout in ("root", "per_layer", "head_alone"):
        for when in ("before", "after"):
            for mp in ((None, bf16) if layout == "head_alone" else (None,)):
                what = f"{layout}/{when}/{'bf16' if mp else 'fp32'}"
                stock, ours = _model(), _model()
                if when == "before":
                    ct.apply(ours)
                shard(stock, layout, mp)
                shard(ours, layout, mp)
                if when == "after":
                    ct.apply(ours)
                _compare(stock, ours, ids, labels, 2e-2 if mp else 2e-5, what)
    # outside the module's forward, each data-parallel rank with its own batch: an error on every rank
    # that names FSDP, never a loss computed as if the FSDP shard were a vocabulary shard
    model = shard(_model(), "head_alone")
    hidden = torch.randn(2, 10, HID, generator=torch.Generator().manual_seed(rank))
    import crossent

    with pytest.raises(ValueError, match="different hidden states.*fully_shard"):
        crossent.linear_cross_entropy(hidden, model.lm_head.weight, labels, shift=True)


def test_fsdp2_every_wrapping_equals_stock_fsdp2(tmp_path):
    _run_ranks(_fsdp_cases, 2, tmp_path, deadline_s=300)


def _hf_cases(rank: int, world: int, path: str):
    logging.getLogger("transformers").setLevel(logging.ERROR)
    for kind in ("fsdp", "tp"):
        cfg = transformers.DistributedConfig(**({"fsdp_size": 2} if kind == "fsdp" else {"tp_size": 2}))
        stock = transformers.LlamaForCausalLM.from_pretrained(path, distributed_config=cfg, dtype=torch.float32)
        ours = transformers.LlamaForCausalLM.from_pretrained(path, distributed_config=cfg, dtype=torch.float32)
        ct.apply(ours)
        ids, labels = _batch(100 + rank if kind == "fsdp" else 100)
        _compare(stock.train(), ours.train(), ids, labels, 2e-5, f"hf-{kind}")


def test_hugging_face_distributed_config_fsdp_and_tp(tmp_path):
    path = tmp_path / "tiny"
    _model().save_pretrained(path)
    _run_ranks(_hf_cases, 2, tmp_path, str(path), deadline_s=300)


def _colwise(rank: int, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    ids, labels = _batch(100)  # tensor parallel: the same batch on every rank
    for apply_first in (True, False):
        stock, ours = _model(), _model()
        if apply_first:
            ct.apply(ours)
        for m in (stock, ours):
            parallelize_module(m, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
        if not apply_first:
            ct.apply(ours)
        _compare(stock, ours, ids, labels, 2e-5, f"colwise/apply_first={apply_first}")
        w = ours.lm_head.weight
        assert w.to_local().shape == (V // world, HID)  # the vocabulary stays sharded


def test_torch_colwise_parallel_head(tmp_path):
    _run_ranks(_colwise, 2, tmp_path, deadline_s=200)
