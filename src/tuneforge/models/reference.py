"""THE model reference: what a path or id points at, and the one way to load it for inference.

Accepted everywhere a command takes a model (generate, eval, report, abtest, merge, export, serve, chat): a tuneforge
run directory, a run's ``final/``, a PEFT adapter directory, a plain Hugging Face model directory, or a hub id. The
base model, adapter, tokenizer and chat template are found from the files alone; nobody is told them twice.

:func:`resolve` reads metadata only (no torch); :func:`load_for_inference` loads weights. The run-directory file
names are constants here so that every package names them the same way.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.data.templates import TEMPLATE_FILE, TEMPLATE_JINJA
from tuneforge.errors import UserError

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- the run directory contract

RUN_CONFIG = "config.yaml"          # the resolved run config
RUN_FINAL = "final"                 # PEFT adapter or full model + tokenizer + chat template
RUN_BASE = "base"                   # the random base of an adapter trained on a from-config model
RUN_CHECKPOINTS = "checkpoints"     # HF Trainer checkpoints, each with a COMPLETE marker
RUN_METRICS = "metrics.jsonl"       # every logged step, eval and warning
RUN_SUMMARY = "summary.json"        # final metrics, parameter counts, data statistics
RUN_EVAL_RESULTS = "eval_results.json"
RUN_REPORT = "report.html"
RUN_TEMPLATE = TEMPLATE_FILE        # the chat template (name, jinja, stop strings)
RUN_MANIFEST = "tuneforge_run.json"  # written first into every run directory: tuneforge made it (train/rundir.py)
RUN_TASKS = "tasks"                 # per-task runs (method.per_task): tasks/<task>/ is each task's own run
RUN_STACK = "stack"                 # progressive LoRA (method.continue_from): stack/NN/ earlier adapters, in order
TEMPLATE_FILES = (RUN_TEMPLATE, TEMPLATE_JINJA)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Files that only a tuneforge run writes beside its config.yaml (one of them is enough).
_RUN_EVIDENCE = (RUN_MANIFEST, RUN_FINAL, RUN_CHECKPOINTS, RUN_METRICS, RUN_SUMMARY)

# peft types whose adapters `merge_and_unload` can fold into the base weights (prompt-learning types cannot).
MERGEABLE_PEFT_TYPES = frozenset({"LORA", "ADALORA", "IA3", "VERA", "LOHA", "LOKR", "OFT", "BOFT", "FOURIERFT",
                                  "HRA"})


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a tuneforge run directory (finished or not): ``config.yaml`` plus something only a run
    writes (its manifest ``tuneforge_run.json``, ``final/``, ``checkpoints/``, ``metrics.jsonl`` or
    ``summary.json``; runs made before the manifest existed have the others)."""
    path = Path(path)
    return (path / RUN_CONFIG).is_file() and any((path / name).exists() for name in _RUN_EVIDENCE)


