r"""Hugging Face transformers (5.x) causal language models that train with crossent.

Two modes, both per model instance (nothing global is patched; in particular
``transformers.loss.loss_utils.LOSS_MAPPING`` is never touched, since
``Trainer`` decides how it counts ``num_items_in_batch`` from that table):

- ``apply(model)`` (``mode="linear"``, the default): in training mode with
  ``labels``, the model runs its decoder (``model.base_model``) and computes the
  loss with :func:`crossent.linear_cross_entropy` on the last hidden states and
  the output layer's weight (and bias), so the ``[B, T, V]`` logits are never
  built. It returns the model's usual output class with ``loss`` set and
  ``logits=None``; the other fields come from the decoder's output. Without
  labels, in eval mode (labels or not) and in ``generate()``, the model's own
  forward runs unchanged.
- ``apply(model, mode="loss_function")``: only the instance's ``loss_function``
  becomes :func:`causal_lm_loss` (crossent's fused cross-entropy). The model
  still builds its logits, but not their float32 copy, log-softmax or a
  separate gradient buffer. Works for any causal LM that computes its loss
  through ``self.loss_function``, including those ``mode="linear"`` refuses.

Both give the stock model's loss and gradients: labels shifted by one
(``shift_labels``, when given, are used as they are), ``ignore_index``,
``num_items_in_batch`` (the summed loss divided by it, a tensor moved to the
loss's device), the mean over the counted positions otherwise, Gemma's
``final_logit_softcapping``, a float32 loss for 16-bit models (a float64 model
gets a float64 loss, where the stock one casts its logits to float32).

Where models are trained, ``mode="linear"`` still builds no logits:

- **FSDP2** (``fully_shard`` per layer, on the root only, or on the head
  alone; before or after :func:`apply`; any ``MixedPrecisionPolicy``), also as
  Hugging Face's ``DistributedConfig(fsdp_size=...)`` wraps it: a head that
  FSDP manages on its own computes the loss inside its own forward (the head
  module is called with the loss in place of the logits), so FSDP's hooks
  unshard its weight, reshard it and reduce-scatter its gradient as usual.
- **Tensor parallel** (torch's ``ColwiseParallel`` on the head, Hugging Face's
  ``DistributedConfig(tp_size=...)``): the head's ``DTensor`` weight, sharded
  on the vocabulary, runs the vocab-parallel linear loss; the logits are
  never gathered.
- **PEFT**: ``modules_to_save`` trains the active adapter's copy of the head;
  LoRA on the head is one linear cross-entropy over ``[h, s A(drop(h))]`` and
  ``[W, B]`` (``[N, H + r]`` and ``[V, H + r]``: no ``[N, V]`` tensor; the
  concatenated weight and its float32 gradient cost one ``[V, H + r]`` each),
  with gradients to ``A``, ``B`` (and the hidden states), ``W`` frozen. Pass
  ``peft_model.get_base_model()``. DoRA and other LoRA variants are refused.
- DeepSpeed ZeRO-3 is not supported nor tested (the project's tests run on
  CPU machines without DeepSpeed): it gathers parameters in forward hooks on
  every module, which crossent does not know, so :func:`apply` refuses such a
  head with the hooks message; use ``mode="loss_function"`` there.

``mode="linear"`` refuses, with a ``ValueError`` naming the model, the reason
and the fix, what it cannot reproduce: logit scaling (Cohere's
``logit_scale``, Granite's ``logits_scaling``), an output layer that is not a
plain ``nn.Linear`` (a quantised layer) or has hooks crossent does not know
(offloading, device maps; FSDP2's and tensor parallel's are known), a forward
that slices the head by ``pretraining_tp``, a router auxiliary loss
(``output_router_logits``), models whose loss is not the causal-LM loss, and,
at call time, ``logits_to_keep`` together with labels. It also checks itself
once at apply time (``check=True``): one eval-mode forward of 8 tokens through
the stock model and through crossent's path, compared logits and loss (as
precise as the coarser of the head's weight and the stock logits); any model
whose forward changes the logits in a way crossent does not know is refused
there. The check needs unsharded parameters, so it is skipped on a model that
is sharded already (apply before sharding to have it).

``num_items_in_batch=0`` (``Trainer``'s count for an accumulated batch whose
labels are all ignored) gives the stock NaN loss and zero gradients. A
patched model pickles (``torch.save(model)``) and trains the same once loaded.

Example::

    >>> import torch, transformers
    >>> from crossent.integrations import transformers as ct
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                num_attention_heads=2, num_key_value_heads=1, vocab_size=100)
    >>> model = transformers.LlamaForCausalLM(cfg)
    >>> handle = ct.apply(model)
    >>> ids = torch.randint(0, 100, (2, 16))
    >>> out = model.train()(input_ids=ids, labels=ids)  # training mode: no logits built
    >>> out.logits is None
    True
    >>> out.loss.backward()
    >>> model.eval()(input_ids=ids, labels=ids).logits.shape  # eval: the stock forward
    torch.Size([2, 16, 100])
    >>> handle.remove()                                   # or ct.remove(model)
    True
"""

