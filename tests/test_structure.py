"""The options object, the impl registry and the knobs: one home each, and they do what they say."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent.config import CONFIG, override
from crossent.impl.registry import IMPLS, explain, resolve
from crossent.options import Options, make_options
from oracle import assert_close64


def test_options_are_frozen_and_normalised():
    o = make_options(classes=5, device=torch.device("cpu"), ignore_index=np.int64(-1),
                     label_smoothing=torch.tensor(0.25), z_loss=np.float32(0.5), softcap=torch.tensor(3))
    assert isinstance(o, Options)
    assert (o.ignore_index, o.label_smoothing, o.z_loss, o.softcap) == (-1, 0.25, 0.5, 3.0)
    assert type(o.ignore_index) is int and type(o.label_smoothing) is float
    with pytest.raises(Exception):
        o.reduction = "sum"  # frozen


@pytest.mark.parametrize("kw, match", [
    (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(label_smoothing=torch.ones(2)), "label_smoothing"),
    (dict(label_smoothing="0.1"), "label_smoothing"),
    (dict(z_loss=float("nan")), "z_loss"),
    (dict(softcap=0), "softcap"),
    (dict(reduction="avg"), "reduction"),
    (dict(num_items=0), "num_items"),
    (dict(num_items=3, reduction="none"), "num_items"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(filter_eps=-1.0), "filter_eps"),
    (dict(weight=torch.ones(4)), "length 5"),
])
def test_options_refuse_with_the_argument_named(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make_options(classes=5, device=torch.device("cpu"), **kw)


@pytest.mark.parametrize("bad", [1.5, True, torch.tensor(1.0), torch.tensor([1, 2]), "x"])
def test_ignore_index_must_be_integer(bad):
    with pytest.raises(TypeError, match="ignore_index"):
        crossent.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), ignore_index=bad)


def test_registry_decides_every_fallback_with_a_reason():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve("auto", cpu, torch.float32).name == "chunked"
    assert resolve("torch", cuda, torch.float16).name == "torch"
    r = resolve("triton", cuda, torch.float64)
    assert r.name == "chunked" and "float64" in r.reason
    assert resolve("auto", cuda, torch.bfloat16).name == "triton"
    assert resolve("auto", cuda, torch.float64).name == "chunked"
    assert resolve("triton", cpu, torch.float32).name == "triton"  # the suite runs under TRITON_INTERPRET=1
    with pytest.raises(ValueError, match="impl='fast' is not one of"):
        resolve("fast", cpu, torch.float32)
    lines = explain(cpu)
    assert len(lines) == len(IMPLS) * 3 and all("impl=" in line for line in lines)
    for name in ("torch", "chunked", "triton"):  # one signature for every impl
        mod = resolve(name, cuda, torch.float32).module
        assert mod.NAME == name and callable(mod.cross_entropy) and callable(mod.linear_cross_entropy)


def test_triton_without_interpreter_is_refused_in_a_fresh_process():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, crossent\n"
            "try:\n    crossent.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), impl='triton')\n"
            "except ValueError as e:\n    print('REFUSED', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "REFUSED" in out.stdout and "TRITON_INTERPRET=1" in out.stdout and "impl='chunked'" in out.stdout


def test_checks_context_manager_restores_even_after_an_error():
    before = crossent.checks_enabled()
    x, t = torch.randn(3, 4), torch.tensor([0, 9, 1])
    with pytest.raises(RuntimeError):
        with crossent.checks(False):
            assert not crossent.checks_enabled()
            loss = crossent.cross_entropy(x, t, reduction="none")  # a NaN at the bad label, no error
            assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
            raise RuntimeError("user code fails inside the block")
    assert crossent.checks_enabled() == before
    if before:
        with pytest.raises(ValueError, match="out of range"):
            crossent.cross_entropy(x, t)


def test_knobs_are_read_at_every_call():
    # a tiny chunk makes the chunked impl loop over many chunks: same numbers
    x = torch.randn(37, 11, dtype=torch.float64)
    t = torch.randint(0, 11, (37,))
    ref = F.cross_entropy(x, t, label_smoothing=0.2)
    with override(chunk_elements=11 * 3):
        assert CONFIG.chunk_elements == 33
        assert_close64(crossent.cross_entropy(x, t, label_smoothing=0.2, impl="chunked"), ref)
    assert CONFIG.chunk_elements == 1 << 19
    with pytest.raises(ValueError, match="unknown crossent knob"):
        with override(chunk_elemnts=3):
            pass


def test_torch_linear_cross_entropy_options_batch_chunk_size_is_honoured(monkeypatch):
    from crossent.impl import chunked

    seen = []
    real = chunked.linear_chunk_rows
    monkeypatch.setattr(chunked, "linear_chunk_rows", lambda *a, **k: seen.append(a[2]) or real(*a, **k))
    x, W = torch.randn(20, 8, dtype=torch.float64), torch.randn(30, 8, dtype=torch.float64)
    t = torch.randint(0, 30, (20,))
    got = crossent.linear_cross_entropy(x, W, t, options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=7),
                                        impl="chunked")
    assert seen == [7]
    assert_close64(got, F.cross_entropy(x @ W.T, t))
    with pytest.raises(TypeError, match="options"):
        crossent.linear_cross_entropy(x, W, t, options={"batch_chunk_size": 7})


def test_packaging_metadata():
    """``pip install crossent`` pulls torch only; triton, transformers and the bench tools are extras;
    the license is an SPDX expression (no setuptools deprecation warning)."""
    import pathlib

    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
    project = meta["project"]
    assert [d.split(">")[0].split("=")[0] for d in project["dependencies"]] == ["torch"]
    assert isinstance(project["license"], str) and project["license"] == "MIT"
    extras = project["optional-dependencies"]
    for extra, package in (("triton", "triton"), ("transformers", "transformers"), ("bench", "matplotlib")):
        assert any(d.startswith(package) for d in extras[extra]), (extra, extras[extra])
    assert any(r.startswith("setuptools>=77") for r in meta["build-system"]["requires"])  # SPDX license support
