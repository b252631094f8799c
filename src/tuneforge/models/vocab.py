"""New vocabulary entries (``model.add_tokens``): tokenizer entries plus initialised embedding rows.

A new token's row starts as the mean of the rows of the pieces the tokenizer split its text into before
(``init: pieces``: the model's reading of the string is its starting meaning, as in Hewitt 2021, "Initializing
new word embeddings for pretrained language models"; ``init: mean``: the mean of every existing row, for tokens
whose text means nothing). The output rows (an untied LM head) get the same rule. The ids of the new rows are
recorded on the model (:data:`NEW_TOKENS_ATTR`) so that adapter methods train those rows (peft's
``trainable_token_indices``) and ``train.embedding_lr`` can give them their own learning rate.

The tokenizer (with its new entries) and the resized embedding/output matrices are saved with the run: a full
model holds them; an adapter saves them beside its weights (``methods.base.adapter_save_kwargs``: the vocabulary
was resized), and :func:`tuneforge.models.reference.load_for_inference` resizes the base to the saved tokenizer
before loading the adapter.
"""

from __future__ import annotations

from typing import Any

from tuneforge.errors import UserError

#: attribute set on the model by :func:`add_tokens`: the ids of the rows it initialised
NEW_TOKENS_ATTR = "_tuneforge_new_token_ids"


def new_token_ids(model: Any) -> list[int]:
    """The ids :func:`add_tokens` added to ``model`` (also through a peft wrapper), ``[]`` when none."""
    for candidate in (model, getattr(model, "base_model", None), getattr(getattr(model, "base_model", None),
                                                                         "model", None)):
        ids = getattr(candidate, NEW_TOKENS_ATTR, None) if candidate is not None else None
        if ids:
            return list(ids)
    return []


def add_tokens(model: Any, tokenizer: Any, spec: Any, *, resizable: bool = True) -> list[int]:
    """Add ``spec``'s tokens (a ``model.add_tokens`` section) to ``tokenizer`` and initialise their rows in ``model``.

    Tokens already in the vocabulary are left as they are (their rows are trained ones). Returns the new ids (also
    stored on the model as :data:`NEW_TOKENS_ATTR`).

    Raises:
        UserError: the embeddings must grow but cannot (a quantized model).
    """
    import torch

    vocab = tokenizer.get_vocab()
    plain = [t for t in spec.tokens if t not in vocab]
    special = [t for t in spec.special_tokens if t not in vocab]
    if not plain and not special:
        return []
    pieces = {t: tokenizer(t, add_special_tokens=False)["input_ids"] for t in plain + special}
    embeddings = model.get_input_embeddings()
    rows = embeddings.weight.shape[0]
    if plain:
        tokenizer.add_tokens(plain)
    if special:
        tokenizer.add_tokens(special, special_tokens=True)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in plain + special]
    if len(tokenizer) > rows:
        if not resizable:
            raise UserError(f"model.add_tokens: the vocabulary grows to {len(tokenizer)} rows but a quantized model's "
                            "embeddings cannot be resized; add the tokens to a full-precision model")
        # mean_resizing=False: every new row is set below; transformers' own mean init draws random numbers
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0] and output.weight.shape[0] >= len(tokenizer):
        matrices.append(output.weight)
    with torch.no_grad():
        for weight in matrices:
            known = weight[:rows].float()
            everything = known.mean(dim=0)
            for token, row in zip(plain + special, ids, strict=True):
                parts = [p for p in pieces[token] if p < rows]
                source = known[parts].mean(dim=0) if spec.init == "pieces" and parts else everything
                weight[row] = source.to(weight.dtype)
    setattr(model, NEW_TOKENS_ATTR, ids)
    return ids


def embedding_parameters(model: Any) -> list[Any]:
    """The trainable parameters of the input embedding and output layers (whatever wraps them: a full matrix,
    peft's trainable-token rows or a ``modules_to_save`` copy), each once (tied weights are one)."""
    found: dict[int, Any] = {}
    modules = [model.get_input_embeddings()]
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        modules.append(output)
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                found.setdefault(id(param), param)
    return list(found.values())
