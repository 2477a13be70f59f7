"""crossent.integrations.transformers against the stock Hugging Face models (the oracle).

Tiny models built from configs (no download), float64 unless said otherwise. The stock loss is computed
in float32 (ForCausalLMLoss casts the logits with .float()), so parity is to float32 precision.
"""

import copy
import dataclasses
import logging

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss  # noqa: E402

from crossent.integrations import transformers as ct  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)
transformers.logging.set_verbosity_error()

V, B, T = 96, 2, 12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matmuls: with 2 threads on a busy 2-core machine each waits on the other (~30 ms a matmul)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

RTOL = 2e-6  # float32 precision of the stock loss


def _llama_like(cls_cfg, **kw):
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=V, head_dim=16, bos_token_id=1, eos_token_id=2,
                pad_token_id=0)
    base.update(kw)
    return cls_cfg(**base)


ARCHS = {
    "llama": lambda: transformers.LlamaForCausalLM(_llama_like(transformers.LlamaConfig)),
    "llama_tied": lambda: transformers.LlamaForCausalLM(_llama_like(transformers.LlamaConfig,
                                                                    tie_word_embeddings=True)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(_llama_like(transformers.Qwen2Config)),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(_llama_like(transformers.Qwen3Config)),
    "mistral": lambda: transformers.MistralForCausalLM(_llama_like(transformers.MistralConfig)),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(_llama_like(transformers.Gemma2Config)),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(_llama_like(transformers.Gemma3TextConfig,
                                                                 final_logit_softcapping=30.0)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=2, vocab_size=V, n_positions=64, bos_token_id=1, eos_token_id=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "phi_bias": lambda: transformers.PhiForCausalLM(transformers.PhiConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=V,
        bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)),
}


def make(arch, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return ARCHS[arch]().to(dtype).train()


def batch(seed=1, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    labels = ids.clone()
    if pad:  # row 1 right-padded by 4 positions: masked out, labels -100; row 0: a prompt not trained on
        mask[1, -4:] = 0
        ids[1, -4:] = 0
        labels[1, -4:] = -100
        labels[0, :3] = -100
    return ids, mask, labels


def pair(arch, mode="linear", dtype=torch.float64, seed=0):
    stock = make(arch, dtype, seed)
    ours = copy.deepcopy(stock)
    handle = ct.apply(ours, mode)
    return stock, ours, handle


def assert_same_grads(stock, ours, rtol=1e-5):
    names = dict(ours.named_parameters())
    n = 0
    for name, p in stock.named_parameters():
        q = names[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is None:
            continue
        scale = max(p.grad.abs().max().item(), 1e-6)
        err = (p.grad - q.grad).abs().max().item()
        assert err <= rtol * scale, f"{name}: gradient differs by {err:.3g} (scale {scale:.3g})"
        n += 1
    assert n > 3


def run_both(stock, ours, **kw):
    a, b = stock(**kw), ours(**kw)
    a.loss.backward()
    b.loss.backward()
    return a, b


# ---------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("mode", ct.MODES)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_parity_loss_and_every_gradient(arch, mode):
    stock, ours, _ = pair(arch, mode)
    ids, mask, labels = batch()
    a, b = run_both(stock, ours, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(b.loss.double(), a.loss.double(), rtol=RTOL, atol=0)
    assert type(b) is type(a)
    if mode == "linear":
        assert b.logits is None
        assert not isinstance(b.loss, type(None))
    else:
        torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    assert_same_grads(stock, ours)


def test_linear_mode_never_runs_the_output_layer(monkeypatch):
    stock, ours, _ = pair("llama")
    ids, mask, labels = batch()
    shapes = []
    linear_forward = nn.Linear.forward

    def spy(self, x):
        shapes.append(self.out_features)
        return linear_forward(self, x)
    monkeypatch.setattr(nn.Linear, "forward", spy)
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert shapes and V not in shapes  # the decoder's layers ran, the [.., V] projection did not
    stock(input_ids=ids, attention_mask=mask, labels=labels)
    assert V in shapes  # the spy sees it when it runs


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_checkpointing_inputs_embeds_and_the_old_cache_name():
    stock = make("qwen3")
    stock.gradient_checkpointing_enable()
    ours = copy.deepcopy(stock)
    ct.apply(ours)
    ids, mask, labels = batch()
    emb = stock.get_input_embeddings()(ids).detach()
    a, b = run_both(stock, ours, inputs_embeds=emb, attention_mask=mask, labels=labels, past_key_values=None,
                    use_cache=False)
    torch.testing.assert_close(b.loss.double(), a.loss.double(), rtol=RTOL, atol=0)
    assert_same_grads(stock, ours)


def test_tied_head_is_tied_and_shares_its_gradient():
    stock, ours, _ = pair("llama_tied")
    assert ours.lm_head.weight is ours.get_input_embeddings().weight
    ids, mask, labels = batch()
    run_both(stock, ours, input_ids=ids, attention_mask=mask, labels=labels)
    assert_same_grads(stock, ours)


@pytest.mark.parametrize("mode", ct.MODES)
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_logits_far_beyond_the_softcap(arch, mode):
    stock = make(arch)
    stock.config.final_logit_softcapping = 2.0
    with torch.no_grad():
        stock.lm_head.weight.mul_(40.0)
    ours = copy.deepcopy(stock)
    ct.apply(ours, mode)
    ids, mask, labels = batch()
    with torch.no_grad():  # the test means something only if the raw logits are far past the cap
        hidden = stock.model(input_ids=ids, attention_mask=mask).last_hidden_state
        raw = stock.lm_head(hidden)
    assert raw.abs().max() > 10 * stock.config.final_logit_softcapping
    a, b = run_both(stock, ours, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(b.loss.double(), a.loss.double(), rtol=RTOL, atol=0)
    assert_same_grads(stock, ours)


@pytest.mark.parametrize("mode", ct.MODES)
def test_shift_labels_are_used_as_given(mode):
    stock, ours, _ = pair("qwen2", mode)
    ids, mask, labels = batch()
    shift = torch.full_like(labels, -100)
    shift[:, :-1] = labels[:, 1:]
    shift[0, 5] = -100
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shift)
    a, b = run_both(stock, ours, **kw)
    torch.testing.assert_close(b.loss.double(), a.loss.double(), rtol=RTOL, atol=0)
    assert_same_grads(stock, ours)
    # and they are not shifted again: a different loss from labels alone
    with torch.no_grad():
        plain = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(plain.item() - b.loss.item()) > 1e-6


@pytest.mark.parametrize("mode", ct.MODES)
@pytest.mark.parametrize("as_tensor", [True, False])
def test_num_items_in_batch_passed_explicitly(mode, as_tensor):
    stock, ours, _ = pair("llama", mode)
    ids, mask, labels = batch()
    n = 37  # e.g. the count over a whole accumulated batch
    num = torch.tensor(n) if as_tensor else n
    a, b = run_both(stock, ours, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=num)
    torch.testing.assert_close(b.loss.double(), a.loss.double(), rtol=RTOL, atol=0)
    assert_same_grads(stock, ours)
    with torch.no_grad():  # it really divides by n: the sum over the counted positions / n
        mean = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
    counted = (labels[:, 1:] != -100).sum().item()
    torch.testing.assert_close(b.loss.double(), mean.double() * counted / n, rtol=1e-9, atol=0)


def test_all_labels_ignored_matches_stock():
    stock, ours, _ = pair("llama")
    ids, mask, labels = batch()
    labels = torch.full_like(labels, -100)
    with torch.no_grad():
        a = stock(input_ids=ids, labels=labels).loss
        b = ours(input_ids=ids, labels=labels).loss
    assert torch.isnan(a) and torch.isnan(b)  # mean over nothing, as the stock loss
    a, b = run_both(stock, ours, input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(5))
    assert a.loss.item() == 0 and b.loss.item() == 0
    assert_same_grads(stock, ours) if any(p.grad is not None and p.grad.abs().sum() > 0
                                          for p in stock.parameters()) else None
    assert all(q.grad is None or q.grad.abs().sum() == 0 for q in ours.parameters())


def test_bfloat16_loss_is_float32_and_close():
    stock, ours, _ = pair("llama", dtype=torch.bfloat16)
    ids, mask, labels = batch()
    a, b = run_both(stock, ours, input_ids=ids, attention_mask=mask, labels=labels)
    assert b.loss.dtype == a.loss.dtype == torch.float32
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-2, atol=0)


@pytest.mark.parametrize("mode", ct.MODES)
def test_under_autocast(mode):
    stock, ours, _ = pair("gemma2", mode, dtype=torch.float32)
    ids, mask, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = stock(input_ids=ids, attention_mask=mask, labels=labels)
        b = ours(input_ids=ids, attention_mask=mask, labels=labels)
    a.loss.backward()
    b.loss.backward()
    assert b.loss.dtype == a.loss.dtype == torch.float32
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-4, atol=0)
    assert_same_grads(stock, ours, rtol=2e-2)  # bfloat16 logits in the stock model


def test_positional_arguments_and_return_dict_false():
    stock, ours, _ = pair("llama")
    ids, mask, labels = batch()
    with torch.no_grad():
        a = stock(ids, mask, labels=labels, return_dict=False)
        b = ours(ids, mask, labels=labels, return_dict=False)
    assert isinstance(b, tuple)
    torch.testing.assert_close(b[0].double(), a[0].double(), rtol=RTOL, atol=0)
    # the stock tuple is (loss, logits, cache, ...): logits keep their place (None: never built)
    assert len(b) == len(a) and b[1] is None and torch.is_tensor(a[1]) and a[1].shape[-1] == stock.config.vocab_size
    assert type(b[2]) is type(a[2])


def test_compile_fullgraph_linear_mode():
    """torch.compile(fullgraph=True) of a patched model's training step: no graph break, the stock loss."""
    stock, ours, _ = pair("llama")
    ids, mask, labels = batch()
    torch._dynamo.reset()
    got = torch.compile(lambda i, m, y: ours(input_ids=i, attention_mask=m, labels=y).loss, backend="aot_eager",
                        fullgraph=True)(ids, mask, labels)
    torch.testing.assert_close(got.double(), stock(input_ids=ids, attention_mask=mask, labels=labels).loss.double(),
                               rtol=RTOL, atol=0)
    torch._dynamo.reset()


def test_gpt2_output_class_and_decoder_fields():
    stock, ours, _ = pair("gpt2")
    ids, mask, labels = batch()
    with torch.no_grad():
        a = stock(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True,
                  output_attentions=True)
        b = ours(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True,
                 output_attentions=True)
    assert type(b) is type(a) is transformers.modeling_outputs.CausalLMOutputWithCrossAttentions
    assert b.logits is None and len(b.hidden_states) == len(a.hidden_states)
    for x, y in zip(a.hidden_states + a.attentions, b.hidden_states + b.attentions):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- unchanged behaviour


def test_generate_is_unchanged():
    stock, ours, _ = pair("llama")
    ids = batch(pad=False)[0][:, :5]
    for m in (stock, ours):
        m.generation_config.pad_token_id = 0
    kw = dict(max_new_tokens=4, do_sample=False)
    for training in (True, False):
        stock.train(training)
        ours.train(training)
        with torch.no_grad():
            assert torch.equal(ours.generate(ids, **kw), stock.generate(ids, **kw))


@pytest.mark.parametrize("mode", ct.MODES)
def test_eval_with_labels_returns_logits_and_the_same_loss(mode):
    stock, ours, _ = pair("gemma2", mode)
    stock.eval()
    ours.eval()
    ids, mask, labels = batch()
    with torch.no_grad():
        a = stock(input_ids=ids, attention_mask=mask, labels=labels)
        b = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert b.logits is not None
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    torch.testing.assert_close(b.loss.double(), a.loss.double(), rtol=RTOL if mode == "loss_function" else 0,
                               atol=0)


def test_labels_none_returns_the_stock_logits():
    stock, ours, _ = pair("qwen3")
    ids, mask, _ = batch()
    with torch.no_grad():
        a = stock(input_ids=ids, attention_mask=mask)
        b = ours(input_ids=ids, attention_mask=mask)
    assert a.loss is None and b.loss is None
    assert torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("mode", ct.MODES)
def test_loss_mapping_is_never_changed(mode):
    before = dict(LOSS_MAPPING)
    stock, ours, handle = pair("llama", mode)
    ids, mask, labels = batch()
    ours(input_ids=ids, labels=labels)
    assert dict(LOSS_MAPPING) == before and LOSS_MAPPING["ForCausalLM"] is ForCausalLMLoss
    assert stock.loss_function is ForCausalLMLoss  # other instances keep the stock loss
    handle.remove()
    assert dict(LOSS_MAPPING) == before


# ------------------------------------------------------------------------------------ apply / remove / copies


def test_apply_twice_does_not_double_wrap_and_remove_restores():
    stock, ours, handle = pair("llama")
    forward = ours.forward
    assert ct.apply(ours) is handle and ours.forward == forward
    assert ours.forward.__func__ is handle.function
    ids, mask, labels = batch()
    assert ours(input_ids=ids, labels=labels).logits is None
    assert handle.remove() is True and ct.remove(ours) is False
    assert "forward" not in ours.__dict__ and "_loss_function" not in ours.__dict__
    out = ours(input_ids=ids, labels=labels)
    assert out.logits is not None  # the stock forward again
    h2 = ct.apply(ours, "loss_function")
    assert ours.loss_function is ct.causal_lm_loss and "forward" not in ours.__dict__
    h3 = ct.apply(ours)  # switching mode removes the other one
    assert h3 is not h2 and not h2.active and "_loss_function" not in ours.__dict__
    assert ours(input_ids=ids, labels=labels).logits is None
    ct.remove(ours)
    assert ours.loss_function is ForCausalLMLoss


def test_deepcopy_of_a_patched_model_is_independent():
    _, ours, _ = pair("llama")
    twin = copy.deepcopy(ours)
    assert twin.forward.__self__ is twin
    with torch.no_grad():
        twin.lm_head.weight.mul_(3)
    ids, _, labels = batch()
    with torch.no_grad():
        assert twin(input_ids=ids, labels=labels).loss.item() != ours(input_ids=ids, labels=labels).loss.item()
    ct.remove(twin)
    assert "forward" in ours.__dict__  # the original keeps its patch


def test_a_wrapper_put_on_top_keeps_working_after_remove():
    stock, ours, handle = pair("llama")
    inner = ours.forward
    calls = []

    def outer(*a, **k):  # as accelerate's mixed-precision wrapper does
        calls.append(1)
        return inner(*a, **k)
    ours.forward = outer
    ids, _, labels = batch()
    assert ours(input_ids=ids, labels=labels).logits is None
    handle.remove()
    out = ours(input_ids=ids, labels=labels)
    assert out.logits is not None and len(calls) == 2
    with torch.no_grad():
        torch.testing.assert_close(out.loss, stock(input_ids=ids, labels=labels).loss, rtol=0, atol=0)
    ct.apply(ours)  # reactivates the layer inside the wrapper
    assert ours(input_ids=ids, labels=labels).logits is None and len(calls) == 3


# -------------------------------------------------------------------------------------------------- Trainer


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=8):
        g = torch.Generator().manual_seed(3)
        self.rows = []
        lengths = [4, 9, 5, 10, 6, 11, 7, 13]  # counts sum to an odd number: the two halves differ
        for i in range(n):  # lengths differ, so the token count per accumulated batch differs: num_items matters
            length = lengths[i % len(lengths)]
            ids = torch.randint(3, V, (length,), generator=g)
            self.rows.append(ids)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i]}


