"""diagnose(): plain sentences for what is legal but probably wrong."""

import pytest
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
    x = torch.randn(2, 5, 3).log_softmax(1)  # classes at dim 1 of [B, C, T]: rows are not contiguous
    assert has(crossent.diagnose(x, torch.randint(0, 5, (2, 3))), "log-softmax")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_softmax_and_log_softmax_input_in_other_dtypes(dtype):
    x = torch.randn(512, 1000, generator=torch.Generator().manual_seed(0)) * 3
    t = torch.arange(512) % 1000
    assert has(crossent.diagnose(x.softmax(1).to(dtype), t), "softmax output")
    assert has(crossent.diagnose(x.log_softmax(1).to(dtype), t), "log-softmax")
    assert crossent.diagnose(x.to(dtype), t) == []
    assert crossent.diagnose(-x.abs().to(dtype), t) == []  # all <= 0 is not enough


def test_one_hot_input_looks_like_labels():
    x = torch.eye(4)[torch.arange(16) % 4]
    assert has(crossent.diagnose(x, torch.arange(16) % 4), "swap")


def test_probs_not_summing_to_one():
    assert has(crossent.diagnose(torch.randn(8, 3), torch.rand(8, 3)), "sum to 1")


def test_probs_all_zero_row_is_ignored_and_nan_and_negative_are_reported():
    p = torch.rand(4, 3).softmax(1)
    p[1] = 0  # an all-zero row is how probability targets mark an ignored position
    assert crossent.diagnose(torch.randn(4, 3), p) == []
    p[2, 0] = float("nan")
    assert has(crossent.diagnose(torch.randn(4, 3), p), "sum to 1", "position (2,)", "nan")
    q = torch.tensor([[1.5, -0.5, 0.0]])
    assert has(crossent.diagnose(torch.randn(1, 3), q), "negative")


def test_labels_in_a_small_prefix_of_the_classes():
    # the rule: >= 4 labels per class on average, all labels in 0..m-1 with m <= C/2, at least two distinct
    f = crossent.diagnose(torch.randn(400, 10), torch.arange(400) % 5)
    assert has(f, "never occur", "0..4", "10 classes", "set it to 5")
    # the same through one-hot rows
    oh = torch.nn.functional.one_hot(torch.arange(400) % 5, 10)
    assert has(crossent.diagnose(torch.randn(400, 10), oh), "never occur", "0..4")
    # ignored positions do not count as labels, but do not hide the finding either
    t = torch.arange(480) % 6
    t[t == 5] = -100
    assert has(crossent.diagnose(torch.randn(480, 10), t), "never occur", "0..4")


def test_missing_classes_alone_are_not_reported():
    # a normal large-vocabulary batch: most classes never occur, nothing is wrong
    assert crossent.diagnose(torch.randn(64, 1000), torch.randint(0, 1000, (64,))) == []
    assert crossent.diagnose(torch.randn(2, 16, 32000), torch.randint(0, 32000, (2, 16)), dim=-1) == []
    assert crossent.diagnose(torch.randn(8, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])) == []
    # too few labels per class for the prefix rule (39 < 4 * 10)
    assert crossent.diagnose(torch.randn(39, 10), torch.arange(39) % 5) == []
    # the labels reach past half the classes
    assert crossent.diagnose(torch.randn(400, 10), torch.arange(400) % 6) == []
    # a single class in the whole batch is not a class-count mismatch
    assert crossent.diagnose(torch.randn(400, 10), torch.zeros(400, dtype=torch.long)) == []
    # many labels, some classes missing anywhere but at the top: imbalance, not a wrong class count
    t = torch.arange(400) % 10
    t[(t == 3) | (t == 7)] = 0
    assert crossent.diagnose(torch.randn(400, 10), t) == []


def test_unbatched_target_has_no_findings():
    assert crossent.diagnose(torch.randn(5), torch.tensor(3)) == []
    assert crossent.diagnose(torch.randn(5), torch.tensor([0, 0, 1, 0, 0])) == []
    assert crossent.diagnose(torch.randn(5), torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2])) == []
    assert crossent.diagnose(torch.randn(5), torch.tensor(3), weight=torch.rand(5)) == []
    assert has(crossent.diagnose(torch.randn(5), torch.tensor(7)), "out of range")