def per_task_runs(path: str | Path) -> dict[str, Path]:
    """The task runs of a per-task run (``method.per_task: true``): ``{task: runs/<name>/tasks/<task>}``.

    Only task runs that are run directories are listed, sorted by task name; ``{}`` when ``path`` is not a
    per-task run.
    """
    tasks = Path(path) / RUN_TASKS
    if not tasks.is_dir():
        return {}
    return {d.name: d for d in sorted(tasks.iterdir()) if d.is_dir() and is_run_dir(d)}


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a PEFT adapter (``adapter_config.json``)."""
    return (Path(path) / "adapter_config.json").is_file()


def read_run_config(run_dir: str | Path) -> dict:
    """The raw ``config.yaml`` of a run as a dict (``{}`` when absent).

    Raises:
        UserError: the file is not valid YAML.
    """
    from tuneforge.utils import load_yaml

    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        return {}
    data = load_yaml(path) or {}
    return data if isinstance(data, dict) else {}


# ----------------------------------------------------------------------------- the reference


@dataclass(frozen=True)
class ModelRef:
    """Where the parts of a model are (no weights loaded).

    Attributes:
        given: what the user wrote.
        kind: ``"adapter"`` (a PEFT adapter on a base), ``"model"`` (a local full model directory) or ``"hub"``
            (a hub id, resolved by transformers at load time).
        base: the base model directory or hub id (the model itself when there is no adapter).
        adapter: the adapter directory, or ``None``.
        tokenizer: directory or hub id to load the tokenizer from.
        template_dir: the directory holding the run's ``template.json`` / ``chat_template.jinja``, if any.
        run_dir: the tuneforge run directory when the reference is a run, else ``None``.
        method: the run's ``method.name`` when known.
        adapter_config: the parsed ``adapter_config.json`` for adapters.
        stack: progressive LoRA (``method.continue_from``): the earlier adapters of the run (``<run>/stack/NN``),
            in the order they are merged into ``base`` before ``adapter`` goes on top; ``()`` otherwise.
        head: ``causal_lm``, or ``reward`` for a reward model (``stage: rm``: a sequence-classification head with
            one output), loaded by :func:`load_for_inference` / :func:`tuneforge.models.reward.load_scorer`.
        rope_scaling: the run's resolved ``model.rope_scaling`` (``{type, factor, original_max_position_embeddings}``)
            applied to the base under an adapter (a full model's ``config.json`` carries its own), else ``None``.
    """

    given: str
    kind: str
    base: str
    adapter: str | None = None
    tokenizer: str = ""
    template_dir: str | None = None
    run_dir: str | None = None
    method: str | None = None
    adapter_config: dict | None = field(default=None, compare=False)
    stack: tuple[str, ...] = ()
    head: str = "causal_lm"
    rope_scaling: dict | None = field(default=None, compare=False)

    @property
    def is_adapter(self) -> bool:
        return self.adapter is not None

    @property
    def base_key(self) -> str:
        """What identifies the weights under ``adapter``: ``base``, plus the merged ``stack`` when there is one.

        Two references may share one loaded base (serve) only when their ``base_key`` is equal.
        """
        rope = [f"rope={json.dumps(self.rope_scaling, sort_keys=True)}"] if self.rope_scaling else []
        return "|".join((self.base, *self.stack, *rope))

    @property
    def model_dir(self) -> Path:
        """The directory holding the weights: the adapter directory, or the model directory (not for hub ids)."""
        return Path(self.adapter or self.base)

    @property
    def peft_type(self) -> str | None:
        return (self.adapter_config or {}).get("peft_type")

    def quantization(self) -> dict | None:
        """The ``quantization_config`` stored in the (base) model's ``config.json``, or ``None``."""
        return quantization_of(self.base)

    def mergeable(self) -> bool:
        """Whether the adapter can be folded into its base weights (by its peft type: prompt-learning adapters
        such as prefix tuning cannot; every weight-delta adapter can). A stack's adapters were checked mergeable
        when the run was trained."""
        return self.is_adapter and self.peft_type in MERGEABLE_PEFT_TYPES


def quantization_of(model_dir: str | Path) -> dict | None:
    """The ``quantization_config`` in ``model_dir/config.json``, or ``None`` (also for hub ids)."""
    config = Path(str(model_dir)) / "config.json"
    if not config.is_file():
        return None
    return _read_json(config).get("quantization_config")


def resolve(path_or_id: str | Path, what: str | None = None, *, base_override: str | None = None) -> ModelRef:
    """Find the base model, adapter, tokenizer and template of what the user named (no weights are read).

    Args:
        path_or_id: a run directory, a run's ``final/``, an adapter directory, a model directory or a hub id.
        what: how to name the argument in errors (default: the value itself).
        base_override: for adapters, use this base model instead of the one recorded in the adapter.

    Raises:
        UserError: a path that does not exist or holds no model, an unfinished run, a missing base.
    """
    from tuneforge.models.load import check_model_source

    given = str(path_or_id)
    what = what or given
    path = Path(given).expanduser()
    if not path.exists():
        check_model_source(given, what)  # raises for local-looking paths
        return ModelRef(given, "hub", given, tokenizer=given)
    from tuneforge.models.gguf import gguf_path_of

    gguf = gguf_path_of(path)  # a GGUF file is a model: loaders convert it once into a cached HF directory
    if gguf is not None:
        return ModelRef(given, "model", str(gguf), tokenizer=str(gguf))
    run_dir, final = _run_and_final(path)
    run_config = read_run_config(run_dir) if run_dir else {}
    method = (run_config.get("method") or {}).get("name")
    if is_adapter_dir(final):
        config = _read_json(final / "adapter_config.json")
        base = _base_of_adapter(final, config, run_dir, base_override)
        tokenizer = str(final) if _has_tokenizer(final) else base
        kind, adapter = "adapter", str(final)
    elif (final / "config.json").is_file():
        config, base, tokenizer, kind, adapter = None, str(final), str(final), "model", None
    else:
        raise UserError(_no_model_message(given, final, run_dir))
    template_dir = next((str(d) for d in (final, run_dir) if d is not None
                         and any((d / f).is_file() for f in TEMPLATE_FILES)), None)
    stack = tuple(str(d) for d in run_stack(run_dir)) if run_dir is not None and adapter is not None else ()
    rope = (run_config.get("model") or {}).get("rope_scaling") if adapter is not None else None
    return ModelRef(given, kind, base, adapter, tokenizer, template_dir, str(run_dir) if run_dir else None,
                    method if isinstance(method, str) else None, config, stack, _head_of(final, config, run_config),
                    rope if isinstance(rope, dict) else None)


def _head_of(final: Path, adapter_config: dict | None, run_config: dict) -> str:
    """``reward`` for a reward model (an ``rm`` run, a SEQ_CLS adapter, a ``*ForSequenceClassification``
    directory), else ``causal_lm``."""
    if run_config.get("stage") == "rm" or (adapter_config or {}).get("task_type") == "SEQ_CLS":
        return "reward"
    if adapter_config is None and (final / "config.json").is_file():
        architectures = _read_json(final / "config.json").get("architectures") or [""]
        if str(architectures[0]).endswith("ForSequenceClassification"):
            return "reward"
    return "causal_lm"


def run_stack(run_dir: str | Path) -> list[Path]:
    """The earlier adapters of a progressive run (``<run>/stack/00``, ``01``, ...), in merge order; ``[]`` when
    the run continued from nothing."""
    folder = Path(run_dir) / RUN_STACK
    if not folder.is_dir():
        return []
    return [d for d in sorted(folder.iterdir(), key=lambda d: d.name) if d.is_dir() and is_adapter_dir(d)]


def merge_stack(model: Any, stack: list[str] | tuple[str, ...]) -> Any:
    """``model`` with each adapter of ``stack`` loaded and folded into its weights, in order (peft
    ``merge_and_unload``); the model itself when ``stack`` is empty.

    Training (``method.continue_from``) and every loader of a progressive run call this, so both see the same
    weights: the merge runs in the model's dtype (exact up to float rounding in fp32).
    """
    if not stack:
        return model
    from peft import PeftModel

    for adapter in stack:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False).merge_and_unload()
    return model