import contextlib
import dataclasses
import inspect
import typing

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import is_dtensor
from ..functional import cross_entropy, linear_cross_entropy

try:
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.modeling_utils import PreTrainedModel
    from transformers.utils import ModelOutput
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("crossent.integrations.transformers needs Hugging Face transformers 5.x: "
                      "pip install 'crossent[transformers]' (or 'transformers>=5')") from e

__all__ = ["apply", "remove", "causal_lm_loss", "CrossentHandle", "MODES"]

MODES = ("linear", "loss_function")
_STATE = "_crossent_integration"
_LOSS_ONLY_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")
_KEEP_NAMES = ("logits_to_keep", "num_logits_to_keep")


# ----------------------------------------------------------------------------------------------------------------
# the loss function (both modes end here)


def _float32_loss(x):
    """A context in which crossent returns a float32 loss for 16-bit ``x``, as the stock loss (which upcasts the
    logits) does; under an active autocast crossent already does."""
    if x.dtype in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, dtype=x.dtype)
    return contextlib.nullcontext()


def _num_items(num_items_in_batch, device):
    """``(num_items for crossent, finish)``. ``Trainer`` passes 0 for an accumulated batch whose labels
    are all ignored; the stock loss is then ``0 / 0``: NaN, with zero gradients. crossent takes
    counts > 0, so a 0 is replaced by 1 and ``finish`` turns the loss into ``sum / 0`` with the
    gradient of ``0 * sum`` (zero), as the stock one (no host read for a tensor)."""
    n = num_items_in_batch.to(device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    if n is None:
        return None, _same
    if torch.is_tensor(n):
        zero = n == 0
        return torch.where(zero, torch.ones_like(n), n), lambda loss: torch.where(
            zero, loss * 0 + loss.detach() / n.to(loss.dtype), loss)
    if n == 0:
        return 1, lambda loss: loss * 0 + _div0(loss.detach())
    return n, _same


def _same(loss):
    return loss


def _div0(x):
    """``x / 0`` as PyTorch divides (NaN for 0, inf for a positive sum)."""
    return x / torch.zeros((), dtype=x.dtype, device=x.device)


def causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                   **kwargs):
    r"""Hugging Face's ``ForCausalLMLoss`` computed by :func:`crossent.cross_entropy`.

    Same signature and result as ``transformers.loss.loss_utils.ForCausalLMLoss``:
    position ``t`` predicts ``labels[..., t + 1]`` (the last position is
    ignored), or ``shift_labels`` as given; the loss is the sum over the
    counted positions divided by ``num_items_in_batch`` when given, else their
    mean (NaN when no position counts). Unlike the stock function it does not
    upcast the logits to a float32 copy nor keep a log-softmax: crossent's
    fused forward forms the gradient in float32 accumulation and returns a
    float32 loss for 16-bit logits.

    Args:
        logits (Tensor): ``[..., vocab_size]`` logits.
        labels (Tensor): ``[...]`` token ids, ``ignore_index`` where not counted.
        vocab_size (int): the number of classes (the logits' last dim).
        num_items_in_batch (int or Tensor, optional): divide the summed loss by
            this count (gradient accumulation). Default: ``None`` (mean).
        ignore_index (int, optional): label not counted. Default: ``-100``.
        shift_labels (Tensor, optional): labels already shifted (``[...]``, one
            per logit row); ``labels`` is then not read. Default: ``None``.
        **kwargs: the model's other forward arguments, ignored (Hugging Face
            passes them all).

    Example::

        >>> import torch
        >>> from crossent.integrations.transformers import causal_lm_loss
        >>> from transformers.loss.loss_utils import ForCausalLMLoss
        >>> logits, labels = torch.randn(2, 8, 50), torch.randint(0, 50, (2, 8))
        >>> torch.allclose(causal_lm_loss(logits, labels, 50), ForCausalLMLoss(logits, labels, 50))
        True
    """
    if shift_labels is None:
        # labels are small: pad them rather than slicing (and so copying) the logits
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    target = shift_labels.reshape(-1).to(logits.device)
    num_items, finish = _num_items(num_items_in_batch, logits.device)
    with _float32_loss(logits):
        return finish(cross_entropy(logits, target, ignore_index=ignore_index, num_items=num_items))


# ----------------------------------------------------------------------------------------------------------------
# state kept on the model


