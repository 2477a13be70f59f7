"""PyTorch's own sample inputs, through every crossent impl.

The samples are the ones PyTorch's test suite runs its losses on:

* the OpInfos ``nn.functional.cross_entropy`` and ``nn.functional.linear_cross_entropy``
  (variants ``""``, ``"chunked"``, ``"chunked_none"``) of
  ``torch.testing._internal.common_methods_invocations``;
* the ModuleInfos ``torch.nn.CrossEntropyLoss`` and ``torch.nn.LinearCrossEntropyLoss`` of
  ``torch.testing._internal.common_modules``.

Those modules import ``expecttest`` (and more), which a plain install of torch does not
bring. When they import, their sample functions are used as they are; otherwise the same
grids are rebuilt below from the source of torch 2.13.0 (``_rebuilt_*``: the same shapes,
keyword arguments and draws of ``torch.testing.make_tensor``, in the same order, under
the same seeds). ``SAMPLES_FROM`` says which was used; ``test_sample_sources`` prints it
with the sample counts.

Each sample runs on crossent (``cross_entropy``, ``CrossEntropyLoss``,
``linear_cross_entropy``, ``LinearCrossEntropyLoss``) with ``impl`` "torch", "chunked" and
"triton", in float64, float32 and bfloat16 (the sample functions called at that dtype),
beside PyTorch's own function on the same tensors. The loss (value, dtype, shape) and the
gradients are compared: input; linear weight and bias; and the target where PyTorch's
sample makes it require grad (soft targets). Against:

* float64: PyTorch in float64, to 1e-10 relative (``oracle.assert_close64``);
* float32, bfloat16: crossent's error against PyTorch in float64 (on the same values) is
  at most twice PyTorch's own error at that dtype, plus a few ulps (``oracle.assert_no_worse``).

``reduction="none"`` losses are backpropagated with a fixed random upstream gradient.
PyTorch's ``LinearCrossEntropyOptions`` (``options=``: how PyTorch chunks its own
computation) have no crossent counterpart: crossent runs without them, PyTorch at the
sample's dtype with them, the float64 oracle without. A ``torch.nn.LinearCrossEntropyLoss``
sample is built as PyTorch's module tests build it (parameters drawn under a fixed seed) and
runs through ``crossent.LinearCrossEntropyLoss`` with the module's weight (and bias),
reshaped to ``[num_classes, *out_features, in_features]`` as that module's ``forward`` does.

The triton impl runs on the CPU under ``TRITON_INTERPRET=1``, which is slow: in float32 and
bfloat16 it runs a deterministic subset within ``TRITON_BUDGET`` (``_triton_subset``);
float64 on triton is the chunked path and runs every sample.

Samples crossent rejects on purpose are listed in ``EXPECTED_REJECTIONS`` with the reason;
every other sample must match.
"""

import itertools
import math
import random
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch.testing import make_tensor

import crossent
from oracle import assert_close64, assert_no_worse

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
IMPLS = ["torch", "chunked", "triton"]
SEED = 0

# Samples crossent rejects on purpose: name -> (impls, which samples, the error, its reason, and
# what the error tells the user to do instead, which is then checked like any other sample).
# A listed sample must raise that error on those impls (else: remove it from here); every
# other sample must pass.
@dataclass(frozen=True)
class Rejection:
    impls: frozenset
    applies: Callable[["Sample"], bool]
    error: type
    match: str
    reason: str
    instead: Callable[["Sample"], "Sample"]


# Issue 18 item 3: a soft target that requires grad no longer is one (such a call runs the reference,
# which differentiates it as torch does), so every sample must now match.
EXPECTED_REJECTIONS: dict[str, Rejection] = {}

# Budget of the triton impl in float32 and bfloat16 (under the interpreter), per source and
# dtype, in units of about 20 ms of one core (``Sample.cost``).
TRITON_BUDGET = {
    "opinfo:nn.functional.cross_entropy": 150,
    "module:nn.CrossEntropyLoss": 450,
    "opinfo:nn.functional.linear_cross_entropy": 150,
    "opinfo:nn.functional.linear_cross_entropy.chunked": 80,
    "opinfo:nn.functional.linear_cross_entropy.chunked_none": 80,
    "module:nn.LinearCrossEntropyLoss": 200,
}


# ---------------------------------------------------------------------------------------
# The samples: PyTorch's internals when they import, else the same grids rebuilt.
# ---------------------------------------------------------------------------------------

