"""diagnose(): plain sentences for what is legal but probably wrong."""

import torch

import crossent


def has(findings, *words):
    return any(all(w in f for w in words) for f in findings)


def test_clean_call_has_no_findings():
    x = torch.randn(64, 4)
    t = torch.arange(64) % 4
    assert crossent.diagnose(x, t) == []


def test_softmax_input():
    x = torch.randn(16, 4).softmax(1)
    assert has(crossent.diagnose(x, torch.arange(16) % 4), "softmax")


def test_log_softmax_input():
    x = torch.randn(16, 4).log_softmax(1)
    assert has(crossent.diagnose(x, torch.arange(16) % 4), "log-softmax")


def test_one_hot_input_looks_like_labels():
    x = torch.eye(4)[torch.arange(16) % 4]
    assert has(crossent.diagnose(x, torch.arange(16) % 4), "swap")


def test_probs_not_summing_to_one():
    assert has(crossent.diagnose(torch.randn(8, 3), torch.rand(8, 3)), "sum to 1")


def test_class_never_present():
    assert has(crossent.diagnose(torch.randn(8, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])), "never occur", "3, 4")


def test_labels_out_of_range_and_padding():
    f = crossent.diagnose(torch.randn(4, 3), torch.tensor([0, 1, 5, 2]))
    assert has(f, "out of range", "3 classes")
    f = crossent.diagnose(torch.randn(4, 3), torch.tensor([0, 1, -1, 2]))
    assert has(f, "ignore_index=-1")


def test_misplaced_class_dim():
    f = crossent.diagnose(torch.randn(2, 5, 30), torch.randint(0, 30, (2, 5)))
    assert has(f, "dim=-1")
    f = crossent.diagnose(torch.randn(2, 5, 30), torch.randint(5, 30, (2, 30)))
    assert has(f, "dim=-1")


def test_never_raises():
    assert crossent.diagnose(torch.tensor([1, 2]), torch.tensor([0]))
    assert crossent.diagnose(torch.randn(2, 3), "nonsense")


def test_weighted_float_one_hot_reads_as_probs():
    oh = torch.eye(3)[torch.tensor([0, 1, 2, 2])]
    assert has(crossent.diagnose(torch.randn(4, 3), oh, weight=torch.rand(3)), "target_format='one_hot'")
    assert not has(crossent.diagnose(torch.randn(4, 3), oh), "target_format='one_hot'")