class CrossentHandle:
    """What :func:`apply` returns (and keeps on the model): ``mode`` and :meth:`remove`.

    ``active`` is ``False`` once removed. The handle lives on the model as
    ``model._crossent_integration``, so ``copy.deepcopy(model)`` copies the
    patched behaviour along with it.
    """

    def __init__(self, model, mode):
        self.model = model
        self.mode = mode
        self.active = True
        self.previous_forward = None   # an instance-level forward that was there before apply
        self.function = None           # our forward function (linear mode)
        self.signature = None          # the class forward's signature (self included)
        self.output_class = None
        self.output_fields = ()        # its field names, read at apply time (torch.compile traces no dataclasses.fields)
        self.decoder_params = frozenset()
        self.decoder_varkw = False

    def remove(self):
        """Undo :func:`apply`: the model computes its loss as before. Returns ``True`` if anything was undone."""
        return remove(self.model)

    def __repr__(self):
        return (f"CrossentHandle(model={type(self.model).__name__}, mode={self.mode!r}, "
                f"active={self.active})")


def _name(model):
    return type(model).__name__


def _state(model):
    return model.__dict__.get(_STATE)


def _original_forward(model, state):
    if state is not None and state.previous_forward is not None:
        return state.previous_forward
    return type(model).forward.__get__(model, type(model))


def crossent_linear_forward(self, *args, **kwargs):
    """crossent.integrations.transformers: in training mode with labels, the loss comes from
    crossent.linear_cross_entropy and logits is None; otherwise the model's own forward."""
    return _patched_forward(self, args, kwargs)


class _LinearForward:
    """``model.forward`` in linear mode. Shaped like a bound method (``__func__``, ``__self__``) for the
    wrappers that rebind it (accelerate's mixed precision), with the stock forward's signature (which
    ``generate()`` and ``Trainer`` read), and picklable: ``torch.save(model)`` stores the model and a
    module-level function, and the loaded model trains the same way."""

    __func__ = staticmethod(crossent_linear_forward)

    def __init__(self, model):
        self.__self__ = model
        self.__name__ = "forward"
        self.__doc__ = crossent_linear_forward.__doc__

    def __call__(self, *args, **kwargs):
        return _patched_forward(self.__self__, args, kwargs)

    @property
    def __signature__(self):
        sig = inspect.signature(type(self.__self__).forward)
        return sig.replace(parameters=list(sig.parameters.values())[1:])

    def __repr__(self):
        return f"<crossent linear-mode forward of {_name(self.__self__)}>"


# ----------------------------------------------------------------------------------------------------------------
# checks


_FIX_LOSS_FUNCTION = "use apply(model, mode='loss_function'), which keeps the model's own logits"


def _forward_code_names(model):
    fn = inspect.unwrap(type(model).forward)
    code = getattr(fn, "__code__", None)
    return None if code is None else set(code.co_names)


def _check_causal_lm(model, mode):
    name = _name(model)
    if not isinstance(model, PreTrainedModel):
        hint = ("; for a PEFT model pass model.get_base_model()" if hasattr(model, "get_base_model") else "")
        raise TypeError(f"apply() takes a Hugging Face PreTrainedModel, got {type(model).__name__}{hint}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model: its labels are not shifted as a causal LM's are, so "
                         "crossent's causal-LM loss would be wrong. Fix: call crossent.linear_cross_entropy or "
                         "crossent.cross_entropy on its outputs yourself")
    loss_type = getattr(model, "loss_type", None)
    stock = LOSS_MAPPING[loss_type] if loss_type in LOSS_MAPPING else ForCausalLMLoss
    if stock is not ForCausalLMLoss:
        raise ValueError(f"{name} computes a {loss_type!r} loss ({stock.__name__}), not the causal-LM loss crossent "
                         "reproduces: its labels are not shifted. Fix: apply crossent only to causal language "
                         "models (...ForCausalLM, ...LMHeadModel)")
    names = _forward_code_names(model)
    if names is not None and "loss_function" not in names:
        raise ValueError(f"{name}.forward does not compute its loss through self.loss_function, so crossent cannot "
                         "stand in for it. Fix: compute the loss yourself with crossent.linear_cross_entropy on "
                         "the decoder's hidden states")
    own = model.__dict__.get("_loss_function")
    if own is not None and own is not causal_lm_loss:
        raise ValueError(f"{name} already has its own loss_function ({getattr(own, '__name__', own)!r}) set on the "
                         "instance; crossent would silently replace it. Fix: del model._loss_function first, or "
                         "keep your loss and do not apply crossent")