def _collate(rows):
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = r["input_ids"]
        mask[i, :len(r["input_ids"])] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _train(model, tmp_path, tag):
    pytest.importorskip("accelerate")
    seen = []
    model.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("num_items_in_batch")), with_kwargs=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / tag), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        dataloader_num_workers=0, seed=0, data_seed=0, disable_tqdm=True, lr_scheduler_type="constant",
        optim="sgd")  # SGD: weights move by lr * gradient; Adam would turn float32 rounding in near-zero
    # gradients into full-size updates, and the weights would differ between AVX2 and AVX-512 hosts
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data(), data_collator=_collate)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, losses, seen


@pytest.mark.parametrize("mode", ct.MODES)
def test_trainer_counts_num_items_as_before_and_trains_the_same(tmp_path, mode):
    stock = make("llama", torch.float32)
    ours = copy.deepcopy(stock)
    ct.apply(ours, mode)
    t1, l1, n1 = _train(stock, tmp_path, "stock")
    t2, l2, n2 = _train(ours, tmp_path, "ours")
    assert t2.model_accepts_loss_kwargs == t1.model_accepts_loss_kwargs is True
    assert t2._loss_shifts_labels == t1._loss_shifts_labels is True
    assert len(n1) == len(n2) == 4 and all(torch.is_tensor(x) for x in n1)
    assert [int(x) for x in n1] == [int(x) for x in n2]
    assert len(set(int(x) for x in n1)) > 1  # the two accumulated batches count differently
    assert len(l1) == len(l2) == 2
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=0)
    for (name, p), q in zip(stock.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_mixed_precision_wraps_our_forward_and_unwraps_back_to_it(tmp_path):
    pytest.importorskip("accelerate")
    stock = make("llama", torch.float32)
    ours = copy.deepcopy(stock)
    handle = ct.apply(ours)
    losses = []
    for model, tag in ((stock, "stock"), (ours, "ours")):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / tag), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
            bf16=True, seed=0, data_seed=0, disable_tqdm=True, lr_scheduler_type="constant")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data(), data_collator=_collate)
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert ours.forward.__func__ is not handle.function  # accelerate's autocast wrapper sits on top of ours
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-3, atol=0)
    bare = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    assert bare.forward.__func__ is handle.function
    ids, _, labels = batch()
    assert bare(input_ids=ids, labels=labels).logits is None