def _run_and_final(path: Path) -> tuple[Path | None, Path]:
    """``(run_dir, folder holding the weights)`` for a path that exists."""
    if is_run_dir(path):
        return path, path / RUN_FINAL
    if path.name == RUN_FINAL and is_run_dir(path.parent):
        return path.parent, path
    return None, path


def _no_model_message(given: str, final: Path, run_dir: Path | None) -> str:
    if run_dir is not None and per_task_runs(run_dir):
        tasks = ", ".join(str(p) for p in per_task_runs(run_dir).values())
        return (f"{given}: a per-task run (method.per_task) holds one model per task, not one model: name a task's "
                f"run ({tasks}); `tuneforge eval {given}` evaluates each on its own task, `tuneforge serve` serves "
                "them together")
    if run_dir is not None:
        return (f"{given}: the run has no model in {final} yet: did the training run finish? "
                f"(`tuneforge train <config> --resume` continues it)")
    return (f"{given}: not a tuneforge run (config.yaml + final/), a PEFT adapter (adapter_config.json) or a "
            "Hugging Face model directory (config.json)")


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in TOKENIZER_FILES)


def _base_of_adapter(adapter: Path, config: dict, run_dir: Path | None, base_override: str | None) -> str:
    """The base model of an adapter: ``base_override``, else ``base_model_name_or_path`` resolved as a path (as
    given, relative to the adapter or the run directory), else ``<run>/base``, else taken as a hub id."""
    from tuneforge.models.load import check_model_source, looks_local

    if base_override:
        return check_model_source(base_override, "--base")
    base = config.get("base_model_name_or_path") or ""
    candidates = [Path(base).expanduser(), adapter / base] if base else []
    if run_dir is not None:
        candidates += [run_dir / base] if base else []
        candidates.append(run_dir / RUN_BASE)
    from tuneforge.models.gguf import is_gguf_file

    for candidate in candidates:
        if (candidate / "config.json").is_file() or is_gguf_file(candidate):
            return str(candidate.resolve())
    if not base:
        raise UserError(f"{adapter}/adapter_config.json names no base_model_name_or_path: cannot find the base "
                        "model (pass --base DIR where the command has it)")
    if looks_local(base):
        raise UserError(
            f"the base model of adapter {adapter} ({base}, from adapter_config.json base_model_name_or_path) does "
            "not exist; restore it or edit base_model_name_or_path to point at the base model directory"
        )
    return base


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


