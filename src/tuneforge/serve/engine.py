"""The models a server holds.

Several runs that are adapters of the same base share one copy of the base: the first is loaded with
``load_for_inference``, the others are added with ``PeftModel.load_adapter`` and chosen per batch with
``set_adapter`` (the scheduler only batches work of one model and adapter together). Runs on different bases (or
full models) get a model each. Names are checked at start: two names that peft would store under the same adapter
key (``x-1`` and ``x_1``) are refused.

A per-task run (``method.per_task``: ``runs/<name>/tasks/<task>/`` each a run of its own) is served as one name per
task, ``<name>/<task>``, plus the bare ``<task>`` when it is the only per-task run served; its tasks share one base
like any adapters of one base. :class:`PerTaskRun` picks a task from the ``[task]`` prefix of a prompt (the prefix
``data.task_prefix`` puts on the first user turn in training) for ``--route prefix``.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.data.mix import prefix_task, task_prefix
from tuneforge.errors import UserError
from tuneforge.models import memory
from tuneforge.models.reference import RUN_FINAL
from tuneforge.serve.scheduler import Scheduler, pool_count


@dataclass(eq=False)
class Served:
    """One servable name: its model (possibly shared with other adapters), adapter name, tokenizer, template.

    ``tokenizer`` is used by the generating thread only; request handlers encode with ``encode`` (their own copy of
    the tokenizer under a lock: a Rust tokenizer used from two threads at once can fail with "Already borrowed").
    """

    name: str
    source: str
    model: Any
    tokenizer: Any
    template: Any
    adapter_name: str | None = None
    base: str | None = None
    _encoder: Any = field(default=None, repr=False)
    _encode_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def context_length(self) -> int | None:
        config = getattr(self.model, "config", None)
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    @property
    def pad_id(self) -> int:
        from tuneforge.models.generation import stop_token_ids

        if self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        stops = stop_token_ids(self.tokenizer, self.template, self.model)
        return stops[0] if stops else 0

    def activate(self) -> None:
        """Make this name's adapter the active one (generating thread only)."""
        if self.adapter_name is not None:
            self.model.set_adapter(self.adapter_name)

    def prompt_ids(self, prompt: str | list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids the model sees for a text prompt (as-is) or chat messages (rendered with the run's template)."""
        from tuneforge.models.generation import render_prompt

        with self._encode_lock:
            if self._encoder is None:
                self._encoder = copy.deepcopy(self.tokenizer)
            if tools and not isinstance(prompt, str):
                text, add_special = self.template.render(prompt, add_generation_prompt=True,
                                                         tokenizer=self._encoder, tools=tools), False
            else:
                text, add_special = render_prompt(self._encoder, self.template, prompt)
            return self._encoder(text, add_special_tokens=add_special)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (request handlers' side)."""
        with self._encode_lock:
            if self._encoder is None:
                self._encoder = copy.deepcopy(self.tokenizer)
            return self._encoder.decode(ids, skip_special_tokens=False)

    def token_texts(self, ids: list[int]) -> list[str]:
        """The text of each token on its own (for log-prob listings)."""
        with self._encode_lock:
            if self._encoder is None:
                self._encoder = copy.deepcopy(self.tokenizer)
            return [self._encoder.decode([i], skip_special_tokens=False) for i in ids]


def adapter_key(name: str) -> str:
    """The peft adapter name a served name is stored under (module attribute keys: letters, digits, ``_``)."""
    return "tf_" + "".join(c if c.isalnum() or c == "_" else "_" for c in name)


def served_names(specs: list[str]) -> list[tuple[str, str]]:
    """``(name, path)`` per ``NAME=PATH`` or ``PATH`` argument (the name defaults to the run's folder name; repeated
    folder names get ``-2``, ``-3``...).

    Raises:
        UserError: an empty name, a name given twice, or two names that collide once normalised to adapter keys.
    """
    pairs: list[tuple[str, str]] = []
    taken: set[str] = set()
    for spec in specs:
        if "=" in spec and not Path(spec).exists():
            name, path = spec.split("=", 1)
            if not name:
                raise UserError(f"{spec!r}: empty model name before '='")
            if name in taken:
                raise UserError(f"model name {name!r} is given twice")
        else:
            path = spec
            folder = Path(spec)
            base = folder.parent.name if folder.name == RUN_FINAL else (folder.name or folder.resolve().name)
            name, number = base, 2
            while name in taken:
                name, number = f"{base}-{number}", number + 1
        taken.add(name)
        pairs.append((name, path))
    _check_adapter_keys([name for name, _ in pairs])
    return pairs


def _check_adapter_keys(names: list[str]) -> None:
    keys: dict[str, str] = {}
    for name in names:
        other = keys.setdefault(adapter_key(name), name)
        if other != name:
            raise UserError(f"served names {other!r} and {name!r} collide (both become adapter {adapter_key(name)!r}); "
                            "rename one with NAME=PATH using letters, digits and '_' or '-' differently")


@dataclass
class _TaskGroup:
    name: str
    source: str
    names: dict[str, str]  # task → served name
    prefixed: dict[str, bool]


def expand_per_task(pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[_TaskGroup]]:
    """Replace every per-task run among ``(name, path)`` by one ``(name/task, tasks/<task>)`` pair per task.

    Returns:
        The pairs to load, and per per-task run its tasks' served names and whether each was trained with
        ``data.task_prefix`` (read from the task run's ``config.yaml``).

    Raises:
        UserError: a per-task run without a task run in ``tasks/``, or a task's served name that is already taken
            or collides with another one as an adapter key.
    """
    from tuneforge.models.reference import RUN_TASKS, per_task_runs, read_run_config

    out: list[tuple[str, str]] = []
    groups: list[_TaskGroup] = []
    for name, path in pairs:
        tasks = per_task_runs(path)
        if not tasks:
            if (Path(path) / RUN_TASKS).is_dir():
                raise UserError(f"{path}: a per-task run with no finished task run in {Path(path) / RUN_TASKS} "
                                "(each tasks/<task>/ needs config.yaml and final/): did its training finish?")
            out.append((name, path))
            continue
        group = _TaskGroup(name, path, {}, {})
        for task, task_dir in tasks.items():
            group.names[task] = f"{name}/{task}"
            data = read_run_config(task_dir).get("data")
            group.prefixed[task] = bool(data.get("task_prefix", False)) if isinstance(data, dict) else False
            out.append((group.names[task], str(task_dir)))
        groups.append(group)
    taken: dict[str, str] = {}
    for name, path in out:
        if name in taken:
            raise UserError(f"model name {name!r} is given twice ({taken[name]} and {path}); rename one with "
                            "NAME=PATH")
        taken[name] = path
    _check_adapter_keys([name for name, _ in out])
    return out, groups


ROUTES = ("name", "prefix")  # how a request finds its adapter (create_app's ``route``, serve's --route)


def check_route(route: str, per_task_names: Iterable[str]) -> None:
    """Refuse an unknown ``route``, and ``prefix`` when no per-task run is served (it would route nothing).

    Raises:
        UserError: naming ``--route``.
    """
    if route not in ROUTES:
        raise UserError(f"--route {route!r} is not one of {', '.join(ROUTES)}")
    if route == "prefix" and not list(per_task_names):
        raise UserError("--route prefix chooses among the tasks of a per-task run (method.per_task: true, "
                        "runs/<name>/tasks/<task>/), and none of the served runs is one; serve such a run or drop "
                        "--route prefix")


class UnknownTask(Exception):
    """A prompt routed by its ``[task]`` prefix names no task of the per-task run (or has no prefix).

    Attributes:
        code: ``unknown_task`` or ``missing_task_prefix``.
    """

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class PerTaskRun:
    """A per-task run served as one adapter per task on one base.

    Attributes:
        name: its served name (``<name>`` of ``runs/<name>`` or of ``NAME=PATH``).
        source: the path given.
        tasks: ``{task: Served}`` (served as ``<name>/<task>``), sorted by task.
        prefixed: ``{task: bool}``: whether the task's run was trained with ``data.task_prefix`` (its user turns
            began with ``[task] ``).
    """

    name: str
    source: str
    tasks: dict[str, Served]
    prefixed: dict[str, bool]

    def route(self, text: str) -> tuple[Served, str]:
        """The task adapter that ``text`` (a first user turn or a raw prompt) asks for with its ``[task]`` prefix,
        and the text as that task saw it in training: unchanged when it was trained with the prefix, without
        ``[task]`` and one following space when it was not (the prefix is then only a routing tag).

        Raises:
            UnknownTask: no ``[task]`` prefix, or a prefix naming no task of this run (the message lists them).
        """
        task = prefix_task(text, self.tasks)
        if task is None:
            known = ", ".join(f"[{t}]" for t in self.tasks)
            if text.startswith("[") and "]" in text:
                given = text[:text.index("]") + 1]
                raise UnknownTask(f"{given[:80]!r} is not a task of the per-task run {self.name!r}; its tasks are "
                                  f"{known} (or ask for a model {self.served_names_hint()})", "unknown_task")
            raise UnknownTask(f"the per-task run {self.name!r} routes by task prefix: start the first user message "
                              f"(or the prompt) with one of {known}, or ask for a model {self.served_names_hint()}",
                              "missing_task_prefix")
        if not self.prefixed[task]:  # drop "[task]" and the space after it, if any
            tag = task_prefix(task)
            text = text[len(tag):] if text.startswith(tag) else text[len(tag) - 1:]
        return self.tasks[task], text

    def served_names_hint(self) -> str:
        return " or ".join(repr(served.name) for served in self.tasks.values())


class Engine:
    """Holds the served models and the scheduler that batches work on them.

    Args:
        specs: run directories / adapter dirs / model dirs (optionally ``NAME=PATH``); a per-task run serves
            each of its tasks (module docstring).
        device: passed to ``load_for_inference``.
        dtype: a ``torch.dtype`` (default: ``load_for_inference``'s choice for the device).
        max_batch_size: most generations run together.
        max_queue: most generations waiting before requests are answered 429.
        token_budget: most tokens (rows x (prompt + max new tokens)) one batch may hold; ``None``: sized from the
            memory free once the models are loaded (:func:`token_budget_for`).
        batching: ``continuous`` (rows join and leave the running batch at every step, adapters of one base mixed
            in it) or ``dynamic`` (the waiting rows of one adapter run as a batch until all of them end).
    """

    def __init__(self, specs: list[str], device: str = "auto", *, dtype: Any = None, max_batch_size: int = 16,
                 max_queue: int = 64, token_budget: int | None = None, batching: str = "continuous"):
        from tuneforge.models.generation import refuse_reward_model
        from tuneforge.models.reference import load_for_inference, load_template, load_tokenizer_of, resolve
        from tuneforge.serve.scheduler import BATCHING

        if batching not in BATCHING:
            raise UserError(f"--batching {batching!r} is not one of {', '.join(BATCHING)}")
        if not specs:
            raise UserError("give at least one run, adapter or model directory to serve")
        self.models: dict[str, Served] = {}
        self.per_task: dict[str, PerTaskRun] = {}  # served name of a per-task run → its tasks
        pairs, groups = expand_per_task(served_names(specs))
        # base key (the base plus a progressive run's merged stack) → PeftModel already holding adapters on it
        shared: dict[str, Any] = {}
        refs = {name: resolve(path) for name, path in pairs}
        for ref in refs.values():  # before any model loads
            refuse_reward_model(ref, "serve")
        for name, path in pairs:
            ref = refs[name]
            if ref.adapter is not None and ref.base_key in shared:
                model = shared[ref.base_key]
                model.load_adapter(ref.adapter, adapter_name=adapter_key(name))
                model.eval()
                tokenizer = load_tokenizer_of(ref)
                self.models[name] = Served(name, path, model, tokenizer, load_template(ref.template_dir, tokenizer),
                                           adapter_key(name), ref.base)
                continue
            loaded = load_for_inference(ref, device=device, dtype=dtype)
            adapter_name = None
            if ref.adapter is not None:
                adapter_name = loaded.model.active_adapter
                shared[ref.base_key] = loaded.model
            self.models[name] = Served(name, path, loaded.model, loaded.tokenizer, loaded.template, adapter_name,
                                       ref.base)
        for group in groups:
            self.per_task[group.name] = PerTaskRun(
                group.name, group.source, {task: self.models[name] for task, name in group.names.items()},
                group.prefixed)
        if len(self.per_task) == 1:
            self._add_task_aliases(next(iter(self.per_task.values())))
        if token_budget is None:
            token_budget = min(token_budget_for(served.model) for served in self.models.values())
        self.token_budget = token_budget
        self.scheduler = Scheduler(max_batch_size=max_batch_size, max_queue=max_queue, token_budget=token_budget,
                                   prefix_pools=pool_count(self.models.values()),
                                   batching=batching)

    def _add_task_aliases(self, run: PerTaskRun) -> None:
        """Serve each task of the only per-task run under its bare name too (the same adapter)."""
        for task, served in run.tasks.items():
            if task == run.name:
                raise UserError(f"the per-task run {run.source} is served as {run.name!r}, which is also the name of "
                                f"its task {task!r}; name the run with NAME=PATH (e.g. {run.name}-tasks={run.source})")
            if task in self.models:
                raise UserError(f"task {task!r} of the per-task run {run.name!r} ({run.source}) would also be served "
                                f"as {task!r}, which is already the name of another served model "
                                f"({self.models[task].source}); rename that one with NAME=PATH (the task is served "
                                f"as {served.name!r} either way)")
        for task, served in run.tasks.items():
            self.models[task] = served

    def names(self) -> list[str]:
        return list(self.models)

    def get(self, name: str) -> Served:
        """The served model ``name``; KeyError when unknown."""
        return self.models[name]


# Share of the free memory the running batch's KV cache and activations may take (the rest: other processes, the
# allocator's slack, logits of prefills).
BUDGET_MEMORY_SHARE = 0.25
MAX_TOKEN_BUDGET = 1 << 22


def bytes_per_token(model: Any) -> int:
    """What one token of the KV token budget costs in serve's bill (``models.memory.serve_bytes_per_token``): its
    keys and values in every layer with the KV store's spare columns and the prefix store's share, plus a rough
    allowance for the activations of a forward pass (8 x hidden size), in the model's dtype."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 1024)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 16)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 24)
    size = next(model.parameters()).element_size()
    return memory.serve_bytes_per_token(memory.kv_bytes_per_token(layers, kv_heads, head_dim, size), hidden, size)


def token_budget_for(model: Any, share: float = BUDGET_MEMORY_SHARE) -> int:
    """Tokens a batch may hold so that its cache and activations take at most ``share`` of the free memory."""
    device = next(model.parameters()).device
    return max(1024, min(MAX_TOKEN_BUDGET, int(memory.available_memory(str(device)) * share) // bytes_per_token(model)))