@dataclasses.dataclass
class _Head:
    """The output layer as crossent computes it: ``linear`` (a plain ``nn.Linear``, or one managed by
    FSDP2) and any LoRA adapters on it, as ``(lora_A, lora_B, dropout, scaling)``."""

    linear: nn.Module
    loras: tuple = ()

    @property
    def through_module(self):
        """Whether the loss must run inside ``linear``'s own forward, so that FSDP's hooks unshard its
        weight (and reshard it, and reduce-scatter its gradient) as they do for the stock forward."""
        return _is_fsdp_module(self.linear)


def _is_fsdp_module(module):
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - older torch
        return False
    return isinstance(module, FSDPModule)


def _plain_linear(module):
    """``nn.Linear`` itself, or FSDP2's subclass of it (``FSDPLinear``): never another subclass (a
    quantised layer), whose forward is not ``x W^T + b``."""
    if type(module) is nn.Linear:
        return True
    if not _is_fsdp_module(module):
        return False
    from torch.distributed.fsdp import FSDPModule
    return type(module).__bases__ == (FSDPModule, nn.Linear)


def _known_hook(hook):
    """Hooks crossent knows leave ``x W^T + b`` alone: FSDP2's (unshard / reshard) and torch tensor
    parallel's (redistribute the input and output; crossent reads the DTensor weight instead)."""
    fn = getattr(hook, "func", hook)  # functools.partial (grouped fully_shard([norm, lm_head]) binds it so)
    fn = getattr(fn, "__func__", fn)
    if (getattr(fn, "__module__", None) or "").startswith("torch.distributed.fsdp"):
        return True
    return "distribute_module" in (getattr(fn, "__qualname__", None) or "")


def _tp_forward(module):
    """Hugging Face's tensor-parallel forward installed on the instance (``TensorParallelLayer``)."""
    fwd = module.__dict__.get("forward")
    return fwd is not None and "TensorParallelLayer" in getattr(fwd, "__qualname__", "")


def _peft_types():
    """``(ModulesToSaveWrapper, LoraLayer)`` when PEFT is installed, else ``()``."""
    try:
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        return ()
    return ModulesToSaveWrapper, LoraLayer


def _resolve_head(model, head):
    """The :class:`_Head` of ``head`` (PEFT's ``ModulesToSaveWrapper`` and LoRA ``Linear`` unwrapped), or a
    ``ValueError`` naming what crossent cannot reproduce and the fix."""
    name = _name(model)
    if head is None:
        raise ValueError(f"{name}.get_output_embeddings() is None: it has no output layer crossent can fuse with "
                         "the loss (not a causal LM?). Fix: apply crossent only to causal language models")
    peft = _peft_types()
    if peft and isinstance(head, peft[0]):  # modules_to_save: the active adapter's trained copy
        active = [] if head.disable_adapters else list(head.active_adapters)
        head = head.modules_to_save[active[0]] if active and active[0] in head.modules_to_save else \
            head.original_module
        return _resolve_head(model, head)
    if peft and isinstance(head, peft[1]):
        if type(head).__name__ != "Linear":
            raise ValueError(f"{name}'s output layer is a PEFT LoRA {type(head).__qualname__} (quantised or "
                             f"otherwise special): crossent reproduces LoRA on a plain nn.Linear only. Fix: "
                             f"{_FIX_LOSS_FUNCTION}")
        return _lora_head(model, head)
    if not _plain_linear(head):
        raise ValueError(f"{name}'s output layer is a {type(head).__module__}.{type(head).__qualname__}, not a "
                         "plain torch.nn.Linear (a quantised or otherwise wrapped layer): crossent would use only "
                         f"its base weight. Fix: {_FIX_LOSS_FUNCTION}")
    hooks = list(head._forward_hooks.values()) + list(head._forward_pre_hooks.values())
    unknown = [h for h in hooks if not _known_hook(h)]
    if unknown or getattr(head, "_hf_hook", None) is not None or ("forward" in head.__dict__ and not _tp_forward(head)):
        raise ValueError(f"{name}'s output layer has forward hooks or a replaced forward crossent does not know "
                         "(offloading, device maps, custom hooks; FSDP2 and tensor parallel are known): crossent "
                         f"reads its weight directly and would bypass them. Fix: remove them, or {_FIX_LOSS_FUNCTION}")
    w = head.weight
    if type(w) not in (torch.Tensor, nn.Parameter) and not is_dtensor(w):
        raise ValueError(f"{name}'s output weight is a {type(w).__name__}, not a tensor or DTensor crossent can "
                         f"read. Fix: {_FIX_LOSS_FUNCTION}")
    return _Head(head)