# ------------------------------------------------------------------------------------------------- refusals


def _refused(model, *words, mode="linear", exc=ValueError):
    before = {k: model.__dict__.get(k) for k in ("forward", "_loss_function", "_crossent_integration")}
    with pytest.raises(exc) as info:
        ct.apply(model, mode)
    msg = str(info.value)
    for w in (type(model).__name__,) + words:
        assert w in msg, f"{w!r} not in: {msg}"
    assert all(model.__dict__.get(k) is v for k, v in before.items())  # a refusal leaves the model as it was
    return msg


def test_refuses_cohere_logit_scale_but_loss_function_mode_works():
    torch.manual_seed(0)
    m = transformers.CohereForCausalLM(_llama_like(transformers.CohereConfig)).double()
    _refused(m, "logit_scale", "mode='loss_function'")
    stock = copy.deepcopy(m)
    ct.apply(m, "loss_function")
    ids, mask, labels = batch()
    a, b = run_both(stock, m, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(b.loss.double(), a.loss.double(), rtol=RTOL, atol=0)


def test_refuses_granite_logits_scaling():
    m = transformers.GraniteForCausalLM(_llama_like(transformers.GraniteConfig, logits_scaling=4.0))
    _refused(m, "logits_scaling=4.0", "mode='loss_function'")


class _LoraLinear(nn.Module):  # the shape of a PEFT LoRA layer: base_layer plus adapters
    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, 2, bias=False)
        self.lora_B = nn.Linear(2, base.out_features, bias=False)
        self.weight = base.weight

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def test_refuses_a_lora_head():
    m = make("llama")
    m.lm_head = _LoraLinear(m.lm_head)
    _refused(m, "not a plain torch.nn.Linear", "mode='loss_function'")