# ----------------------------------------------------------------------------- loading


@dataclass
class Loaded:
    """A model ready for inference.

    Attributes:
        model: in eval mode; a ``peft.PeftModel`` when an adapter was loaded.
        tokenizer: with a pad token.
        template: the ``ChatTemplate`` used in training (or the tokenizer's / auto one), ``None`` if none applies.
        ref: the :class:`ModelRef` it was loaded from.
    """

    model: Any
    tokenizer: Any
    template: Any
    ref: ModelRef

    @property
    def source(self) -> str:
        return self.ref.given

    @property
    def base(self) -> str:
        return self.ref.base

    @property
    def adapter(self) -> str | None:
        return self.ref.adapter


def load_template(template_dir: str | None, tokenizer: Any):
    """The run's saved ``ChatTemplate`` when there is one, else ``resolve_template("auto", tokenizer)``;
    ``None`` when no template applies (plain-text generation still works)."""
    from tuneforge.data.templates import ChatTemplate, resolve_template

    if template_dir is not None:
        template = ChatTemplate.load(template_dir)
        if template is not None:
            return template
    try:
        return resolve_template("auto", tokenizer)
    except UserError as exc:
        log.warning("no chat template: %s", exc)
        return None


def load_tokenizer_of(ref: ModelRef):
    """The tokenizer of a reference (with a pad token)."""
    from tuneforge.models.load import load_tokenizer

    return load_tokenizer(ref.tokenizer, what=ref.given)


def load_base_model(ref: ModelRef, *, dtype: Any = None, **kwargs):
    """The base model of ``ref`` (no adapter), on the CPU, in ``dtype`` (default float32); for a progressive run,
    with its ``stack`` merged in (:func:`merge_stack`): the weights its ``final/`` adapter was trained on."""
    import torch

    from tuneforge.models.load import check_model_source, load_pretrained

    kwargs.setdefault("head", ref.head)
    kwargs.setdefault("rope_scaling", ref.rope_scaling)
    model = load_pretrained(check_model_source(ref.base, ref.given), dtype=dtype or torch.float32, **kwargs)
    return merge_stack(model, ref.stack)


def load_model_dir(model_dir: str | Path, quantization_config: Any = None):
    """A plain model directory (no adapter, no stack) on the CPU: quantized while loading when
    ``quantization_config`` (a transformers ``BitsAndBytesConfig``) is given, else as stored — an already quantized
    export loads quantized. For ``tuneforge export``, which quantizes a merged or full model and checks the result."""
    from tuneforge.models.load import check_model_source, load_pretrained

    return load_pretrained(check_model_source(str(model_dir), "the model directory"), quantization_config=quantization_config,
                           device_map="cpu")


def load_for_inference(ref: ModelRef | str, device: str = "auto", dtype: Any = None, tokenizer: Any = None) -> Loaded:
    """Load a model, its tokenizer and chat template for generation or scoring.

    Args:
        ref: a :class:`ModelRef`, or anything :func:`resolve` accepts.
        device: ``auto``, ``cpu``, ``cuda``...
        dtype: a ``torch.dtype``; default: ``resolve_dtype("auto", device)``.
        tokenizer: ``ref``'s tokenizer (:func:`load_tokenizer_of`) when the caller loaded it already (a memory
            preflight that measured the prompts): used as it is instead of loading a second copy.

    Returns:
        :class:`Loaded` with the model in eval mode on ``device``. An adapter is loaded with stock
        ``peft.PeftModel.from_pretrained`` onto its base (not merged), so the logits are those of training; a
        progressive run's earlier adapters (``ref.stack``) are merged into the base first, as in training.

    Raises:
        UserError: missing paths, an unfinished run, a base model that cannot be found.
    """
    from tuneforge.models.device import resolve_device, resolve_dtype

    ref = ref if isinstance(ref, ModelRef) else resolve(ref)
    device = resolve_device(device)
    dtype = dtype or resolve_dtype("auto", device)
    tokenizer = tokenizer or load_tokenizer_of(ref)
    model = load_base_model(ref, dtype=dtype)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:  # a reward model finds each row's last token by the pad id
        model.config.pad_token_id = tokenizer.pad_token_id
    if ref.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, ref.adapter)
    model.to(device)
    model.eval()
    return Loaded(model=model, tokenizer=tokenizer, template=load_template(ref.template_dir, tokenizer), ref=ref)