def _import_internals():
    try:
        from torch.testing._internal import common_methods_invocations as cmi
        from torch.testing._internal import common_modules as cm
    except Exception as e:  # noqa: BLE001 - any import failure (expecttest, numba, ...) means: rebuild
        return None, None, f"{type(e).__name__}: {e}"
    return cmi, cm, None


_CMI, _CM, _IMPORT_ERROR = _import_internals()
HAS_LINEAR_CE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")

if _CMI is not None:
    SAMPLES_FROM = f"torch.testing._internal (torch {torch.__version__})"
else:
    SAMPLES_FROM = (f"rebuilt from the source of torch 2.13.0's torch.testing._internal "
                    f"(torch {torch.__version__} here; internals did not import: {_IMPORT_ERROR})")


class _SampleInput:
    """The fields of torch.testing._internal.opinfo.core.SampleInput that are read here."""

    def __init__(self, input, *args, **kwargs):
        self.input, self.args, self.kwargs = input, args, kwargs


class _FunctionInput:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class _ModuleInput:
    def __init__(self, constructor_input, forward_input=None, desc=""):
        self.constructor_input, self.forward_input, self.desc = constructor_input, forward_input, desc


# --- copied from torch 2.13.0 torch/testing/_internal/common_methods_invocations.py
# (BSD-3-Clause, (c) PyTorch contributors), reduced to what builds the samples.

def _rebuilt_sample_inputs_linear(device, dtype, requires_grad):
    features_options = [[3, 4], [8, 8]]
    batch_options = [[], [0], [8], [2, 3]]
    create_tensor = partial(make_tensor, device=device, dtype=dtype, requires_grad=requires_grad, low=-2, high=2)
    for has_bias, (in_feat, out_feat), batch_shape in itertools.product([True, False], features_options,
                                                                        batch_options):
        input_tensor = create_tensor(batch_shape + [in_feat])
        weight = create_tensor([out_feat, in_feat])
        if not has_bias:
            yield _SampleInput(input_tensor, weight)
            continue
        bias = create_tensor([out_feat])
        yield _SampleInput(input_tensor, weight, bias)
    yield _SampleInput(create_tensor(2, 1, 2, 1, 2), create_tensor(4, 2))
    yield _SampleInput(create_tensor(2, 1, 2, 1, 2), create_tensor(4, 2), create_tensor(4))


def _rebuilt_sample_inputs_cross_entropy(device, dtype, requires_grad):
    batch_size, num_classes = shape = (2, 3)
    reductions = ("mean", "sum", "none")
    input_shape_and_kwargs = [
        (shape, {}),
        ((*shape, 1), {}),
        ((*shape, 1, 2), {}),
        ((*shape, 1, 2, 3), {}),
        *[(shape, dict(reduction=reduction)) for reduction in reductions],
        *[(shape, dict(weight=make_tensor((num_classes,), device=device, dtype=dtype), reduction=reduction))
          for reduction in reductions],
        (shape, dict(ignore_index=1)),
    ]
    for (input_shape, kwargs), probabilities_target in itertools.product(input_shape_and_kwargs, (False, True)):
        input = make_tensor(input_shape, device=device, dtype=dtype, requires_grad=requires_grad)
        if probabilities_target:
            if "ignore_index" in kwargs:
                continue
            target = make_tensor(input_shape, low=0, high=1, device=device, dtype=dtype, requires_grad=requires_grad)
        else:
            target = make_tensor((batch_size, *input_shape[2:]), low=0, high=num_classes, device=device,
                                 dtype=torch.long)
            if "ignore_index" in kwargs and torch.all(target == kwargs["ignore_index"]):
                target[0] = random.sample(sorted(set(range(num_classes)) - {kwargs["ignore_index"]}), 1)[0]
        yield _SampleInput(input, target, **kwargs)


