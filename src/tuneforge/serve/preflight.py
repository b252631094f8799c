"""Memory preflight of ``tuneforge serve``: the estimate is printed before any model loads.

The bill is :func:`tuneforge.models.memory.serve_components` (the one ``tuneforge estimate MODEL --phase serve``
shows): the weights of every distinct base served (adapters of one base share it; each adapter adds its own
elements), two tokenizers per served name, the KV store of the token budget with its spare columns, the activation
allowance, the prefix-reuse store's bound and one step's logits. The budget is ``--max-memory`` or the memory available now (free RAM, or free GPU memory
on CUDA). When the KV token budget asked for (``--token-budget``, or the default share of the memory left after the
weights) does not fit, the largest budget that does is used and said; when not even one row of the longest request
the server accepts fits beside the weights, serve stops with both numbers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tuneforge.errors import UserError

_GIB = 1024 ** 3


@dataclass
class ServePlan:
    """What the preflight decided.

    Attributes:
        token_budget: the KV token budget the server runs with (possibly lowered from ``asked``).
        asked: the budget asked for (``--token-budget``, or the default share of the memory left).
        components: the bill at ``token_budget`` (name → bytes).
        budget: the memory budget in bytes.
        lowered: whether ``token_budget`` was lowered to fit.
    """

    token_budget: int
    asked: int
    components: dict[str, int]
    budget: int
    lowered: bool

    @property
    def total(self) -> int:
        return sum(self.components.values())


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _gib(value: float) -> str:
    """A size for a message: GiB, or MiB / KiB below one (a tiny model's numbers stay readable)."""
    for unit, size in (("GiB", _GIB), ("MiB", 1024 ** 2)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value / 1024:.1f} KiB"


def plan_serve(refs: Sequence[Any], *, token_budget: int | None, longest_row: int, rows: int, device: str = "auto",
               max_memory: int | None = None, report: Callable[[str], None] = _stderr) -> ServePlan:
    """Price serving ``refs`` and fit the KV token budget into the memory budget.

    Args:
        refs: the resolved model references to serve (``ModelRef``; adapters of one base share its weights).
        token_budget: ``--token-budget`` (``None``: :data:`tuneforge.serve.engine.BUDGET_MEMORY_SHARE` of the memory
            left once the weights are in, as the engine sizes it).
        longest_row: tokens of the longest row a request may need (prompt cap + ``--max-tokens-limit``, within the
            context): the smallest KV budget worth serving with.
        rows: most rows decoded together (``--max-batch-size``): one step's logits.
        device: where the models will load.
        max_memory: the budget in bytes (default: the memory available on ``device`` now).
        report: where the estimate line goes (stderr).

    Raises:
        UserError: the weights and one longest row do not fit, naming the estimate, the budget and what to change.
    """
    from tuneforge.models import memory
    from tuneforge.models.device import resolve_device, resolve_dtype
    from tuneforge.serve.engine import BUDGET_MEMORY_SHARE, MAX_TOKEN_BUDGET

    device = resolve_device(device)
    element = float(resolve_dtype("auto", device).itemsize)
    budget = memory.memory_budget(max_memory, device)
    weights, kv, activations, per_token, vocab = 0, 0, 0, 0, 0
    bases: set[str] = set()
    for ref in refs:
        numbers = memory.model_numbers(ref)
        if ref.base_key not in bases:  # adapters of one base share its weights
            bases.add(ref.base_key)
            weights += int(numbers.params * element)
        weights += int(numbers.adapter_params * element)
        kv = max(kv, numbers.kv_per_token(element))
        activations = max(activations, memory.serve_activation_bytes(numbers.hidden, element))
        per_token = max(per_token, memory.serve_bytes_per_token(numbers.kv_per_token(element), numbers.hidden,
                                                                element))
        vocab = max(vocab, numbers.vocab)

    def components(tokens: int) -> dict[str, int]:
        # every served name has its tokenizer and the request handlers' copy of it (serve.engine.Served)
        return memory.serve_components(weights, kv, token_budget=tokens, rows=rows, vocab=vocab,
                                       activation_per_token=activations, tokenizers=2 * len(refs))

    fixed = sum(components(0).values())
    asked = token_budget
    if asked is None:
        asked = max(1024, min(MAX_TOKEN_BUDGET, int(max(0, budget - fixed) * BUDGET_MEMORY_SHARE) // per_token))
    source = "--max-memory" if max_memory else f"the memory available now on {device}"
    need_one = sum(components(longest_row).values())
    if need_one > budget:
        raise UserError(
            f"serve: the models need about {_gib(need_one)} (weights {_gib(weights)} + the KV cache of one "
            f"{longest_row:,}-token row {_gib(per_token * longest_row)} + tokenizer and logits) but the budget is "
            f"{_gib(budget)} ({source}). Give a larger --max-memory, serve fewer bases at once, or accept shorter "
            "rows (--max-prompt-tokens, --max-tokens-limit)")
    fitting = memory.largest_fitting(lambda tokens: sum(components(tokens).values()), asked, budget)
    chosen = max(fitting or longest_row, longest_row)
    plan = ServePlan(chosen, asked, components(chosen), budget, chosen < asked)
    line = (f"serve preflight: about {_gib(plan.total)} (weights {_gib(weights)} + KV budget {chosen:,} tokens "
            f"{_gib(per_token * chosen)}) of {_gib(budget)} ({source})")
    if plan.lowered:
        line += (f"; the KV token budget {asked:,} would need {_gib(sum(components(asked).values()))}, so it is "
                 f"lowered to {chosen:,} tokens to fit")
    report(line)
    return plan
