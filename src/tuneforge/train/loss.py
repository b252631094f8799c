"""Training speed and memory: the chunked cross-entropy, ``train.compile`` and ``train.kernels`` (docs/performance.md).

**Chunked loss** (``train.loss_chunk: N``). The usual causal-LM loss computes the logits of every position at once
(``[batch, length, vocab]``), upcasts them to fp32 and keeps the log-softmax for the backward pass: three tensors of
``batch × length × vocab`` — at a 128k vocabulary the memory peak of a small model's step. Here the model's output
embedding (its LM head) is not run inside the forward pass; its input, the final hidden states, is taken instead,
the labels are shifted once, positions whose label is ``-100`` are dropped (no logits are ever computed for a
prompt token), and the rest go through the head ``N`` positions at a time under activation checkpointing: each
chunk's logits exist only while that chunk's loss (forward) or gradient (backward, recomputed) is computed. The
value is the sum of the chunks' summed cross-entropies divided by the same count the model's own loss divides by
(``num_items_in_batch`` when the Trainer passes it, else the supervised positions of this batch), so it equals the
unchunked loss up to float summation order, and so do the gradients. Cost: the head's forward runs twice for the
supervised positions only.

The head is called as the module it is, so adapters on ``lm_head`` (LoRA ``target_modules`` including it), a
trained head (full fine-tuning) and tied embeddings get their gradients as usual. Gemma's final-logit soft-capping
is applied per chunk; models that transform logits in other ways in their forward (Cohere's ``logit_scale``,
Granite's ``logits_scaling``, ...) are refused, as is ``train.distill`` (it needs the student's full logits).

**Composition.** :func:`loss_trainer_class` returns a Trainer subclass overriding ``compute_loss`` (or ``None``
when nothing changes the loss computation); ``train/phases.py`` passes it as ``base`` to the retention terms'
Trainer (``train/retention``), whose ``compute_loss`` calls ``super()`` — this one — and adds its terms.

**Compile** (``train.compile``): the model's decoder stack (``get_decoder()``: embeddings, layers, final norm) is
compiled in place (``nn.Module.compile(dynamic=True)``): parameter names and the state dict are unchanged, so
checkpoints, resume, ``final/`` and merge see the same modules; the LM head and the loss stay eager, so the chunked
loss still skips prompt positions; ``dynamic=True`` makes one graph serve packed rows of every width (the Trainer's
own ``torch_compile`` recompiled per width). ``auto`` is off on every device for now: on this project's CPU it
gives +11% per step after a ~23 s warm-up (a win for runs longer than ~4 minutes), and no GPU measurement has
been made.

**Kernels** (``train.kernels``): ``liger`` (Liger's Triton kernels) and ``flash_attention`` (FlashAttention-2,
varlen over packed rows from their ``position_ids``) are CUDA-only; on any other device they are refused.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from tuneforge.data.tokenize import IGNORE
from tuneforge.errors import UserError

# Config attributes of models whose forward changes the logits after the head in a way the chunked loss does not
# reproduce (applied in the model's own forward, not in its head module).
_UNSUPPORTED_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier_scale",
                                 "dim_model_base")


# ----------------------------------------------------------------------------- chunked cross-entropy


def chunked_causal_lm_loss(hidden: Any, head: Any, labels: Any, chunk: int, num_items_in_batch: Any = None,
                           softcap: float | None = None) -> Any:
    """Causal-LM cross-entropy of ``head(hidden)`` against ``labels``, ``chunk`` positions at a time.

    Equal (up to float summation order) to ``transformers``' ``ForCausalLMLoss`` on the full logits: position ``t``
    predicts ``labels[t + 1]`` (the shift is done here, once), ``-100`` labels are ignored, logits are fp32.

    Args:
        hidden: ``[batch, length, hidden]`` final hidden states (the head's input).
        head: the output embedding module (``[n, hidden] -> [n, vocab]``), adapters included.
        labels: ``[batch, length]`` unshifted labels with ``-100`` for unsupervised positions.
        chunk: positions per head call.
        num_items_in_batch: the divisor (supervised tokens of the whole accumulated batch); ``None``: the supervised
            positions of this batch (a mean, NaN when there are none — as the unchunked loss).
        softcap: Gemma-style final-logit soft-capping ``cap * tanh(logits / cap)``.

    Returns:
        A scalar fp32 tensor with a graph to ``hidden`` and the head's parameters.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    flat_labels = shifted.reshape(-1).to(hidden.device)
    keep = (flat_labels != IGNORE).nonzero().squeeze(-1)
    states = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    targets = flat_labels.index_select(0, keep)
    grad = torch.is_grad_enabled() and (states.requires_grad or any(p.requires_grad for p in head.parameters()))
    total = states.new_zeros((), dtype=torch.float32)
    # One chunk holds every supervised position: keeping its logits for backward costs no more than recomputing them
    # would hold at the peak, so the recompute (a second head forward) is skipped.
    single = states.shape[0] <= chunk
    for start in range(0, states.shape[0], chunk):
        part = (states[start:start + chunk], targets[start:start + chunk], head, softcap)
        if grad and not single:  # the chunk's logits are dropped after its loss and recomputed in backward
            total = total + checkpoint(_chunk_loss_sum, *part, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(*part)
    divisor = num_items_in_batch if num_items_in_batch is not None else keep.numel()
    if torch.is_tensor(divisor):
        divisor = divisor.to(total.device)
    return total / divisor


def _chunk_loss_sum(states, targets, head, softcap):
    import torch

    logits = head(states).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")


def output_head(model: Any) -> tuple[Any, Any]:
    """``(inner model, output embedding module)`` of ``model`` (a PeftModel or a transformers model).

    Raises:
        UserError: the model has no output embedding module, changes its logits in ways the chunked loss does not
            reproduce, or adds terms to its own loss in its forward (MoE router loss, AdaLoRA's penalty).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        raise UserError(f"train.loss_chunk: {type(inner).__name__} has no output embedding (LM head) module to "
                        "chunk; remove train.loss_chunk")
    config = getattr(inner, "config", None)
    # Terms the model's forward adds to its own loss only when it computes that loss (it gets no labels here).
    if getattr(config, "output_router_logits", False):
        raise UserError(f"train.loss_chunk: {type(inner).__name__} adds its router's auxiliary loss to its own loss "
                        "(output_router_logits), which the chunked loss would leave out; remove train.loss_chunk")
    peft_types = {str(getattr(c, "peft_type", "")).split(".")[-1] for c in getattr(model, "peft_config", {}).values()}
    if "ADALORA" in peft_types:
        raise UserError("train.loss_chunk: AdaLoRA adds its orthogonality penalty to the model's own loss, which the "
                        "chunked loss would leave out; remove train.loss_chunk")
    for name in _UNSUPPORTED_LOGIT_TRANSFORMS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise UserError(f"train.loss_chunk: {type(inner).__name__} rescales its logits in its forward "
                            f"(config.{name}), which the chunked loss does not reproduce; remove train.loss_chunk")
    return inner, head


@contextmanager
def captured_head_input(head: Any):
    """While active, ``head(x)`` stores ``x`` and returns an empty ``[..., 0]`` tensor instead of logits.

    The model's forward then never computes its full logits; the caller reads the stored input from the yielded
    dict (key ``"hidden"``). The module's ``forward`` is replaced on the instance only and restored on exit, so the
    state dict, hooks and saving are untouched.
    """
    store: dict[str, Any] = {}
    had_own = "forward" in head.__dict__
    previous = head.__dict__.get("forward")

    def capture(hidden, *args, **kwargs):
        store["hidden"] = hidden
        return hidden.new_empty(*hidden.shape[:-1], 0)

    head.forward = capture
    try:
        yield store
    finally:
        if had_own:
            head.forward = previous
        else:
            del head.forward


def chunked_loss_trainer_class(chunk: int, base: Any = None, *, chosen_by_auto: bool = False):
    """A Trainer subclass of ``base`` whose training and eval loss is :func:`chunked_causal_lm_loss`.

    ``outputs.logits`` of the returned outputs is an empty ``[batch, length, 0]`` tensor (the full logits are
    never computed); prediction steps that need logits (``prediction_loss_only=False``) are therefore refused —
    unless the chunk was ``chosen_by_auto`` (``loss_chunk: auto``), where they quietly use the model's own loss.
    """
    from transformers import Trainer

    class ChunkedLossTrainer(base or Trainer):
        loss_chunk = chunk
        _model_loss = False  # set while a prediction step needs the model's logits (auto only)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "labels" not in inputs or self._model_loss:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inner, head = output_head(self.accelerator.unwrap_model(model))
            labels = inputs["labels"]
            feed = {k: v for k, v in inputs.items() if k != "labels"}
            with captured_head_input(head) as store:
                outputs = model(**feed)
            if "hidden" not in store:
                raise UserError(f"train.loss_chunk: {type(inner).__name__} computes its logits without calling "
                                "its output embedding module; remove train.loss_chunk")
            # The rule the model's own loss follows: divide by the whole accumulated batch's count when the
            # Trainer hands it over (it then skips its own division by the accumulation steps), else a mean.
            divisor = num_items_in_batch if self.model_accepts_loss_kwargs else None
            loss = chunked_causal_lm_loss(store["hidden"], head, labels, self.loss_chunk, divisor,
                                          getattr(inner.config, "final_logit_softcapping", None))
            if self.args.average_tokens_across_devices and divisor is not None:
                # As Trainer.compute_loss: the divisor counts every process's tokens and DDP averages the
                # gradients over processes, so each process's loss is scaled back up by their number.
                scale = self.accelerator.num_processes // self.get_tp_size()
                loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
            outputs["loss"] = loss
            return (loss, outputs) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            if not prediction_loss_only and chosen_by_auto:
                self._model_loss = True
                try:
                    return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
                finally:
                    self._model_loss = False
            if not prediction_loss_only:
                raise UserError("train.loss_chunk: evaluation that needs logits (metrics over predictions) is not "
                                "available with the chunked loss; remove train.loss_chunk")
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    return ChunkedLossTrainer


def resolve_loss_chunk(cfg: Any, model: Any) -> int | None:
    """Positions per chunk of this run's loss, or None for the model's own loss.

    An explicit ``train.loss_chunk: N`` is checked (:func:`check_speed_options` raises where it cannot work);
    ``auto`` is :func:`tuneforge.config.schema.auto_loss_chunk` of the model's vocabulary where
    :func:`tuneforge.config.schema.loss_chunk_auto_applies`, and None (the model's own loss, silently) elsewhere:
    other stages, ``train.distill``, FSDP/DeepSpeed, models whose logits it does not reproduce.
    """
    from tuneforge.config.schema import auto_loss_chunk, loss_chunk_auto_applies

    setting = cfg.train.loss_chunk
    if setting is None:
        return None
    if setting != "auto":
        return int(setting)
    if not loss_chunk_auto_applies(cfg):
        return None
    try:
        _, head = output_head(model)
    except UserError:
        return None
    weight = getattr(head, "weight", None)
    vocab = weight.shape[0] if weight is not None else getattr(model.config, "vocab_size", 0)
    return auto_loss_chunk(vocab)


def loss_trainer_class(cfg: Any, model: Any, base: Any = None):
    """The Trainer class this run's loss needs (extending ``base``), or ``base`` for the model's own loss."""
    chunk = resolve_loss_chunk(cfg, model)
    if chunk is None:
        return base
    return chunked_loss_trainer_class(chunk, base, chosen_by_auto=cfg.train.loss_chunk == "auto")


# ----------------------------------------------------------------------------- compile and kernels


def compile_enabled(setting: str | bool, device: str) -> bool:
    """Whether ``train.compile`` (``auto`` | ``true`` | ``false``) compiles the model on ``device``.

    ``auto`` is off everywhere: measured on CPU (docs/performance.md) compile gains ~11% per step after a ~23 s
    warm-up, so short runs lose; on GPUs it has not been measured by this project yet.
    """
    if setting == "auto":
        return False
    return bool(setting)


def compile_model(model: Any, train_cfg: Any, device: str) -> bool:
    """Compile ``model``'s decoder stack in place when ``train.compile`` asks for it; returns whether it did.

    Only the decoder (``get_decoder()``) is compiled, with ``dynamic=True`` (one graph for every row width): the
    LM head and the loss stay eager for ``train.loss_chunk``, and names, state dict and saving are unchanged.

    Raises:
        UserError: ``compile: true`` on a model without a decoder module to compile.
    """
    if not compile_enabled(getattr(train_cfg, "compile", "auto"), device):
        return False
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    if decoder is None or decoder is inner:
        raise UserError(f"train.compile: {type(inner).__name__} has no decoder module to compile; set "
                        "train.compile: false")
    decoder.compile(dynamic=True)
    return True


def check_kernels(train_cfg: Any, device: str) -> None:
    """Refuse ``train.kernels`` entries the device cannot run (all of them off CUDA).

    Raises:
        UserError: naming the key, the device and the alternative.
    """
    kernels = list(getattr(train_cfg, "kernels", None) or [])
    if not kernels:
        return
    if not str(device).startswith("cuda"):
        raise UserError(
            f"train.kernels {kernels}: these are CUDA kernels (Liger: Triton; FlashAttention-2 varlen) and this run's "
            f"device is {device!r}; remove train.kernels (on CPU packed rows already run as dense rows with "
            "per-sample masks from position_ids, and train.loss_chunk lowers the loss's memory)")
    raise UserError(f"train.kernels {kernels}: not available in this build (they have not been measured on a GPU "
                    "by this project yet); remove train.kernels")


def check_speed_options(cfg: Any, model: Any) -> None:
    """Refuse ``train.loss_chunk`` / ``train.kernels`` where they cannot work, before the run directory is written.

    Raises:
        UserError: ``train.kernels`` off CUDA; ``train.loss_chunk`` on a stage with its own loss (preference,
            GRPO) or on a model whose logits it cannot reproduce.
    """
    from tuneforge.models.device import resolve_device

    check_kernels(cfg.train, resolve_device(cfg.model.device))
    if cfg.train.loss_chunk in (None, "auto"):  # auto never refuses: it falls back to the model's own loss
        return
    if cfg.stage not in ("sft", "pt"):
        raise UserError(f"train.loss_chunk applies to the cross-entropy of stages sft and pt, not {cfg.stage!r} "
                        "(its trainer computes its own loss); remove train.loss_chunk")
    output_head(model)