def test_bad_weight_is_reported_with_the_fix():
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert crossent.diagnose(x, t, weight=torch.rand(3)) == []
    assert "weight has shape [4] but the input has 3 classes: pass a 1-D tensor of length 3" in \
        crossent.diagnose(x, t, weight=torch.rand(4))
    assert has(crossent.diagnose(x, t, weight=torch.rand(1, 3)), "weight has shape [1, 3]", "1-D tensor of length 3")
    assert "weight must be floating, got torch.int64; use weight.float()" in \
        crossent.diagnose(x, t, weight=torch.ones(3, dtype=torch.long))
    assert has(crossent.diagnose(x, t, weight=[1.0, 2.0, 3.0]), "1-D tensor of 3 class weights", "list")
    assert has(crossent.diagnose(x, t, weight=torch.ones(3, device="meta")), "weight.to(input.device)")
    # a bad weight is not used for the other checks, and never raises
    assert has(crossent.diagnose(x, t, weight=torch.zeros(5)), "length 3")


def test_weight_messages_match_cross_entropy():
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    for w in (torch.rand(4), torch.rand(1, 3), torch.ones(3, dtype=torch.long)):
        with pytest.raises((ValueError, TypeError)) as e:
            crossent.cross_entropy(x, t, w)
        assert str(e.value) in crossent.diagnose(x, t, weight=w)


def test_swapped_input_and_target():
    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))
    for f in (crossent.diagnose(labels, logits), crossent.diagnose(labels.float(), logits)):
        assert len(f) == 1 and has(f, "did you swap input and target?", "[8]", "[8, 5]")
    assert has(crossent.diagnose(labels.float(), logits), "labels.long()")
    # language-model layout: the hint carries dim=-1
    f = crossent.diagnose(torch.randint(0, 50, (2, 7)), torch.randn(2, 7, 50))
    assert has(f, "swap", "dim=-1")
    # unbatched
    assert has(crossent.diagnose(torch.tensor(2), torch.randn(5)), "swap")
    # float input that is not whole numbers: a shape error, not a swap
    f = crossent.diagnose(torch.randn(8), logits)
    assert f and not has(f, "swap")
    # the right order is clean
    assert crossent.diagnose(logits, labels) == []


def test_labels_out_of_range_and_padding():
    f = crossent.diagnose(torch.randn(4, 3), torch.tensor([0, 1, 5, 2]))
    assert has(f, "out of range", "3 classes")
    f = crossent.diagnose(torch.randn(4, 3), torch.tensor([0, 1, -1, 2]))
    assert has(f, "ignore_index=-1")


def test_value_problems_reported_with_checks_off():
    previous = crossent.set_checks(False)
    try:
        f = crossent.diagnose(torch.randn(4, 3), torch.tensor([0, 5, 1, -1]))
        assert has(f, "up to 5", "3 classes") and has(f, "ignore_index=-1")
        t = crossent.SparseTarget(torch.tensor([[1, 7], [0, 2]]), torch.tensor([[0.8, 0.2], [0.5, 0.5]]))
        assert has(crossent.diagnose(torch.randn(2, 3), t), "SparseTarget index 7", "out of range")
    finally:
        crossent.set_checks(previous)


def test_all_ignored_and_zero_weight():
    x = torch.randn(4, 3)
    assert has(crossent.diagnose(x, torch.full((4,), -100)), "every position is ignored")
    assert has(crossent.diagnose(x, torch.zeros(4, 3, dtype=torch.long)), "every position is ignored")
    f = crossent.diagnose(x, torch.tensor([0, 0, 2, -100]), weight=torch.tensor([0.0, 1.0, 0.0]))
    assert has(f, "weight 0")


def test_bad_one_hot_targets():
    x = torch.randn(4, 3)
    oh = torch.eye(3, dtype=torch.long)[torch.tensor([0, 1, 2, 0])]
    assert crossent.diagnose(x, oh) == []
    assert crossent.diagnose(x, oh.bool()) == []
    assert crossent.diagnose(x, oh.float(), target_format="one_hot") == []
    multi = oh.clone()
    multi[1, 2] = 1
    assert has(crossent.diagnose(x, multi), "2 classes set at position (1,)", "binary_cross_entropy_with_logits")
    two = oh.clone()
    two[2, 0] = 2
    assert has(crossent.diagnose(x, two), "value 2 at position (2,) class 0")
    assert has(crossent.diagnose(x, oh.float() * 0.5, target_format="one_hot"), "value 0.5")
    # the same messages as cross_entropy
    for bad in (multi, two):
        with pytest.raises(ValueError) as e:
            crossent.cross_entropy(x, bad)
        assert str(e.value) in crossent.diagnose(x, bad)


