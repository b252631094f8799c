"""Progressive LoRA (``method.continue_from``): train a new adapter on top of an earlier run's frozen adapters.

The earlier run's adapters — its own ``stack/`` first, then its ``final/`` — are merged into the base weights in
order (peft ``merge_and_unload``; :func:`tuneforge.models.reference.merge_stack`) before the new adapter is
applied. The merge is exact up to float rounding, costs no memory beyond the base, and makes the earlier
adapters frozen by construction: they are no longer parameters at all. The new run keeps copies of them in
``runs/<new>/stack/00``, ``01``, ... so it is self-contained; every loader of the run
(``models.reference.load_for_inference``) merges the same stack before putting ``final/`` on top, and
``--resume`` merges the run's own copies (not the earlier run, which may have changed or gone).

Refused where a merge would not be exact or not reproduce the earlier model: a quantized base (qlora, or a base
stored quantized), an earlier adapter that is no weight delta (prefix tuning), an earlier full model, a
different base model than ``model.name_or_path``, an unfinished earlier run (docs/multitask.md).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError
from tuneforge.models.reference import RUN_STACK, per_task_runs, run_stack

KEY = "method.continue_from"


@dataclass(frozen=True)
class Stack:
    """The adapters merged under a progressive run's new adapter.

    Attributes:
        adapters: the adapter directories, in merge order (the earlier run's, or this run's own ``stack/`` copies
            on resume).
        origin: ``method.continue_from`` as given.
        sources: where each adapter was copied from (recorded in the manifest and summary).
    """

    adapters: tuple[Path, ...]
    origin: str
    sources: tuple[str, ...]
    own: bool = False  # the adapters are the run's own stack/ copies (resume): nothing to copy

    def describe(self) -> dict:
        """``{"continued_from", "stack": [{"dir", "from"}]}`` for the manifest and ``summary.json``."""
        return {"continued_from": self.origin,
                "stack": [{"dir": f"{RUN_STACK}/{i:02d}", "from": src} for i, src in enumerate(self.sources)]}


def continue_from(cfg: Any) -> str | None:
    """The run's ``method.continue_from`` (``None`` for methods without the key)."""
    return getattr(cfg.method, "continue_from", None)


def resolve_stack(cfg: Any, method: Any, run_dir: Path, resume: bool) -> Stack | None:
    """The adapters to merge under the new one, checked; ``None`` when the run does not continue another.

    On ``--resume`` of a run that already holds ``stack/``, that copy is used (a resumed run ends like an
    uninterrupted one even if the earlier run changed since). Reads metadata only, writes nothing.

    Raises:
        UserError: naming ``method.continue_from``: see the module docstring for the refused cases.
    """
    origin = continue_from(cfg)
    if not origin:
        return None
    _check_method(cfg, method)
    own = run_stack(run_dir)
    if resume and own:
        from tuneforge.train.rundir import read_manifest

        recorded = [entry.get("from") for entry in read_manifest(run_dir).get("stack", [])]
        sources = recorded if len(recorded) == len(own) and all(recorded) else [str(p) for p in own]
        return Stack(tuple(own), origin, tuple(sources), own=True)
    if cfg.model.from_config is not None:
        raise UserError(f"{KEY}: the new adapter must be trained on the earlier run's base model, but this run builds "
                        "a new random model (model.from_config); set model.name_or_path to the earlier run's base "
                        f"(the `base` it names: `tuneforge inspect {origin}`) instead")
    earlier = _earlier_ref(origin, run_dir)
    _check_same_base(cfg.model.name_or_path, earlier, origin)
    adapters = (*map(Path, earlier.stack), Path(earlier.adapter))
    return Stack(adapters, origin, tuple(str(p) for p in adapters))


def _check_method(cfg: Any, method: Any) -> None:
    if method.capabilities(cfg.method).quantized_base:
        raise UserError(f"{KEY} with method {cfg.method.name}: the earlier adapters are merged into the base weights, "
                        "which is exact only for an unquantized base; use method lora (or dora, rslora...) for the "
                        "continued run")


def _earlier_ref(origin: str, run_dir: Path):
    from tuneforge.models.reference import resolve

    path = Path(origin).expanduser()
    if not path.exists():
        raise UserError(f"{KEY}: {origin} does not exist (give the earlier run directory, e.g. runs/<earlier>, or "
                        "an adapter directory)")
    if path.resolve() == Path(os.path.abspath(run_dir)).resolve():
        raise UserError(f"{KEY}: {origin} is this run's own output directory; give the earlier run")
    tasks = per_task_runs(path)
    if tasks:
        raise UserError(f"{KEY}: {origin} is a per-task run (one adapter per task); continue one task's run: "
                        + ", ".join(str(p) for p in tasks.values()))
    try:
        earlier = resolve(path, KEY)
    except UserError as exc:
        raise UserError(f"{KEY}: {exc}") from None
    if not earlier.is_adapter:
        raise UserError(f"{KEY}: {origin} holds a full model, not an adapter; to train on top of it, set "
                        f"model.name_or_path: {earlier.base} and leave method.continue_from out")
    if not earlier.mergeable():
        raise UserError(f"{KEY}: {origin} is a {earlier.method or earlier.peft_type} adapter, which cannot be merged "
                        "into the base weights (it adds virtual tokens rather than a weight delta), so it cannot "
                        "be frozen under a new adapter exactly")
    if _quantized_base(earlier) or earlier.quantization():
        raise UserError(f"{KEY}: {origin} was trained on a quantized base; merging it into the unquantized weights "
                        "would not reproduce the model it was trained as, so it cannot be continued exactly")
    return earlier


def _quantized_base(earlier: Any) -> bool:
    """Whether the earlier run's method trains on a quantized base: its recorded capability (the run's manifest),
    else the method registry's declaration for its method."""
    from tuneforge.train.rundir import recorded_capabilities

    recorded = recorded_capabilities(earlier.run_dir) if earlier.run_dir else None
    if recorded is not None:
        return bool(recorded.get("quantized_base"))
    from tuneforge.methods import registrations

    reg = registrations().get(earlier.method or "")
    return bool(reg and reg.method and reg.method.quantized_base)


def _check_same_base(name_or_path: str | None, earlier: Any, origin: str) -> None:
    mine = name_or_path or ""
    same = _same_model(mine, earlier.base)
    if not same:
        raise UserError(f"{KEY}: {origin} was trained on base {earlier.base}, but this run's model.name_or_path is "
                        f"{mine or '(none)'}; a continued run must use the same base model (set model.name_or_path: "
                        f"{earlier.base})")


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def check_model(model: Any) -> None:
    """Refuse a quantized model under a stack (the merge would round into 4/8-bit weights).

    Raises:
        UserError: naming ``method.continue_from``.
    """
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False) \
            or getattr(getattr(model, "config", None), "quantization_config", None):
        raise UserError(f"{KEY}: the base model is quantized; the earlier adapters can only be merged exactly into "
                        "unquantized weights: give the original checkpoint as model.name_or_path")


def merge(model: Any, stack: Stack | None) -> Any:
    """``model`` with the stack merged in (the model itself without one)."""
    if stack is None:
        return model
    from tuneforge.models.reference import merge_stack

    check_model(model)
    return merge_stack(model, stack.adapters)


def stage_copy(stack: Stack | None, staged: Path) -> None:
    """Copy the stack's adapters into ``staged/00``, ``01``, ... (a directory beside the run, renamed into
    ``<run>/stack`` once the run directory is written)."""
    for i, adapter in enumerate(stack.adapters):
        shutil.copytree(adapter, staged / f"{i:02d}")