def _rebuilt_sample_inputs_linear_cross_entropy(device, dtype, requires_grad, *, chunked=False,
                                                chunked_none=False):
    reductions = ("mean", "sum", "none")
    LCEO = torch.nn.LinearCrossEntropyOptions
    if chunked:
        sweep_reductions = ("none",) if chunked_none else ("mean", "sum")
        kwargs_list = [
            *[dict(reduction=r, options=LCEO(batch_chunk_size=2, allow_retain_graph=(r != "none")))
              for r in sweep_reductions],
            *[dict(reduction=r, options=LCEO(batch_chunk_size=3, allow_retain_graph=(r != "none")))
              for r in sweep_reductions],
            *[dict(weight="<to be initialized>", reduction=r,
                   options=LCEO(batch_chunk_size=2, allow_retain_graph=(r != "none"))) for r in sweep_reductions],
        ]
        if chunked_none:
            kwargs_list += [
                dict(linear_bias="<to be initialized>", reduction="none", options=LCEO(batch_chunk_size=2)),
                dict(linear_bias="<to be initialized>", weight="<to be initialized>", reduction="none",
                     options=LCEO(batch_chunk_size=2)),
                dict(linear_bias="<to be initialized>", ignore_index=1, reduction="none",
                     options=LCEO(batch_chunk_size=2)),
            ]
        else:
            kwargs_list += [
                dict(ignore_index=1, options=LCEO(batch_chunk_size=2, allow_retain_graph=True)),
                dict(weight="<to be initialized>", ignore_index=1,
                     options=LCEO(batch_chunk_size=2, allow_retain_graph=True)),
                dict(linear_bias="<to be initialized>", options=LCEO(batch_chunk_size=2, allow_retain_graph=True)),
                dict(linear_bias="<to be initialized>", weight="<to be initialized>", reduction="sum",
                     options=LCEO(batch_chunk_size=2, allow_retain_graph=True)),
                dict(linear_bias="<to be initialized>", ignore_index=1,
                     options=LCEO(batch_chunk_size=2, allow_retain_graph=True)),
            ]
        if dtype in {torch.float16, torch.bfloat16}:
            kwargs_list.extend([
                dict(reduction=r, options=LCEO(acc_dtype=torch.float32, allow_retain_graph=(r != "none")))
                for r in sweep_reductions
            ])
    else:
        kwargs_list = [
            {},
            *[dict(reduction=r) for r in reductions if r != "mean"],
            *[dict(weight="<to be initialized>", reduction=r) for r in reductions],
            dict(ignore_index=1),
            dict(linear_bias="<to be initialized>"),
            dict(linear_bias="<to be initialized>", weight="<to be initialized>", reduction="sum"),
        ]

    for kwargs, probabilities_target in itertools.product(kwargs_list, (False, True)):
        for linear_sample in _rebuilt_sample_inputs_linear(device, dtype, requires_grad):
            linear_input = linear_sample.input
            if len(linear_sample.args) == 1:
                linear_weight = linear_sample.args[0]
            else:
                continue
            num_classes = linear_weight.shape[0]
            num_batches = linear_input.shape[:-1]
            input_shape = (*num_batches, num_classes)
            if len(input_shape) <= 2:
                target_shape = input_shape if probabilities_target else num_batches
            else:
                linear_input, linear_weight = linear_weight, linear_input
                num_classes = linear_weight.shape[0]
                out_features = linear_weight.shape[1:-1]
                num_batches = linear_input.shape[:-1]
                if probabilities_target:
                    target_shape = (*num_batches, num_classes, *out_features)
                else:
                    target_shape = (*num_batches, *out_features)
            if 0 in target_shape:
                continue
            if "weight" in kwargs:
                kwargs["weight"] = make_tensor((num_classes,), device=device, dtype=dtype, low=0.5, high=2)
            if "linear_bias" in kwargs:
                kwargs["linear_bias"] = make_tensor(linear_weight.shape[:-1], device=device, dtype=dtype,
                                                    requires_grad=requires_grad)
            if probabilities_target:
                if "ignore_index" in kwargs:
                    continue
                target = make_tensor(target_shape, low=0, high=1, device=device, dtype=dtype,
                                     requires_grad=requires_grad)
            else:
                target = make_tensor(target_shape, low=0, high=num_classes, device=device, dtype=torch.long)
            if (kwargs.get("reduction", "mean") == "mean" and "ignore_index" in kwargs
                    and torch.all(target == kwargs["ignore_index"]) and 0 not in target.shape):
                t = random.sample(sorted(set(range(num_classes)) - {kwargs["ignore_index"]}), 1)[0]
                target[0 if target.shape else ()] = t
            yield _SampleInput(linear_input, linear_weight, target, **kwargs)


# --- copied from torch 2.13.0 torch/testing/_internal/common_modules.py (BSD-3-Clause).