def _lora_head(model, layer):
    """A LoRA ``Linear`` on the head: its logits are ``h W^T + b + s B(A(drop(h)))``, one linear
    cross-entropy over ``[h, s A(drop(h))]`` and ``[W, B]`` (no ``[N, V]`` tensor)."""
    name = _name(model)
    base = _resolve_head(model, layer.base_layer)
    if base.loras:
        raise ValueError(f"{name}'s output layer stacks LoRA adapters on LoRA adapters. Fix: {_FIX_LOSS_FUNCTION}")
    if layer.disable_adapters or layer.merged:  # the base layer alone computes the logits (merged: W holds them)
        return base
    loras = []
    for a in layer.active_adapters:
        if a not in layer.lora_A:
            continue
        if a in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(a, False):
            raise ValueError(f"{name}'s output layer uses a LoRA variant (DoRA or another lora_variant) for adapter "
                             f"{a!r}: crossent reproduces plain LoRA only. Fix: {_FIX_LOSS_FUNCTION}")
        loras.append((layer.lora_A[a], layer.lora_B[a], layer.lora_dropout[a], layer.scaling[a]))
    if loras and (base.through_module or is_dtensor(base.linear.weight)):
        raise ValueError(f"{name}'s output layer is sharded (FSDP or tensor parallel) under its LoRA adapters: "
                         f"crossent does not reproduce that combination. Fix: {_FIX_LOSS_FUNCTION}")
    return _Head(base.linear, tuple(loras))


def _check_linear(model):
    name, cfg = _name(model), model.config
    for attr, who in (("logit_scale", "Cohere"), ("logits_scaling", "Granite")):
        value = getattr(cfg, attr, None)
        if value is not None and value != 1:
            raise ValueError(f"{name} scales its logits (config.{attr}={value}, as {who} models do): mode='linear' "
                             f"does not apply that scale. Fix: {_FIX_LOSS_FUNCTION}")
    tp = getattr(cfg, "pretraining_tp", 1) or 1
    names = _forward_code_names(model)
    if tp > 1 and (names is None or "pretraining_tp" in names):
        raise ValueError(f"{name} splits its output layer into config.pretraining_tp={tp} slices in its forward: "
                         "mode='linear' does not. Fix: set model.config.pretraining_tp = 1 (the same math), or "
                         + _FIX_LOSS_FUNCTION)
    if getattr(cfg, "output_router_logits", False):
        raise ValueError(f"{name} adds a router auxiliary loss to its training loss (config.output_router_logits="
                         f"True): mode='linear' computes the cross-entropy only. Fix: {_FIX_LOSS_FUNCTION}, or set "
                         "config.output_router_logits = False")
    _resolve_head(model, model.get_output_embeddings())  # refuses what it cannot reproduce, at apply time
    if model.base_model is model:
        raise ValueError(f"{name} has no separate decoder (model.base_model is the model itself), so crossent "
                         f"cannot run it without the output layer. Fix: {_FIX_LOSS_FUNCTION}")


def _output_class(model):
    try:
        ret = typing.get_type_hints(inspect.unwrap(type(model).forward)).get("return")
    except Exception:  # unresolved forward references: fall back
        ret = None
    for cand in (ret,) + typing.get_args(ret):
        if isinstance(cand, type) and issubclass(cand, ModelOutput) and dataclasses.is_dataclass(cand):
            if {"loss", "logits"} <= {f.name for f in dataclasses.fields(cand)}:
                return cand
    return CausalLMOutputWithPast


# ----------------------------------------------------------------------------------------------------------------
# the linear mode's forward


def _is_default(value, default):
    if value is default:
        return True
    if torch.is_tensor(value) or torch.is_tensor(default) or default is inspect.Parameter.empty:
        return False
    try:
        return bool(value == default)
    except Exception:
        return False


def _decoder_kwargs(model, state, named, extra):
    """The CausalLM forward's arguments, as its decoder takes them (the stock forward passes them through)."""
    out = {}
    params = state.signature.parameters
    for k, v in named.items():
        if k in state.decoder_params:
            out[k] = v
        elif not _is_default(v, params[k].default):
            raise TypeError(f"{_name(model)}.forward got {k}={_short(v)}, which its decoder "
                            f"{type(model.base_model).__name__} does not take: crossent's linear mode cannot pass "
                            f"it on. Fix: {_FIX_LOSS_FUNCTION}")
    for k, v in extra.items():
        if k == "past_key_values" and "cache" in state.decoder_params and "cache" not in out \
                and "past_key_values" not in state.decoder_params:
            out["cache"] = v  # the 5.x rename, done here as the stock decorator does
        elif k in state.decoder_params or state.decoder_varkw:
            out[k] = v
        elif k not in _LOSS_ONLY_KWARGS:
            raise TypeError(f"{_name(model)}.forward got {k}={_short(v)}, which its decoder "
                            f"{type(model.base_model).__name__} does not take. Fix: {_FIX_LOSS_FUNCTION}")
    return out


def _short(v):
    return f"<tensor {list(v.shape)}>" if torch.is_tensor(v) else repr(v)