def test_refuses_a_hooked_head():
    m = make("llama")
    m.lm_head.register_forward_hook(lambda mod, i, o: o * 2)
    _refused(m, "hooks")


class _TPLlama(transformers.LlamaForCausalLM):
    def forward(self, *args, labels=None, **kwargs):
        if self.config.pretraining_tp > 1:  # the 4.x head split, as far as crossent can tell
            pass
        out = super().forward(*args, **kwargs)
        if labels is not None:
            out.loss = self.loss_function(out.logits, labels, self.config.vocab_size)
        return out


def test_pretraining_tp():
    m = _TPLlama(_llama_like(transformers.LlamaConfig, pretraining_tp=2))
    _refused(m, "pretraining_tp=2", "pretraining_tp = 1")
    # the stock 5.x Llama ignores pretraining_tp in its forward: nothing to refuse, same result
    stock, ours, _ = pair("llama")
    stock.config.pretraining_tp = ours.config.pretraining_tp = 2
    ct.remove(ours)
    ct.apply(ours)
    ids, mask, labels = batch()
    a, b = run_both(stock, ours, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(b.loss.double(), a.loss.double(), rtol=RTOL, atol=0)


def test_refuses_logits_to_keep_with_labels_at_call_time():
    _, ours, _ = pair("llama")
    ids, _, labels = batch()
    with pytest.raises(ValueError) as info:
        ours(input_ids=ids, labels=labels, logits_to_keep=1)
    for w in ("LlamaForCausalLM", "logits_to_keep=1", "labels", "mode='loss_function'"):
        assert w in str(info.value)
    assert ours(input_ids=ids, logits_to_keep=1).logits.shape[1] == 1  # without labels: the stock forward


def test_refuses_models_whose_loss_is_not_causal_lm():
    m = transformers.LlamaForSequenceClassification(_llama_like(transformers.LlamaConfig, num_labels=3))
    for mode in ct.MODES:
        _refused(m, "ForSequenceClassification", "causal", mode=mode)
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=V))
    _refused(bert, "ForMaskedLM", mode="loss_function")
    base = transformers.LlamaModel(_llama_like(transformers.LlamaConfig))
    _refused(base, "loss_function")  # no head, no loss at all
    with pytest.raises(TypeError, match="PreTrainedModel"):
        ct.apply(nn.Linear(2, 2))

    class PeftLike(nn.Module):
        def get_base_model(self):
            return base
    with pytest.raises(TypeError, match=r"PeftLike.*model.get_base_model\(\)"):
        ct.apply(PeftLike())
    with pytest.raises(ValueError, match="mode must be one of"):
        ct.apply(make("llama"), mode="fast")