def _rebuilt_module_inputs_CrossEntropyLoss(device, dtype, requires_grad):
    make_input = partial(make_tensor, device=device, dtype=dtype, requires_grad=requires_grad)
    make_target = partial(make_tensor, device=device, dtype=torch.long, requires_grad=False)
    make_weight = partial(make_tensor, device=device, dtype=dtype, requires_grad=False)
    reductions = ["mean", "sum", "none"]
    cases = [
        ("", {}),
        ("weights", {"weight": make_weight((3,))}),
        ("ignore_index", {"ignore_index": 1}),
        ("label_smoothing", {"label_smoothing": 0.15}),
        ("ignore_index_label_smoothing", {"ignore_index": 1, "label_smoothing": 0.15}),
    ]
    module_inputs = []
    for reduction, (desc, constructor_kwargs) in itertools.product(reductions, cases):
        def add(inp, tgt, d):
            module_inputs.append(_ModuleInput(_FunctionInput(reduction=reduction, **constructor_kwargs),
                                              _FunctionInput(inp, tgt), desc=d))
        add(make_input((2, 3, 5, 5)), make_target((2, 5, 5), low=0, high=3), f"4d_{desc}_{reduction}")
        add(make_input((2, 3, 5)), make_target((2, 5), low=0, high=3), f"3d_{desc}_{reduction}")
        add(make_input((2, 3)), make_target((2), low=0, high=3), f"2d_{desc}_{reduction}")
        add(make_input((2, 3, 5, 5, 2, 2)), make_target((2, 5, 5, 2, 2), low=0, high=3),
            f"higher_dim_{desc}_{reduction}")
        if constructor_kwargs.get("ignore_index", None) is None:
            add(make_input((5, 3, 4, 2)), make_input((5, 3, 4, 2)).softmax(dim=1),
                f"4d_prob_target_{desc}_{reduction}")
            add(make_input((5, 3, 4)), make_input((5, 3, 4)).softmax(dim=1), f"3d_prob_target_{desc}_{reduction}")
            add(make_input((5, 3)), make_input((5, 3)).softmax(dim=1), f"2d_prob_target_{desc}_{reduction}")
            add(make_input((2, 3, 5, 5, 2, 2)), make_input((2, 3, 5, 5, 2, 2)).softmax(dim=1),
                f"higher_dim_prob_target_{desc}_{reduction}")
            add(make_input((3,)), make_target((), low=0, high=3), f"no_batch_dim_{desc}_{reduction}")
    return module_inputs