def _softcap(model):
    return getattr(model.config, "final_logit_softcapping", None)


def _head_loss(model, hidden, labels, shift_labels, num_items_in_batch, ignore_index):
    """The training loss from the decoder's last hidden states, without logits. An FSDP2-managed head
    computes it inside its own forward (FSDP's hooks unshard the weight, and reshard it and
    reduce-scatter its gradient afterwards); a tensor-parallel head's ``DTensor`` weight (sharded on the
    vocabulary) runs the vocab-parallel linear loss."""
    head = _resolve_head(model, model.get_output_embeddings())
    target, shift = (shift_labels, False) if shift_labels is not None else (labels, True)

    def loss_of(h):
        return _fused_head_loss(model, head, h, target, shift, num_items_in_batch, ignore_index)

    if not head.through_module:
        return loss_of(hidden)
    module = head.linear
    before = module.__dict__.get("forward")
    module.forward = loss_of  # the module's own call, hooks and all, with the loss in place of the logits
    try:
        return module(hidden)
    finally:
        if before is None:
            del module.forward
        else:
            module.forward = before


def _fused_head_loss(model, head, hidden, target, shift, num_items_in_batch, ignore_index):
    w, b = head.linear.weight, head.linear.bias
    if w.dim() != 2 or w.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{_name(model)}'s output weight is {list(w.shape)} but the hidden states are "
                         f"{list(hidden.shape)} (parameters not gathered? ZeRO-3 shards them outside the layer's "
                         f"forward). Fix: {_FIX_LOSS_FUNCTION}")
    hidden = hidden.to(w.device)
    if head.loras:
        hidden, w, b = _with_loras(head.loras, hidden, w, b)
    device = w.device if not is_dtensor(w) else hidden.device
    num_items, finish = _num_items(num_items_in_batch, device)
    with _float32_loss(hidden):
        loss = linear_cross_entropy(hidden, w, target.to(device), b, ignore_index=ignore_index, shift=shift,
                                    softcap=_softcap(model), num_items=num_items)
    if is_dtensor(loss):  # a tensor-parallel head: the stock forward's loss is a plain tensor too
        loss = loss.to_local()
    return finish(loss)


def _with_loras(loras, hidden, w, b):
    """``[h, u_1, ...]``, ``[W, B_1, ...]`` and ``b + sum s_i b_B_i`` with ``u_i = s_i A_i(drop_i(h))``:
    the LoRA logits as one linear layer whose inputs are ``H + sum r_i`` wide."""
    xs, ws = [hidden], [w]
    for lora_a, lora_b, drop, scaling in loras:
        u = lora_a(drop(hidden.to(lora_a.weight.dtype))) * scaling
        xs.append(u.to(hidden.dtype))
        ws.append(lora_b.weight.to(w.dtype))
        if lora_b.bias is not None:
            extra = (lora_b.bias * scaling).to(w.dtype)
            b = extra if b is None else b + extra
    return torch.cat(xs, -1), torch.cat(ws, 1), b


def _bind(model, state, args, kwargs):
    """The call's arguments by name: (named parameters, the **kwargs dict), or None if they do not bind."""
    try:
        bound = state.signature.bind(model, *args, **kwargs)
    except TypeError:
        return None  # let the model's own forward raise its own error
    named, extra = {}, {}
    for i, (k, v) in enumerate(bound.arguments.items()):
        kind = state.signature.parameters[k].kind
        if i == 0:
            continue  # self
        if kind is inspect.Parameter.VAR_KEYWORD:
            extra.update(v)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if v:
                return None
        else:
            named[k] = v
    return named, extra


def _patched_forward(model, args, kwargs):
    state = _state(model)
    original = _original_forward(model, state)
    if state is None or not state.active or state.mode != "linear" or not model.training:
        return original(*args, **kwargs)
    parts = _bind(model, state, args, kwargs)
    if parts is None:
        return original(*args, **kwargs)
    named, extra = parts
    labels = named.pop("labels", None)
    if labels is None:
        labels = extra.pop("labels", None)
    if labels is None:
        return original(*args, **kwargs)
    return _linear_output(model, state, named, extra, labels)