def test_refuses_router_aux_loss_but_loss_function_mode_works():
    torch.manual_seed(0)
    cfg = _llama_like(transformers.MixtralConfig, num_local_experts=2, num_experts_per_tok=1,
                      output_router_logits=True)
    m = transformers.MixtralForCausalLM(cfg)  # float32: the grouped expert matmul takes no float64
    _refused(m, "output_router_logits", "auxiliary")
    stock = copy.deepcopy(m)
    ct.apply(m, "loss_function")
    ids, mask, labels = batch()
    a, b = run_both(stock, m, input_ids=ids, attention_mask=mask, labels=labels)
    assert a.aux_loss is not None
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=0)


class _ScaledLlama(transformers.LlamaForCausalLM):
    def forward(self, *args, **kwargs):  # a logit transform crossent has no config attribute for
        labels = kwargs.pop("labels", None)
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3
        if labels is not None:
            out.loss = self.loss_function(out.logits, labels, self.config.vocab_size)
        return out


def test_the_apply_time_check_refuses_an_unknown_logit_transform():
    m = _ScaledLlama(_llama_like(transformers.LlamaConfig)).double()
    _refused(m, "changes its logits", "mode='loss_function'")
    m = _ScaledLlama(_llama_like(transformers.LlamaConfig)).double()
    ct.apply(m, check=False)  # the caller's responsibility then
    assert "forward" in m.__dict__