def _rebuilt_module_inputs_LinearCrossEntropyLoss(device, dtype, requires_grad, allow_retain_graph=True,
                                                  acc_dtype=None):
    def make_input(batch_dims, in_features):
        return torch.randn((*batch_dims, in_features), device=device, dtype=dtype, requires_grad=requires_grad)

    def make_target(num_classes, shape, target_dtype):
        if target_dtype.is_floating_point:
            return make_tensor(shape, low=0, high=1, device=device, dtype=target_dtype, requires_grad=False)
        return torch.randint(0, num_classes, shape, device=device, dtype=target_dtype, requires_grad=False)

    def sizes_and_options():
        for sizes in [(8, 5, 4), (None, 8, 4)]:
            yield sizes, None
            num_batches, in_features, num_classes = sizes
            if acc_dtype is not None:
                yield sizes, dict(acc_dtype=acc_dtype, chunking_method="aspect_ratio")
                continue
            yield sizes, dict()
            if num_batches is not None:
                yield sizes, dict(batch_chunk_size=2)
                yield sizes, dict(chunking_method="aspect_ratio:2")
                yield sizes, dict(chunking_method="aspect_ratio:4")

    def samples():
        for (num_batches, in_features, num_classes), options in sizes_and_options():
            batch_dims = () if num_batches is None else (num_batches,)
            weights = [None, torch.exp(torch.randn(num_classes, device=device, dtype=dtype, requires_grad=False))]
            for reduction, ii, ls, w, of in itertools.product(
                    ["sum", "mean", "none"], [None, -100, (num_classes - 1) // 2, num_classes + 5], [0.0, 0.1],
                    weights, [(), (3, 2, 4)]):
                if num_batches is None and of:
                    continue
                if ii is not None and reduction == "sum":
                    continue
                module_args = (in_features, num_classes)
                module_kwargs = dict(
                    out_features=of, device=device, dtype=dtype, reduction=reduction, weight=w, ignore_index=ii,
                    label_smoothing=ls,
                    options=(torch.nn.LinearCrossEntropyOptions(allow_retain_graph=allow_retain_graph, **options)
                             if options is not None else None))
                for target_dtype in [torch.int64, dtype]:
                    if target_dtype.is_floating_point:
                        target_shape = (*batch_dims, num_classes, *of)
                        if ii is not None:
                            continue
                        if options is not None:
                            continue
                    else:
                        target_shape = (*batch_dims, *of)
                    input = make_input(batch_dims, in_features)
                    target = make_target(num_classes, target_shape, target_dtype)
                    if (target.device.type != "meta" and not target_dtype.is_floating_point and reduction == "mean"
                            and ii is not None and 0 <= ii < num_classes and torch.all(target == ii)):
                        target[0 if target.shape else ()] = (ii + 1) % num_classes
                    yield module_args, module_kwargs, (input, target)
                    if not target_dtype.is_floating_point and target_shape and num_batches > 1 and ii is not None:
                        input = make_input(batch_dims, in_features)
                        target = make_target(num_classes, target_shape, target_dtype)
                        target[num_batches // 2] = ii
                        if ii < 0 or ii >= num_classes:
                            target[0] = 0
                        yield module_args, module_kwargs, (input, target)
                    if not target_dtype.is_floating_point and reduction != "mean" and ii is not None:
                        input = make_input(batch_dims, in_features)
                        target = torch.full_like(target, ii)
                        yield module_args, module_kwargs, (input, target)
        for sizes in [(8, 5, 4), (None, 8, 4)]:
            num_batches, in_features, num_classes = sizes
            batch_dims = () if num_batches is None else (num_batches,)
            for of in [(), (3, 2, 4)]:
                if num_batches is None and of:
                    continue
                module_args = (in_features, num_classes)
                base_module_kwargs = dict(out_features=of, bias=True, device=device, dtype=dtype, reduction="mean",
                                          weight=None, ignore_index=None, label_smoothing=0.0)
                options_variants = [None]
                if not of:
                    options_variants.append(torch.nn.LinearCrossEntropyOptions(
                        allow_retain_graph=allow_retain_graph, batch_chunk_size=2))
                for options in options_variants:
                    module_kwargs = dict(base_module_kwargs, options=options)
                    input = make_input(batch_dims, in_features)
                    target = make_target(num_classes, (*batch_dims, *of), torch.int64)
                    yield module_args, module_kwargs, (input, target)

    return [_ModuleInput(_FunctionInput(*a, **k), _FunctionInput(*f)) for a, k, f in samples()]


# --- the two ways in, per source: (internals, rebuilt)

def _opinfo(name, variant):
    if _CMI is None:
        return None
    for op in _CMI.op_db:
        if op.name == name and op.variant_test_name == variant:
            return op
    return None


def _moduleinfo(cls_name):
    if _CM is None or not hasattr(torch.nn, cls_name):
        return None
    for mi in _CM.module_db:
        if mi.module_cls is getattr(torch.nn, cls_name):
            return mi
    return None


def _from_opinfo(name, variant, rebuilt):
    def gen(dtype):
        op = _opinfo(name, variant)
        if op is not None:
            return "internals", list(op.sample_inputs_func(op, "cpu", dtype, True))
        return "rebuilt", list(rebuilt("cpu", dtype, True))
    return gen


def _from_moduleinfo(cls_name, rebuilt):
    def gen(dtype):
        mi = _moduleinfo(cls_name)
        if mi is not None:
            return "internals", list(mi.module_inputs_func(mi, device="cpu", dtype=dtype, requires_grad=True,
                                                           training=True))
        return "rebuilt", rebuilt("cpu", dtype, True)
    return gen


# ---------------------------------------------------------------------------------------
# One neutral form for every source.
# ---------------------------------------------------------------------------------------

@dataclass(eq=False)
class Sample:
    source: str
    name: str
    op: str                  # "ce" | "ce_module" | "lce" | "lce_module"
    input: torch.Tensor
    target: torch.Tensor
    kwargs: dict             # passed to both (weight, ignore_index, reduction, label_smoothing, linear_bias)
    linear_weight: Optional[torch.Tensor] = None
    options: Any = None      # PyTorch's LinearCrossEntropyOptions: PyTorch only
    cost: float = 1.0        # triton interpreter cost estimate
    key: str = ""            # shapes and keywords without options / values: the triton subset's unit
    origin: str = ""         # "internals" | "rebuilt"


def _shape(t):
    return "x".join(map(str, t.shape)) if t.dim() else "scalar"


def _describe(kwargs):
    parts = []
    for k in sorted(kwargs):
        v = kwargs[k]
        if isinstance(v, torch.Tensor):
            parts.append(f"{k}{_shape(v)}")
        elif k == "options":
            continue
        else:
            parts.append(f"{k}={v}")
    return ",".join(parts)


def _target_kind(t):
    return "probs" if t.dtype.is_floating_point else "index"


def _ignored(target, kwargs):
    """How much of an index target is ignore_index: part of a sample's key."""
    ii = kwargs.get("ignore_index", -100)
    if target.dtype.is_floating_point or ii is None:
        return ""
    hit = target == ii
    return "all-ignored" if hit.all() else ("some-ignored" if hit.any() else "")


def _ce_cost(x):
    # the triton CE under the interpreter: about 50 ms a call and 20 ms a position (unit: 20 ms)
    positions = 1 if x.dim() == 1 else x.numel() // x.shape[1]
    return 2.5 + positions


def _lce_cost(x, w):
    # the triton linear CE under the interpreter: about 60 ms a call, little per row at these sizes
    return 3 + x.numel() // x.shape[-1] * math.prod(w.shape[1:-1]) / 8


def _to_samples(source, op, origin, raw):
    out = []
    for i, s in enumerate(raw):
        w, options, desc = None, None, ""
        if op == "ce":
            x, (target,), kw = s.input, s.args, dict(s.kwargs)
        elif op == "lce":
            x, (w, target), kw = s.input, s.args, dict(s.kwargs)
            options = kw.pop("options", None)
        elif op == "ce_module":
            kw, (x, target), desc = dict(s.constructor_input.kwargs), s.forward_input.args, s.desc
        elif op == "lce_module":
            (in_features, num_classes), ckw = s.constructor_input.args, dict(s.constructor_input.kwargs)
            x, target = s.forward_input.args
            torch.manual_seed(SEED + i)  # the module's own parameter init, as PyTorch's module tests build it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = torch.nn.LinearCrossEntropyLoss(in_features, num_classes, **ckw)
            of = tuple(m.out_features)
            w = m.linear.weight.detach().reshape(num_classes, *of, in_features)
            kw = dict(weight=m.weight, reduction=m.reduction, ignore_index=m.ignore_index,
                      label_smoothing=m.label_smoothing)
            if m.linear.bias is not None:
                kw["linear_bias"] = m.linear.bias.detach().reshape(num_classes, *of)
            options = m.options
        else:
            raise AssertionError(op)
        shapes = _shape(x) if w is None else f"{_shape(x)}@{_shape(w)}"
        key = f"{shapes}|{_target_kind(target)}|{_describe(kw)}|{_ignored(target, kw)}"
        name = f"{i:03d}:{desc + ':' if desc else ''}{key}" + (":options" if options is not None else "")
        cost = _ce_cost(x) if w is None else _lce_cost(x, w)
        out.append(Sample(source, name, op, x, target, kw, linear_weight=w, options=options, cost=cost, key=key,
                          origin=origin))
    return out


SOURCES = {
    "opinfo:nn.functional.cross_entropy":
        ("ce", _from_opinfo("nn.functional.cross_entropy", "", _rebuilt_sample_inputs_cross_entropy)),
    "module:nn.CrossEntropyLoss":
        ("ce_module", _from_moduleinfo("CrossEntropyLoss", _rebuilt_module_inputs_CrossEntropyLoss)),
}
if HAS_LINEAR_CE:
    SOURCES.update({
        "opinfo:nn.functional.linear_cross_entropy":
            ("lce", _from_opinfo("nn.functional.linear_cross_entropy", "",
                                 _rebuilt_sample_inputs_linear_cross_entropy)),
        "opinfo:nn.functional.linear_cross_entropy.chunked":
            ("lce", _from_opinfo("nn.functional.linear_cross_entropy", "chunked",
                                 partial(_rebuilt_sample_inputs_linear_cross_entropy, chunked=True))),
        "opinfo:nn.functional.linear_cross_entropy.chunked_none":
            ("lce", _from_opinfo("nn.functional.linear_cross_entropy", "chunked_none",
                                 partial(_rebuilt_sample_inputs_linear_cross_entropy, chunked=True,
                                         chunked_none=True))),
        "module:nn.LinearCrossEntropyLoss":
            ("lce_module", _from_moduleinfo("LinearCrossEntropyLoss", _rebuilt_module_inputs_LinearCrossEntropyLoss)),
    })

_CACHE: dict = {}


def samples(source, dtype):
    """The samples of one source at one dtype (deterministic: the same seeds every time)."""
    if (source, dtype) not in _CACHE:
        op, gen = SOURCES[source]
        torch.manual_seed(SEED)
        random.seed(SEED)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            origin, raw = gen(dtype)
        _CACHE[source, dtype] = _to_samples(source, op, origin, raw)
    return _CACHE[source, dtype]


def _triton_subset(ss, budget):
    """A deterministic subset within about ``budget``: the first sample of every distinct shape and
    target kind (but for shapes costing over a quarter of the budget: PyTorch's 200-position
    ``higher_dim`` CrossEntropyLoss samples; the OpInfo's 2x3x1x2x3 covers three spatial dims),
    then the cheapest sample of every other keyword combination, then the rest cheapest first,
    while the budget lasts."""
    firsts, seen = [], set()
    for s in ss:
        if s.key not in seen:
            seen.add(s.key)
            firsts.append(s)
    chosen, shapes = [], set()
    for s in firsts:
        shape = "|".join(s.key.split("|")[:2])
        if shape not in shapes and s.cost <= budget / 4:
            shapes.add(shape)
            chosen.append(s)
    spent = sum(s.cost for s in chosen)
    kinds = {"|".join(s.key.split("|")[2:]) for s in chosen}
    cheapest = {}
    for s in firsts:
        kind = "|".join(s.key.split("|")[2:])
        if kind not in cheapest or s.cost < cheapest[kind].cost:
            cheapest[kind] = s
    for kind, s in cheapest.items():  # then every keyword combination (and ignored-target state) once
        if kind not in kinds and spent + s.cost <= budget:
            kinds.add(kind)
            chosen.append(s)
            spent += s.cost
    for s in sorted(firsts, key=lambda s: s.cost):
        if s not in chosen and spent + s.cost <= budget:
            chosen.append(s)
            spent += s.cost
    names = {s.name for s in chosen}
    return [s for s in ss if s.name in names]


def selected(source, dtype, impl):
    ss = samples(source, dtype)
    if impl == "triton" and dtype != torch.float64:
        return _triton_subset(ss, TRITON_BUDGET[source])
    return ss


# ---------------------------------------------------------------------------------------
# Running one sample.
# ---------------------------------------------------------------------------------------

def _cast(t, dtype):
    if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
        return t.detach().to(dtype)
    return t


def _leaves(s, dtype):
    """Fresh leaves requiring grad (input, linear_weight, linear_bias) and the rest, at ``dtype``."""
    x = _cast(s.input, dtype).clone().requires_grad_(True)
    w = None if s.linear_weight is None else _cast(s.linear_weight, dtype).clone().requires_grad_(True)
    kw = {k: _cast(v, dtype) for k, v in s.kwargs.items()}
    if kw.get("linear_bias") is not None:
        kw["linear_bias"] = kw["linear_bias"].clone().requires_grad_(True)
    t = s.target
    if t.dtype.is_floating_point:  # a leaf like PyTorch's (it may require grad), without shared graphs
        t = _cast(t, dtype).clone().requires_grad_(s.target.requires_grad)
    return x, w, t, kw


def _call(s, who, impl, x, w, t, kw, options=None):
    if s.op == "ce":
        if who == "torch":
            return F.cross_entropy(x, t, **kw)
        return crossent.cross_entropy(x, t, **kw, impl=impl)
    if s.op == "ce_module":
        if who == "torch":
            return torch.nn.CrossEntropyLoss(**kw)(x, t)
        return crossent.CrossEntropyLoss(**kw, impl=impl)(x, t)
    if s.op == "lce":
        if who == "torch":
            return F.linear_cross_entropy(x, w, t, **kw, options=options)
        return crossent.linear_cross_entropy(x, w, t, **kw, impl=impl)
    if s.op == "lce_module":
        if who == "torch":
            return F.linear_cross_entropy(x, w, t, **kw, options=options)
        bias = kw.pop("linear_bias", None)
        return crossent.LinearCrossEntropyLoss(**kw, impl=impl)(x, w, t, bias)
    raise AssertionError(s.op)


def _upstream(shape, dtype):
    g = torch.Generator().manual_seed(1234)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _run(s, who, impl, dtype, options=None):
    x, w, t, kw = _leaves(s, dtype)
    wrt = {"input": x}
    if w is not None:
        wrt["linear_weight"] = w
    if kw.get("linear_bias") is not None:
        wrt["linear_bias"] = kw["linear_bias"]
    if t.dtype.is_floating_point and t.requires_grad:  # PyTorch's soft targets require grad
        wrt["target"] = t
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = _call(s, who, impl, x, w, t, kw, options)
    go = _upstream(loss.shape, loss.dtype if loss.dtype.is_floating_point else dtype)
    grads = torch.autograd.grad(loss, list(wrt.values()), go, allow_unused=True)
    return loss.detach(), {k: (torch.zeros_like(v) if g is None else g) for (k, v), g in zip(wrt.items(), grads)}


_TORCH: dict = {}


def _torch_results(s, dtype):
    """PyTorch at the sample's dtype (with its options) and in float64: the same for every impl."""
    k = (s.source, s.name, dtype, s.target.requires_grad)
    if k not in _TORCH:
        theirs = _run(s, "torch", None, dtype, s.options)
        exact = theirs if dtype == torch.float64 else _run(s, "torch", None, torch.float64)
        _TORCH[k] = theirs, exact
    return _TORCH[k]


def check_sample(s, impl, dtype):
    """Raises AssertionError (mismatch) or whatever crossent raised."""
    ours = _run(s, "crossent", impl, dtype)
    theirs, exact = _torch_results(s, dtype)
    for (name, a), (_, b) in zip([("loss", ours[0])] + list(ours[1].items()),
                                 [("loss", theirs[0])] + list(theirs[1].items())):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)}, torch {tuple(b.shape)}"
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype}, torch {b.dtype}"
    if dtype == torch.float64:
        assert_close64(ours[0], theirs[0], "loss")
        for k in ours[1]:
            assert_close64(ours[1][k], theirs[1][k], f"grad {k}")
        return
    assert_no_worse(ours[0], theirs[0], exact[0], dtype, "loss")
    for k in ours[1]:
        assert_no_worse(ours[1][k], theirs[1][k], exact[1][k], dtype, f"grad {k}")