def _linear_output(model, state, named, extra, labels):
    name = _name(model)
    for k in _KEEP_NAMES:
        keep = named.pop(k, extra.pop(k, 0))
        if torch.is_tensor(keep) or (keep is not None and keep != 0):
            raise ValueError(f"{name} got {k}={_short(keep)} together with labels in training mode: crossent's "
                             f"linear mode computes the loss over every position and builds no logits to keep. "
                             f"Fix: leave {k} at 0 when passing labels, or {_FIX_LOSS_FUNCTION}")
    router = named.get("output_router_logits", extra.get("output_router_logits"))
    if router is None:
        router = getattr(model.config, "output_router_logits", False)
    if router:
        raise ValueError(f"{name} got output_router_logits=True with labels: its training loss would include the "
                         f"router auxiliary loss, which crossent's linear mode does not compute. Fix: "
                         f"{_FIX_LOSS_FUNCTION}")
    return_dict = getattr(model.config, "return_dict", True)
    passed = extra.pop("return_dict", named.pop("return_dict", return_dict))
    if passed is not None:
        return_dict = passed
    shift_labels = extra.get("shift_labels")
    num_items = extra.get("num_items_in_batch")
    ignore_index = extra.get("ignore_index", -100)

    dec_out = model.base_model(**_decoder_kwargs(model, state, named, extra))
    hidden = dec_out.last_hidden_state if isinstance(dec_out, ModelOutput) else dec_out[0]
    loss = _head_loss(model, hidden, labels, shift_labels, num_items, ignore_index)

    fields = {"loss": loss, "logits": None}
    if isinstance(dec_out, ModelOutput):
        for f in state.output_fields:
            if f not in fields and f in dec_out:
                fields[f] = dec_out[f]
    out = state.output_class(**fields)
    if return_dict:
        return out
    # the stock tuple is (loss, logits, ...) with its None fields dropped: keep logits' place (None here),
    # so that out[1] is never the cache
    return tuple(None if f == "logits" else fields[f] for f in state.output_fields
                 if f == "logits" or fields.get(f) is not None)


# ----------------------------------------------------------------------------------------------------------------
# the apply-time check


_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def _sharded(model):
    return any(is_dtensor(p) for p in model.parameters()) or any(_is_fsdp_module(m) for m in model.modules())


def _self_check(model, state):
    """One eval-mode forward of 8 tokens, stock and crossent's linear path: same logits, same loss.
    Skipped for a model whose parameters are sharded (FSDP2, tensor parallel): outside the model's
    forward they are shards, which one forward on one rank cannot use; apply before sharding to have it."""
    head = model.get_output_embeddings()
    w = _resolve_head(model, head).linear.weight
    if w.device.type == "meta" or _sharded(model):
        return
    ids = ((torch.arange(8, device=w.device) * 7 + 3) % w.shape[0])[None]
    kw = {"input_ids": ids}
    if "use_cache" in state.signature.parameters:
        kw["use_cache"] = False
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            stock = _original_forward(model, state)(**kw, labels=ids, return_dict=True)
            named = dict(kw)
            dec_out = model.base_model(**_decoder_kwargs(model, state, named, {}))
            hidden = dec_out.last_hidden_state if isinstance(dec_out, ModelOutput) else dec_out[0]
            mine = head(hidden.to(w.device)).double()  # the head's own forward (LoRA adapters included)
            cap = _softcap(model)
            if cap is not None:
                mine = cap * torch.tanh(mine / cap)
            loss = _head_loss(model, hidden, ids, None, None, -100)
    except Exception as e:
        raise RuntimeError(f"crossent could not run its apply-time check of {_name(model)} (one 8-token forward): "
                           f"{type(e).__name__}: {e}. Fix: apply(model, check=False) to skip it") from e
    finally:
        model.train(was_training)
    ref = stock.logits.double()
    # as precise as the coarser of the weight and the stock logits (Mamba casts float64 logits to float32)
    tol = max(_TOLERANCE.get(w.dtype, 3e-2), _TOLERANCE.get(stock.logits.dtype, 3e-2))
    scale = max(1.0, ref.abs().max().item())
    if ref.shape != mine.shape or (ref - mine).abs().max().item() > tol * scale:
        diff = "shape " + str(list(ref.shape)) if ref.shape != mine.shape else \
            f"max difference {(ref - mine).abs().max().item():.3g}"
        raise ValueError(f"{_name(model)}'s forward changes its logits after the output layer in a way crossent's "
                         f"linear mode does not reproduce ({diff}, checked on 8 tokens in eval mode). Fix: "
                         f"{_FIX_LOSS_FUNCTION}")
    ref_loss = stock.loss.double().item()
    tol = max(tol, 1e-5)  # the stock loss is computed in float32 (it casts the logits with .float())
    if abs(loss.double().item() - ref_loss) > tol * max(1.0, abs(ref_loss)):
        raise ValueError(f"{_name(model)}'s training loss is not the causal-LM cross-entropy of its logits "
                         f"({ref_loss:.6g} vs crossent's {loss.item():.6g}, checked on 8 tokens in eval mode): it "
                         f"adds other terms. Fix: {_FIX_LOSS_FUNCTION}")


# ----------------------------------------------------------------------------------------------------------------
# public