def test_a_model_the_check_cannot_run_says_how_to_skip_it():
    m = make("llama")

    def needs_more(*args, **kwargs):
        raise KeyError("pixel_values")
    m.model.forward = needs_more
    with pytest.raises(RuntimeError, match=r"LlamaForCausalLM.*KeyError.*check=False"):
        ct.apply(m)
    assert "forward" not in m.__dict__
    assert ct.apply(m, check=False).active


def test_refuses_a_custom_instance_loss_function():
    m = make("llama")
    m.loss_function = lambda *a, **k: 0
    _refused(m, "own loss_function", "del model._loss_function")


# ------------------------------------------------------------------------------------------ causal_lm_loss


@pytest.mark.parametrize("num_items", [None, 11, "tensor"])
def test_causal_lm_loss_is_for_causal_lm_loss(num_items):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 7, 40, generator=g, requires_grad=True)
    labels = torch.randint(0, 40, (3, 7), generator=g)
    labels[1, 2:] = -100
    if num_items == "tensor":
        num_items = torch.tensor(11)
    a = ForCausalLMLoss(logits, labels, 40, num_items_in_batch=num_items, position_ids=None)
    b = ct.causal_lm_loss(logits, labels, 40, num_items_in_batch=num_items, position_ids=None)
    ga, = torch.autograd.grad(a, logits)
    gb, = torch.autograd.grad(b, logits)
    torch.testing.assert_close(b, a)
    torch.testing.assert_close(gb, ga)


def test_handle_repr_and_fields():
    _, ours, handle = pair("llama")
    assert "LlamaForCausalLM" in repr(handle) and handle.mode == "linear" and handle.active
    assert dataclasses.is_dataclass(handle.output_class)
