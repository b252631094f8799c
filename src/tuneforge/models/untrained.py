"""Chat-template tokens whose embedding rows were never trained, found before training starts.

A base model's vocabulary often holds the special tokens of its chat template (``<|im_start|>``, ``<|im_end|>``)
without ever having seen them in pre-training: their input and output rows are still at initialisation — near
zero, or all equal to each other (LLaMA-Factory #7943: Qwen base models). LoRA trains neither matrix, so the tuned
model can never learn to emit the end-of-turn token and never stops. This module finds such tokens and, by default,
makes exactly those rows trainable (peft ``trainable_token_indices``, through the same model attribute that
``model.add_tokens`` uses), so a base model learns to stop.

A row is *untrained* when its norm is far below the typical row (below ``NORM_FRACTION`` of the median norm of the
whole matrix) or when it equals another row of the matrix exactly (initialised to one shared value).

Policy (``model.untrained_tokens``): ``train`` (default: the rows train), ``refuse`` (stop with the list), ``ignore``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuneforge.errors import UserError

POLICIES = ("train", "refuse", "ignore")
#: a row whose norm is below this fraction of the median row norm counts as untrained
NORM_FRACTION = 0.1
KEY = "model.untrained_tokens"

_SAMPLE_CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello?"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Bye?"},
    {"role": "assistant", "content": "Bye."},
]


@dataclass(frozen=True)
class UntrainedToken:
    """One template token with an untrained row.

    Attributes:
        token: its text.
        id: its id.
        where: ``input`` (the embedding matrix) or ``output`` (an untied LM head).
        reason: why it looks untrained (its norm vs the median, or how many rows it equals).
    """

    token: str
    id: int
    where: str
    reason: str

    def describe(self) -> str:
        return f"{self.token!r} (id {self.id}, {self.where} row: {self.reason})"


def template_token_ids(tokenizer: Any, template: Any) -> dict[int, str]:
    """``{id: text}`` of the special / added tokens the chat template writes, plus EOS and single-token stop
    strings (the tokens a model must learn to produce or read in every conversation)."""
    added = {int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {})}
    added |= set(getattr(tokenizer, "all_special_ids", None) or [])
    found: dict[int, str] = {}
    texts = []
    try:
        texts.append(template.render(_SAMPLE_CHAT, tokenizer=tokenizer))
    except UserError:
        try:
            texts.append(template.render(_SAMPLE_CHAT[1:], tokenizer=tokenizer))
        except UserError:
            pass
    for text in texts:
        for i in tokenizer(text, add_special_tokens=False)["input_ids"]:
            if i in added:
                found[int(i)] = tokenizer.convert_ids_to_tokens(int(i))
    for text in [*(getattr(template, "stop", None) or []), getattr(template, "turn_end", None)]:
        if not text:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            found[int(ids[0])] = text
    if tokenizer.eos_token_id is not None:
        found[int(tokenizer.eos_token_id)] = tokenizer.eos_token
    return dict(sorted(found.items()))


def untrained_rows(weight: Any, ids: dict[int, str], where: str) -> list[UntrainedToken]:
    """The rows of ``weight`` (vocab x hidden) among ``ids`` that look untrained (see the module docstring)."""
    import torch

    weight = weight.detach().float()
    norms = weight.norm(dim=-1)
    median = float(norms.median())
    out = []
    for i, text in ids.items():
        if i >= weight.shape[0]:
            continue
        norm = float(norms[i])
        if norm < NORM_FRACTION * median:
            out.append(UntrainedToken(text, i, where, f"norm {norm:.3g} vs median {median:.3g}"))
            continue
        same = int(torch.all(weight == weight[i], dim=-1).sum()) - 1
        if same > 0:
            out.append(UntrainedToken(text, i, where, f"equal to {same} other row(s)"))
    return out


def untrained_template_tokens(model: Any, tokenizer: Any, template: Any) -> list[UntrainedToken]:
    """The chat-template tokens of ``tokenizer``/``template`` whose input or output embedding rows in ``model``
    look untrained (one entry per token and matrix; an output head tied to the input embeddings counts once)."""
    ids = template_token_ids(tokenizer, template)
    if not ids:
        return []
    embeddings = model.get_input_embeddings()
    found = untrained_rows(embeddings.weight, ids, "input")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and getattr(output, "weight", None) is not None and output.weight is not embeddings.weight:
        found += untrained_rows(output.weight, ids, "output")
    return found


def apply_untrained_policy(model: Any, tokenizer: Any, template: Any, policy: str = "train", *,
                           trainable_rows: bool = True, echo=None) -> list[UntrainedToken]:
    """Detect untrained template tokens and act on ``policy``; THE hook the training prepare phase calls.

    Call it after the model and tokenizer are loaded (and ``model.add_tokens`` applied) and *before* the method
    wraps the model (``method.apply``): with ``train``, the ids are added to the rows the adapter trains
    (:data:`tuneforge.models.vocab.NEW_TOKENS_ATTR`, which LoRA-family methods pass to peft as
    ``trainable_token_indices``). Full fine-tuning trains every row anyway.

    Args:
        policy: ``train`` | ``refuse`` | ``ignore`` (``model.untrained_tokens``).
        trainable_rows: whether the run's method can train single embedding rows (LoRA family, full); when not,
            ``train`` warns that the rows stay as they are.
        echo: where the report line goes (``print``-like); ``None`` is silent.

    Returns:
        The untrained tokens found (also for ``ignore``), to record in the run.

    Raises:
        UserError: ``refuse`` and some were found (naming them and the option), or an unknown policy.
    """
    if policy not in POLICIES:
        raise UserError(f"{KEY}: {policy!r} is not one of {', '.join(POLICIES)}")
    found = untrained_template_tokens(model, tokenizer, template)
    if not found:
        return found
    listed = "; ".join(t.describe() for t in found)
    if policy == "refuse":
        raise UserError(f"chat-template tokens with untrained embedding rows: {listed}. LoRA cannot train these rows, "
                        f"so the tuned model may never produce them (never stop). Set {KEY}: train to train those "
                        f"rows, or {KEY}: ignore to go on anyway")
    if policy == "ignore":
        if echo:
            echo(f"warning: untrained chat-template token rows (left as they are, {KEY}: ignore): {listed}")
        return found
    if not trainable_rows:
        if echo:
            echo(f"warning: untrained chat-template token rows: {listed}; this method cannot train single embedding "
                 "rows, so they stay untrained (use lora or full fine-tuning to train them)")
        return found
    from tuneforge.models.vocab import NEW_TOKENS_ATTR, new_token_ids

    ids = sorted({*new_token_ids(model), *(t.id for t in found)})
    setattr(model, NEW_TOKENS_ATTR, ids)
    if echo:
        echo(f"untrained chat-template token rows will train ({KEY}: train): {listed}")
    return found


def preview_lines(model_dir: str, tokenizer: Any, template: Any) -> list[str]:
    """Lines for ``data preview``: untrained template tokens of the model in ``model_dir`` (a HF directory with
    safetensors, or a GGUF reference), read from the embedding matrices alone (no model is built).

    Returns ``[]`` when nothing is found or the weights cannot be read cheaply (a hub id, ``.bin`` weights).
    """
    from pathlib import Path

    from tuneforge.models.load import check_model_source, looks_local

    if not model_dir or not looks_local(str(model_dir)):
        return []
    folder = Path(check_model_source(str(model_dir)))
    matrices = _embedding_matrices(folder)
    if not matrices:
        return []
    ids = template_token_ids(tokenizer, template)
    found = []
    for where, weight in matrices.items():
        found += untrained_rows(weight, ids, where)
    return [f"untrained chat-template token row: {t.describe()}" for t in found]


def _embedding_matrices(folder: Any) -> dict[str, Any]:
    """``{"input": tensor, "output": tensor}`` read from ``folder``'s safetensors (output only when untied)."""
    import json

    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    where: dict[str, Any] = {}
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = sorted({folder / f for f in weight_map.values()})
    for file in files:
        with safe_open(str(file), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                if key.endswith("embed_tokens.weight") and "input" not in where:
                    where["input"] = fh.get_tensor(key)
                elif key == "lm_head.weight":
                    where["output"] = fh.get_tensor(key)
    return where