def apply(model, mode="linear", *, check=True):
    r"""Make a Hugging Face causal LM compute its training loss with crossent.

    Per instance: the class, ``LOSS_MAPPING`` and other models are untouched.
    Applying again with the same mode returns the same handle (nothing is
    wrapped twice); with the other mode, the first is removed first.

    Args:
        model (PreTrainedModel): a causal LM (``...ForCausalLM``,
            ``GPT2LMHeadModel``, ...), before ``Trainer`` or ``accelerate``
            wrap it, before or after FSDP2 / tensor parallel shard it. For a
            PEFT model, pass ``model.get_base_model()`` (LoRA on the
            ``lm_head`` and ``modules_to_save`` work in ``mode="linear"``).
        mode (str, optional): ``"linear"``: in training mode with labels, the
            model's forward runs the decoder and
            :func:`crossent.linear_cross_entropy` (no logits; the output's
            ``logits`` is ``None``); otherwise its own forward.
            ``"loss_function"``: only ``model.loss_function`` becomes
            :func:`causal_lm_loss` (logits are built; their float32 copy and
            log-softmax are not). Default: ``"linear"``.
        check (bool, optional): ``mode="linear"`` only: run one eval-mode
            forward of 8 tokens through the stock model and through crossent's
            path, and refuse the model if their logits or loss differ (a
            forward that transforms its logits in a way crossent does not
            know). ``False`` skips it; it is skipped on a model whose
            parameters are sharded already. Default: ``True``.

    Returns:
        CrossentHandle: ``handle.remove()`` undoes it (as :func:`remove`).

    Raises:
        ValueError / TypeError: what crossent cannot reproduce exactly (see the
        module docstring), naming the model, the reason and the fix.

    Example::

        >>> import torch, transformers
        >>> from crossent.integrations import transformers as ct
        >>> cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                num_attention_heads=2, num_key_value_heads=1, vocab_size=100)
        >>> model = transformers.Qwen2ForCausalLM(cfg)
        >>> handle = ct.apply(model)
        >>> ids = torch.randint(0, 100, (2, 16))
        >>> model(input_ids=ids, labels=ids).loss.backward()
        >>> ct.remove(model)
        True
    """
    _check_causal_lm(model, mode)
    state = _state(model)
    if state is not None and state.active:
        if state.mode == mode:
            return state
        remove(model)
        state = _state(model)
    # state is now None, or dormant: our linear forward still sits inside a wrapper someone put on top of it
    new = CrossentHandle(model, mode)
    if state is not None:
        new.previous_forward, new.function = state.previous_forward, state.function
    if mode == "loss_function":
        model.loss_function = causal_lm_loss
        model.__dict__[_STATE] = new
        return new

    _check_linear(model)
    new.signature = inspect.signature(type(model).forward)
    new.output_class = _output_class(model)
    new.output_fields = tuple(f.name for f in dataclasses.fields(new.output_class))
    dec_sig = inspect.signature(model.base_model.forward)
    new.decoder_params = frozenset(k for k, p in dec_sig.parameters.items()
                                   if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
    new.decoder_varkw = any(p.kind is p.VAR_KEYWORD for p in dec_sig.parameters.values())
    install = new.function is None
    if install:
        new.previous_forward = model.__dict__.get("forward")
        new.function = crossent_linear_forward
    if check:
        _self_check(model, new)  # before installing: a refusal leaves the model as it was
    model.__dict__[_STATE] = new
    if install:
        model.forward = _LinearForward(model)
    return new


def remove(model):
    r"""Undo :func:`apply` on ``model``: its forward and ``loss_function`` are as before.

    If something wrapped the model's forward after :func:`apply` (``accelerate``
    does for mixed precision), that wrapper is kept and crossent's layer inside
    it only passes calls through.

    Args:
        model (PreTrainedModel): a model given to :func:`apply`.

    Returns:
        bool: ``True`` if crossent was active on the model, else ``False``.

    Example::

        >>> from crossent.integrations import transformers as ct
        >>> handle = ct.apply(model)          # doctest: +SKIP
        >>> ct.remove(model), ct.remove(model)  # doctest: +SKIP
        (True, False)
    """
    state = _state(model)
    if state is None or not state.active:
        return False
    state.active = False
    if state.mode == "loss_function":
        if model.__dict__.get("_loss_function") is causal_lm_loss:
            del model.__dict__["_loss_function"]
        if state.function is None:
            del model.__dict__[_STATE]
        return True
    current = model.__dict__.get("forward")
    if getattr(current, "__func__", None) is state.function:
        if state.previous_forward is None:
            del model.__dict__["forward"]
        else:
            model.forward = state.previous_forward
        del model.__dict__[_STATE]
    # else someone wrapped our forward after apply: the state stays, inactive, and our layer passes calls through
    return True
