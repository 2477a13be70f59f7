"""CrossEntropyLoss is a drop-in for torch.nn.CrossEntropyLoss."""

import pickle

import pytest
import torch

import crossent
from oracle import assert_close64


def test_is_a_torch_cross_entropy_loss_with_same_state_dict():
    w = torch.rand(5)
    ours = crossent.CrossEntropyLoss(w, ignore_index=2, reduction="sum", label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(w, ignore_index=2, reduction="sum", label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    assert list(crossent.CrossEntropyLoss().state_dict()) == list(torch.nn.CrossEntropyLoss().state_dict())
    ours.load_state_dict(theirs.state_dict())
    for name in ("ignore_index", "reduction", "label_smoothing"):
        assert getattr(ours, name) == getattr(theirs, name)


def test_same_results_and_to_dtype_moves_weight():
    w = torch.rand(5, dtype=torch.float64) + 0.1
    ours = crossent.CrossEntropyLoss(w, ignore_index=1, label_smoothing=0.2)
    theirs = torch.nn.CrossEntropyLoss(w, ignore_index=1, label_smoothing=0.2)
    x = torch.randn(8, 5, dtype=torch.float64)
    t = torch.randint(0, 5, (8,))
    assert_close64(ours(x, t), theirs(x, t))
    assert ours.float().weight.dtype == torch.float32


def test_legacy_arguments_and_keywords():
    m = crossent.CrossEntropyLoss(size_average=False)
    assert m.reduction == "sum"
    m = crossent.CrossEntropyLoss(dim=-1, z_loss=1e-4, softcap=30.0, impl="chunked")
    x = torch.randn(2, 3, 6)
    t = torch.randint(0, 6, (2, 3))
    assert torch.allclose(m(x, t), crossent.cross_entropy(x, t, dim=-1, z_loss=1e-4, softcap=30.0))
    assert "z_loss" in repr(m)
    loss, extras = crossent.CrossEntropyLoss(return_extras=True)(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    assert extras["predicted"].shape == (4,)
    assert torch.isfinite(crossent.CrossEntropyLoss()(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), num_items=10))


def test_constructor_validates():
    with pytest.raises(ValueError, match="label_smoothing"):
        crossent.CrossEntropyLoss(label_smoothing=2.0)
    with pytest.raises(ValueError, match="reduction"):
        crossent.CrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="target_format"):
        crossent.CrossEntropyLoss(target_format="hot")


def test_pickles_and_scripts_in_sequential():
    m = crossent.CrossEntropyLoss(torch.ones(3), label_smoothing=0.1)
    m2 = pickle.loads(pickle.dumps(m))
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert torch.equal(m(x, t), m2(x, t))
