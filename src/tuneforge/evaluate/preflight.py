"""Memory preflight of the inference commands (eval, generate, abtest): estimate before the model loads.

The bill is :mod:`tuneforge.models.memory`'s (the one ``tuneforge estimate --phase eval`` shows): weights in the
dtype the model will load in, the tokenizer, and per batch either the scoring terms (perplexity: three
vocabulary-wide tensors per position) or the generation terms (KV cache of every row). The numbers come from the
model's config (meta device) and from the data itself: the longest window the perplexity will score, the longest
prompt plus ``--max-new-tokens``. The budget is ``--max-memory`` or the memory available now (free RAM, or free
GPU memory on CUDA). When the batch does not fit, the largest batch that does is used (said); when even one row
does not fit, the command stops with both numbers before anything loads.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tuneforge.errors import UserError

_GIB = 1024 ** 3


@dataclass
class Plan:
    """What a preflight decided: ``rows`` per batch (possibly lowered from ``asked``), the bill and the budget."""

    rows: int
    asked: int
    components: dict[str, int]
    budget: int

    @property
    def total(self) -> int:
        return sum(self.components.values())


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def plan_rows(spec: Any, *, rows: int, tokens: int, generation: bool, device: str = "auto",
              max_memory: int | None = None, what: str = "eval", option: str = "--batch-size",
              report: Callable[[str], None] = _stderr) -> Plan:
    """Check that ``rows`` sequences of ``tokens`` fit with ``spec``'s weights; lower ``rows`` when only fewer do.

    Args:
        spec: a model reference (anything :func:`tuneforge.models.reference.resolve` takes, or a ``ModelRef``).
        rows: sequences per batch asked for.
        tokens: tokens per sequence (scoring: the window; generation: prompt + new tokens).
        generation: generation (KV cache, last-position logits) rather than scoring (logits of every position).
        device: where the model will run (``auto`` resolved as the loader resolves it).
        max_memory: the budget in bytes (default: available memory now).
        what: the command, for the messages.
        option: the flag that sets ``rows``, for the messages.
        report: where the estimate line goes (stderr by default: stdout may carry JSON).

    Raises:
        UserError: even one row does not fit (naming the estimate, the budget and what to change).
    """
    from tuneforge.models import memory
    from tuneforge.models.device import resolve_device, resolve_dtype
    from tuneforge.models.reference import ModelRef, resolve

    ref = spec if isinstance(spec, ModelRef) else resolve(spec)
    device = resolve_device(device)
    dtype = resolve_dtype("auto", device)
    element = float(dtype.itemsize)
    numbers = memory.model_numbers(ref)
    of = memory.generation_components if generation else memory.scoring_components

    def components(n: int) -> dict[str, int]:
        return of(numbers.weight_bytes(element), numbers.kv_per_token(element), rows=n, tokens=tokens,
                  element=element, **numbers.shape())

    budget = memory.memory_budget(max_memory, device)
    chosen = memory.largest_fitting(lambda n: sum(components(n).values()), max(1, rows), budget)
    kind = "generating" if generation else "scoring"
    if chosen is None:
        need = sum(components(1).values())
        raise UserError(
            f"{what}: {ref.given} needs about {_size(need)} even one row at a time ({kind} {tokens} tokens; "
            f"{_top(components(1))}), above the budget of {_size(budget)}; free memory, raise --max-memory, "
            f"or shorten the sequences ({'--max-new-tokens, shorter prompts' if generation else '--max-length'})")
    plan = Plan(chosen, rows, components(chosen), budget)
    line = (f"{what} memory: {ref.given}: estimated peak {_size(sum(components(rows).values()))} for "
            f"{rows} x {tokens} tokens ({kind}; {_top(components(rows))}); budget {_size(budget)}")
    if chosen < rows:
        line += (f" → {option} lowered from {rows} to {chosen} to fit (estimated {_size(plan.total)}); "
                 "the results do not depend on it")
    report(line)
    return plan


def _top(components: dict[str, int]) -> str:
    """The two largest components, e.g. ``weights 0.50 GiB, logits ... 1.20 GiB``."""
    largest = sorted(components.items(), key=lambda item: -item[1])[:2]
    return ", ".join(f"{name} {_size(size)}" for name, size in largest)


def _size(nbytes: int) -> str:
    """``1.25 GiB``, or ``12.3 MiB`` below a GiB (a small model's figures stay readable)."""
    return f"{nbytes / _GIB:.2f} GiB" if nbytes >= _GIB else f"{nbytes / 2 ** 20:.1f} MiB"


def longest_prompt(spec: Any, prompts: Sequence[Any], tokenizer: Any = None) -> int:
    """Tokens of the longest rendered prompt (chat template applied as generation applies it); ``tokenizer``: the
    model's, when the caller has loaded it already (it is loaded otherwise)."""
    from tuneforge.models.generation import render_prompt
    from tuneforge.models.reference import ModelRef, load_template, load_tokenizer_of, resolve

    ref = spec if isinstance(spec, ModelRef) else resolve(spec)
    tokenizer = tokenizer or load_tokenizer_of(ref)
    template = load_template(ref.template_dir, tokenizer)
    longest = 0
    for prompt in prompts:
        text, add_special = render_prompt(tokenizer, template, prompt)
        longest = max(longest, len(tokenizer(text, add_special_tokens=add_special)["input_ids"]))
    return longest


def scoring_windows(spec: Any, records: list[dict], max_length: int | None,
                    stride: int | None, tokenizer: Any = None) -> tuple[int, int]:
    """``(width, count)`` of the windows the perplexity will score: the widest one (the longest encoded record, at
    most ``--max-length``, else the model's context capped as :func:`tuneforge.evaluate.perplexity.default_window`)
    and how many there are (a batch never holds more); ``tokenizer`` as in :func:`longest_prompt`."""
    from tuneforge.evaluate.perplexity import encode_records, sliding_windows
    from tuneforge.models.reference import ModelRef, load_template, load_tokenizer_of, resolve

    ref = spec if isinstance(spec, ModelRef) else resolve(spec)
    tokenizer = tokenizer or load_tokenizer_of(ref)
    template = load_template(ref.template_dir, tokenizer)
    pairs, _ = encode_records(scored_sequences(records), tokenizer, template)
    window = max_length or _context_window(ref, tokenizer)
    step = stride or max(1, window // 2)
    windows = [len(ids) for ids_, labels in pairs for ids, _ in sliding_windows(ids_, labels, window, step)]
    return max(windows, default=1), max(1, len(windows))


def scored_sequences(records: list[dict]) -> list[dict]:
    """The text and chat sequences a model-scored metric runs through the model: text and chat records as they
    are, a preference pair as its two conversations (what ``reward_acc`` scores), an unpaired (KTO) record as its
    one; records of other kinds score nothing here. Text and chat records alone come back as the same object (an
    eval file's records encode from the prepared-data cache: :class:`tuneforge.data.evalset.EvalRecords`)."""
    if all("text" in record or "messages" in record for record in records):
        return records
    sequences: list[dict] = []
    for record in records:
        if "text" in record or "messages" in record:
            sequences.append(record)
            continue
        for side in ("chosen", "rejected", "completion"):
            if isinstance(record.get(side), list) and isinstance(record.get("prompt"), list):
                sequences.append({"messages": record["prompt"] + record[side], "source": record.get("source", "?")})
    return sequences


def _context_window(ref: Any, tokenizer: Any) -> int:
    from types import SimpleNamespace

    from transformers import AutoConfig

    from tuneforge.evaluate.perplexity import default_window
    from tuneforge.models.load import check_model_source

    config = AutoConfig.from_pretrained(check_model_source(ref.base, ref.given))
    return default_window(SimpleNamespace(config=config), tokenizer)


def generation_preflight(spec: Any, prompts: Sequence[Any], settings: Any, *, device: str = "auto",
                         max_memory: int | None = None, what: str = "generate", tokenizer: Any = None) -> int:
    """The preflight of a command that only generates (``generate``, ``abtest``): the longest prompt +
    ``settings.max_new_tokens`` for generate's rows. Returns the rows per batch (lowered when only fewer fit).
    ``tokenizer`` as in :func:`longest_prompt` (pass the one the model will load with: loading a tokenizer twice
    leaves the second copy resident beside the first's freed heap).

    Raises:
        UserError: one row does not fit the budget.
    """
    from tuneforge.models.memory import GENERATION_ROWS

    tokens = longest_prompt(spec, prompts, tokenizer) + settings.max_new_tokens
    plan = plan_rows(spec, rows=min(GENERATION_ROWS, max(1, len(prompts))), tokens=tokens, generation=True,
                     device=device, max_memory=max_memory, what=what, option="generation batch")
    return plan.rows if plan.rows < plan.asked else GENERATION_ROWS