def _rejection(s, impl):
    for name, r in EXPECTED_REJECTIONS.items():
        if impl in r.impls and r.applies(s):
            return name, r
    return None, None


def run_sample(s, impl, dtype):
    """check_sample, or for an expected rejection: the rejection, then what its error says to do."""
    name, r = _rejection(s, impl)
    if r is None:
        return check_sample(s, impl, dtype)
    try:
        check_sample(s, impl, dtype)
    except r.error as e:
        if not re.search(r.match, str(e)):
            raise
    else:
        raise AssertionError(f"expected a rejection ({name}) but it passed: remove it from EXPECTED_REJECTIONS?")
    check_sample(r.instead(s), impl, dtype)


def _first_line(e):
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def _group_key(msg):
    # one group per cause: numbers and shapes vary from sample to sample
    msg = re.sub(r"[\[(][-\d, ]*[\])]", "[..]", msg)
    return re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "#", msg)[:160]


# ---------------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The samples are tiny: on a busy machine each op's intra-op thread hand-off costs
    milliseconds (40x the op), so this file runs single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_sample_sources(capsys):
    """Records where the samples came from and how many there are (printed with -s or on -rA)."""
    lines = [f"samples from: {SAMPLES_FROM}"]
    for source in SOURCES:
        counts = []
        for dtype in DTYPES:
            ss = samples(source, dtype)
            assert ss, f"{source}: no samples at {dtype}"
            assert len({s.name for s in ss}) == len(ss)
            counts.append(f"{str(dtype)[6:]}: {len(ss)} ({len({s.key for s in ss})} distinct, "
                          f"{len(selected(source, dtype, 'triton'))} on triton)")
        lines.append(f"{source} [{ss[0].origin}]: " + ", ".join(counts))
    with capsys.disabled():
        print("\n" + "\n".join(lines))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("source", list(SOURCES))
def test_torch_samples(source, dtype, impl):
    failures = defaultdict(list)
    ss = selected(source, dtype, impl)
    for s in ss:
        try:
            run_sample(s, impl, dtype)
        except Exception as e:  # noqa: BLE001 - mismatches and crashes, grouped by cause
            failures[_group_key(_first_line(e))].append((s.name, _first_line(e)))
    if failures:
        n = sum(len(v) for v in failures.values())
        lines = [f"{n} of {len(ss)} samples of {source} [{ss[0].origin}] fail on impl={impl} {dtype}:"]
        for items in sorted(failures.values(), key=len, reverse=True):
            lines.append(f"  [{len(items)}x] {items[0][1]}")
            for name, _ in items[:4]:
                lines.append(f"        {name}")
            if len(items) > 4:
                lines.append(f"        ... {len(items) - 4} more")
        pytest.fail("\n".join(lines), pytrace=False)
