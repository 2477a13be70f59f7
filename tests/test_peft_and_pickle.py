"""crossent's linear mode on PEFT models (LoRA elsewhere, LoRA on the lm_head, modules_to_save), on a
pickled model, on a fully ignored accumulated batch (num_items_in_batch=0), and on float64 Mamba: the
stock model (or the stock PEFT model) is the oracle, loss and every gradient."""

import copy
import io
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from crossent.integrations import transformers as ct  # noqa: E402

from test_transformers import V, _one_thread, assert_same_grads, batch, make, pair  # noqa: E402,F401 (fixture)

logging.getLogger("transformers").setLevel(logging.ERROR)
transformers.logging.set_verbosity_error()


def _peft_pair(config):
    stock = peft.get_peft_model(make("llama"), config)
    ours = copy.deepcopy(stock)
    ct.apply(ours.get_base_model())
    return stock, ours


def _step(model, seed, **kw):
    torch.manual_seed(seed)  # the same dropout masks in both models
    out = model.train()(**kw)
    out.loss.backward()
    return out


def _lora(**kw):
    return peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, **kw)


CASES = {
    "lora_attention": lambda: _lora(target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    "lora_head": lambda: _lora(target_modules=["q_proj", "lm_head"], lora_dropout=0.0),
    "lora_head_dropout": lambda: _lora(target_modules=["lm_head"], lora_dropout=0.1),
    "lora_head_bias": lambda: _lora(target_modules=["lm_head"], lora_dropout=0.0, lora_bias=True),
    "modules_to_save": lambda: _lora(target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_heads_equal_the_stock_peft_model(case):
    stock, ours = _peft_pair(CASES[case]())
    ids, mask, labels = batch()
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels)
    a, b = _step(stock, 7, **kw), _step(ours, 7, **kw)
    assert b.logits is None  # no [B, T, V] tensor
    torch.testing.assert_close(b.loss, a.loss.to(b.loss.dtype), rtol=2e-6, atol=0)
    trained = [n for n, p in stock.named_parameters() if p.requires_grad]
    assert any("lm_head" in n for n in trained) == (case != "lora_attention")
    # every trained parameter's gradient equals the stock one; the frozen base head gets none, as in stock
    got = dict(ours.named_parameters())
    for n, p in stock.named_parameters():
        q = got[n]
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5 * p.grad.abs().max().item(), msg=n)
    assert sum(p.grad is not None for p in stock.parameters()) == len(trained) >= 2


def test_lora_head_dropout_really_drops():
    """With dropout 0.1 the loss depends on the mask: different seeds differ, equal seeds agree."""
    stock, ours = _peft_pair(CASES["lora_head_dropout"]())
    ids, mask, labels = batch()
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels)
    l1, l2 = _step(ours, 1, **kw).loss, _step(ours, 2, **kw).loss
    assert l1.item() != l2.item()


def test_disabled_adapters_and_a_second_adapter():
    stock, ours = _peft_pair(CASES["lora_head"]())
    ids, mask, labels = batch()
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels)
    with stock.disable_adapter(), ours.disable_adapter():  # the base model alone (nothing to train)
        a, b = stock.train()(**kw), ours.train()(**kw)
    assert b.logits is None and not b.loss.requires_grad
    torch.testing.assert_close(b.loss, a.loss.to(b.loss.dtype), rtol=2e-6, atol=0)


def test_dora_on_the_head_is_refused_by_name():
    model = peft.get_peft_model(make("llama"), _lora(target_modules=["lm_head"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        ct.apply(model.get_base_model())


def test_a_pickled_applied_model_loads_and_trains_the_same():
    stock, ours, _ = pair("llama")
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert ct._state(loaded).active and loaded.forward.__self__ is loaded
    ids, mask, labels = batch()
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels)
    a, b = _step(stock, 0, **kw), _step(loaded, 0, **kw)
    assert b.logits is None
    torch.testing.assert_close(b.loss, a.loss.to(b.loss.dtype), rtol=2e-6, atol=0)
    assert_same_grads(stock, loaded)
    assert ct.remove(loaded) and "forward" not in loaded.__dict__


@pytest.mark.parametrize("mode", ct.MODES)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch_zero_gives_the_stock_nan_and_zero_gradients(mode, as_tensor):
    stock, ours, _ = pair("llama", mode)
    ids, mask, _ = batch()
    labels = torch.full_like(ids, -100)  # a fully ignored accumulated batch: Trainer passes 0
    n = torch.tensor(0) if as_tensor else 0
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
    a, b = _step(stock, 0, **kw), _step(ours, 0, **kw)
    assert torch.isnan(a.loss) and torch.isnan(b.loss)
    for (name, p), q in zip(stock.named_parameters(), ours.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(q.grad, torch.zeros_like(q.grad)) and torch.equal(p.grad, torch.zeros_like(p.grad))


def test_float64_mamba_passes_the_self_check_and_matches_stock():
    cfg = transformers.MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=V, state_size=4, expand=2)
    torch.manual_seed(0)
    stock = transformers.MambaForCausalLM(cfg).double()
    ours = copy.deepcopy(stock)
    ct.apply(ours)  # the stock forward casts float64 logits to float32: the check allows for it
    ids = torch.randint(3, V, (2, 10), generator=torch.Generator().manual_seed(4))
    a, b = _step(stock, 0, input_ids=ids, labels=ids), _step(ours, 0, input_ids=ids, labels=ids)
    torch.testing.assert_close(b.loss, a.loss.to(b.loss.dtype), rtol=2e-6, atol=0)
    assert_same_grads(stock, ours, rtol=1e-4)