def test_misplaced_class_dim():
    f = crossent.diagnose(torch.randn(2, 5, 30), torch.randint(0, 30, (2, 5)))
    assert has(f, "dim=-1")
    f = crossent.diagnose(torch.randn(2, 5, 30), torch.randint(5, 30, (2, 30)))
    assert has(f, "dim=-1")


def test_never_raises():
    assert crossent.diagnose(torch.tensor([1, 2]), torch.tensor([0]))
    assert crossent.diagnose(torch.randn(2, 3), "nonsense")
    assert crossent.diagnose(torch.randn(2, 0), torch.zeros(2, dtype=torch.long))
    assert crossent.diagnose(torch.randn(2, 3), torch.tensor([0, 1]), ignore_index=None)
    assert crossent.diagnose(torch.randn(2, 3), torch.tensor([0, 1]), dim=5)
    assert crossent.diagnose(torch.randn(2, 3), torch.tensor([0, 1]), target_format="bogus")
    assert crossent.diagnose(torch.randn(0, 3), torch.zeros(0, dtype=torch.long)) == []


def test_weighted_float_one_hot_reads_as_probs():
    oh = torch.eye(3)[torch.tensor([0, 1, 2, 2])]
    assert has(crossent.diagnose(torch.randn(4, 3), oh, weight=torch.rand(3)), "target_format='one_hot'")
    assert not has(crossent.diagnose(torch.randn(4, 3), oh), "target_format='one_hot'")


def test_sparse_target_sums():
    t = crossent.SparseTarget(torch.tensor([[1, 2], [0, -100], [-100, -100]]),
                              torch.tensor([[0.8, 0.2], [1.0, 0.0], [0.0, 0.0]]))
    assert crossent.diagnose(torch.randn(3, 4), t) == []  # an all-padding position is ignored
    t = crossent.SparseTarget(torch.tensor([[1, 2], [0, 3]]), torch.tensor([[0.8, 0.2], [0.5, 0.4]]))
    assert has(crossent.diagnose(torch.randn(2, 4), t), "SparseTarget values should sum to 1", "0.9")


# ---------------------------------------------------------------------------------------------------------------------
# memory: diagnose reads the input in row chunks and never builds an input-sized temporary


def peak_extra_bytes(fn):
    """Peak bytes allocated on the CPU while ``fn`` runs, beyond what was allocated before (allocator events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    kineto = getattr(prof.profiler, "kineto_results", None)
    if kineto is None:
        pytest.skip("this torch's profiler gives no kineto allocation events")
    events = sorted((e.start_ns(), e.nbytes()) for e in kineto.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def test_peak_extra_bytes_sees_allocations():
    def two_live_buffers():
        a = torch.empty(1 << 20)
        b = torch.empty(1 << 20)
        del a, b
        torch.empty(1 << 19)

    assert peak_extra_bytes(two_live_buffers) == 8 << 20


N, C = 4096, 1000


def _logits():
    return torch.randn(N, C, generator=torch.Generator().manual_seed(0))


def _labels():
    return torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(1))


CASES = {
    "index": lambda: (_logits(), _labels()),
    "index, log-softmax input": lambda: (_logits().log_softmax(1), _labels()),
    "index, softmax input": lambda: (_logits().softmax(1), _labels()),
    "one-hot int64": lambda: (_logits(), torch.nn.functional.one_hot(_labels(), C)),
    "one-hot bool": lambda: (_logits(), torch.nn.functional.one_hot(_labels(), C).bool()),
    "probs": lambda: (_logits(), _logits().softmax(1)),
    "probs, column-major": lambda: (_logits(), _logits().softmax(1).t().contiguous().t()),
    "classes at dim 1 of [B, C, T]": lambda: (_logits().reshape(16, C, 256), _labels().reshape(16, 256)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_extra_memory_is_a_fraction_of_the_input(case):
    x, t = CASES[case]()
    expected = crossent.diagnose(x, t)
    peak = peak_extra_bytes(lambda: crossent.diagnose(x, t))
    ratio = peak / (x.numel() * x.element_size())
    assert ratio < 0.5, f"{case}: diagnose allocated {peak} bytes at its peak, {ratio:.2f}x the input"
    if case.startswith("index, "):
        assert has(expected, case.split(", ")[1].split()[0])  # the chunked checks still find it
