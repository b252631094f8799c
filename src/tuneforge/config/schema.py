"""The run configuration: one pydantic v2 schema, validated once before anything heavy loads.

This module is pure (no torch, no transformers) so that ``tuneforge validate`` is instant.
Every model forbids unknown keys, so a typo fails at the door with the key's path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, PositiveInt, field_validator, model_validator

from tuneforge.config.formats import FORMAT_CHOICES
from tuneforge.config.methods import METHOD_CONFIGS
from tuneforge.config.retention import RetentionConfig
from tuneforge.config.stages import STAGES, GrpoConfig, PreferenceConfig, RewardConfig, RmConfig  # noqa: F401
from tuneforge.config.strict import Strict

# --------------------------------------------------------------------------- model


class FromConfig(Strict):
    """Architecture numbers for a model built from scratch (weights randomly initialised).

    A byte-level BPE tokenizer of ``vocab_size`` is trained on the run's own training text
    unless ``tokenizer`` names an existing one.
    """

    architecture: Literal["llama", "gpt2"] = "llama"
    hidden_size: int = Field(256, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    vocab_size: int = Field(4096, ge=300)
    max_position_embeddings: int = Field(1024, gt=0)
    tie_word_embeddings: bool = True
    tokenizer: str | None = None

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> FromConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        return self


class RopeScaling(Strict):
    """An explicit RoPE scaling (models/rope.py); ``original_max_position_embeddings``: the pre-trained context
    (default: the model's ``max_position_embeddings``)."""

    type: Literal["linear", "dynamic", "yarn", "llama3"]
    factor: float = Field(gt=1)
    original_max_position_embeddings: int | None = Field(None, gt=0)


class AddTokens(Strict):
    """New vocabulary entries (models/vocab.py): added to the tokenizer, embedding rows initialised, saved with the
    run (a list of strings is short for ``tokens``)."""

    tokens: list[str] = Field(default_factory=list, description="plain tokens (split out of normal text)")
    special_tokens: list[str] = Field(default_factory=list, description="special tokens (never split, skippable)")
    init: Literal["pieces", "mean"] = Field("pieces", description="pieces: the mean of the rows of the sub-tokens "
                                            "the text was split into before; mean: the mean of all existing rows")

    @model_validator(mode="before")
    @classmethod
    def _list_is_tokens(cls, value: Any) -> Any:
        return {"tokens": value} if isinstance(value, list) else value

    @model_validator(mode="after")
    def _some_distinct(self) -> AddTokens:
        every = self.tokens + self.special_tokens
        if not every:
            raise ValueError("model.add_tokens lists no token")
        dup = sorted({t for t in every if every.count(t) > 1})
        if dup or any(not t for t in every):
            raise ValueError(f"model.add_tokens: {'token ' + repr(dup[0]) + ' is listed twice' if dup else 'empty token'}")
        return self


class ModelConfig(Strict):
    """Which model to train and how to place it."""

    name_or_path: str | None = None
    from_config: FromConfig | None = None
    tokenizer: str | None = None
    chat_template: str = "auto"
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="extra variables for the chat template (e.g. enable_thinking: false), used by training, "
        "generate, eval and serve alike (saved with the run's template)",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None
    attn_implementation: str | None = None
    rope_scaling: Literal["auto", "none"] | RopeScaling = Field(
        "none", description="longer context than the model's: auto (type of the family, factor ceil(data.max_length "
        "/ context), only when data.max_length exceeds it) | none | {type: linear|dynamic|yarn|llama3, factor}")
    add_tokens: AddTokens | None = None
    gguf_file: str | None = Field(
        None, description="a .gguf file inside the model.name_or_path directory (the directory plus this name is the "
        "model; or give the .gguf file itself as name_or_path)")
    untrained_tokens: Literal["train", "refuse", "ignore"] = Field(
        "train", description="chat-template tokens whose embedding rows look untrained: train those rows (LoRA: peft "
        "trainable_token_indices), refuse to start, or ignore")

    @model_validator(mode="before")
    @classmethod
    def _gguf_file_in_directory(cls, data: Any) -> Any:
        # name_or_path + gguf_file name one file: every consumer sees the file path (idempotent for resolved configs)
        if isinstance(data, dict) and data.get("gguf_file") and data.get("name_or_path"):
            name, file = str(data["name_or_path"]), str(data["gguf_file"])
            if not name.rstrip("/").endswith(file):
                data = {**data, "name_or_path": f"{name.rstrip('/')}/{file}"}
        return data

    @field_validator("chat_template_kwargs")
    @classmethod
    def _no_reserved_template_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = {"messages", "add_generation_prompt", "tools", "documents"} & set(value)
        if reserved:
            raise ValueError(f"{sorted(reserved)} are set by tuneforge itself, not by chat_template_kwargs")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.name_or_path is None) == (self.from_config is None):
            raise ValueError("give exactly one of model.name_or_path (hub id or local directory) or model.from_config")
        return self


# --------------------------------------------------------------------------- methods

# Each method's config class lives in tuneforge.config.methods (pure); tuneforge.methods pairs it with the
# implementation. The union is read from there so that the config never imports the methods.

#: the ``method:`` section: one config class per method, told apart by ``name``
MethodConfig = Annotated[Union[tuple(METHOD_CONFIGS.values())], Field(discriminator="name")]  # noqa: UP007

#: every ``method.name`` (``auto`` included)
METHOD_NAMES = tuple(sorted(METHOD_CONFIGS))


# --------------------------------------------------------------------------- data


class CleanConfig(Strict):
    """Cleaning rules; each one's drop count is reported."""

    strip_html: bool = True
    normalize: bool = True
    min_length: int = Field(1, ge=0, description="minimum characters of text / of every assistant answer")
    dedup: bool = True


class MixSource(Strict):
    """One general-data source replayed into SFT data (docs/forgetting.md): a file/directory or a built-in corpus."""

    path: str | None = Field(None, description="a data file or directory (text, chat or alpaca records)")
    name: str | None = Field(None, description="a built-in corpus (pydoc) or a hub dataset as hf:owner/name")
    weight: float = Field(1.0, gt=0, description="share of training samples (or, with data.mix_ratio, relative "
                                                 "weight between mix sources)")

    @field_validator("path", mode="after")
    @classmethod
    def _home(cls, value):
        return home(value)

    @model_validator(mode="after")
    def _one_source(self) -> MixSource:
        if (self.path is None) == (self.name is None):
            raise ValueError("give exactly one of path (a data file) or name (a built-in corpus or hf:owner/name)")
        return self


class DataConfig(Strict):
    """Where the data comes from and how it becomes tokens."""

    train: list[str]
    eval: str | list[str] | None = None
    eval_split: float | None = Field(None, gt=0, lt=1)
    format: Literal[FORMAT_CHOICES] = Field("auto", description="auto (detected from the first row) or a data "  # type: ignore[valid-type]
                                            "format of config/formats.py")
    text_separator: str = Field("\n\n\n", description="document separator inside .txt files")
    max_length: int = Field(1024, gt=8)
    packing: bool = True
    train_on_prompt: bool = False
    system_prompt: str | None = None
    system_message: Literal["fold", "drop", "error"] = Field(
        "fold",
        description="for chat templates that refuse the system role (Gemma 2, Mistral v0.1): fold it into the "
        "first user message, drop it, or stop with an error",
    )
    clean: CleanConfig = CleanConfig()
    max_samples: int | None = Field(None, gt=0)
    mix: list[MixSource] = Field(default_factory=list, description="general data replayed into SFT data")
    mix_ratio: float | None = Field(None, gt=0, lt=1, description="share of training samples drawn from data.mix "
                                                                   "(the weights then split it between sources)")
    task_prefix: bool = Field(False, description="prepend '[task] ' to the first user turn of each record")
    task_weights: dict[str, float] = Field(default_factory=dict,
                                           description="per-task sampling weights (task name -> weight)")
    # Prepared data (data/prepared.py, data/stream.py; docs/data.md "Prepared data and the cache").
    cache: bool = Field(True, description="reuse prepared data from data.cache_dir (false: build it every time)")
    cache_dir: str | None = Field(None, description="prepared-data cache (default $TUNEFORGE_CACHE/data, "
                                                    "~/.cache/tuneforge/data)")
    num_proc: int | None = Field(None, gt=0, description="worker processes preparing data (default: the CPUs, "
                                                         "for 20,000+ records)")
    streaming: bool = Field(False, description="stage pt: read, tokenize and pack on the fly (corpora larger "
                                               "than memory); needs train.max_steps")
    shuffle_buffer: int = Field(1000, ge=1, description="streaming: rows shuffled together (a window permuted "
                                                        "with the seed)")

    @field_validator("train", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("train", "eval", mode="after")
    @classmethod
    def _home(cls, value):
        return [home(p) for p in value] if isinstance(value, list) else home(value)

    @model_validator(mode="after")
    def _eval_source(self) -> DataConfig:
        if not self.train:
            raise ValueError("data.train needs at least one file or dataset name")
        if self.eval is not None and self.eval_split is not None:
            raise ValueError("give data.eval (a file) or data.eval_split (a fraction), not both")
        if self.mix_ratio is not None and not self.mix:
            raise ValueError("data.mix_ratio needs data.mix (the general data to mix in)")
        if self.mix and self.mix_ratio is None and sum(m.weight for m in self.mix) >= 1:
            raise ValueError("without data.mix_ratio each data.mix weight is that source's share of training "
                             "samples, so they must sum to less than 1 (e.g. 0.05 for 5%)")
        bad = {task: w for task, w in self.task_weights.items() if not w > 0}
        if bad:
            raise ValueError(f"data.task_weights must be positive, got {bad}")
        return self


def home(path: str | None) -> str | None:
    """``~`` / ``~user`` at the start of a path expanded (as a shell would); other values unchanged."""
    import os

    return os.path.expanduser(path) if isinstance(path, str) and path.startswith("~") else path


# --------------------------------------------------------------------------- train


class MonitorConfig(Strict):
    """Training-stability monitor (on by default)."""

    enabled: bool = True
    loss_spike_ratio: float = Field(1.2, gt=1, description="warn when loss > ratio x its moving average")
    grad_spike_ratio: float = Field(5.0, gt=1)
    window: int = Field(20, gt=1)
    sample_every: int | None = Field(None, gt=0, description="steps between degeneration-check generations")


class DistillConfig(Strict):
    """Distil a (larger) teacher on the SFT data itself: ``(1-alpha) * CE + alpha * T^2 * KL(teacher || model)``."""

    teacher: str = Field(description="a run directory, model directory or hub id sharing the tokenizer")
    alpha: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(2.0, gt=0)


#: ``train.loss_chunk: auto`` keeps one chunk's fp32 logits under this many bytes (train/loss.py; estimate bills it)
AUTO_LOSS_CHUNK_BYTES = 256 * 2**20
MIN_AUTO_LOSS_CHUNK = 64


def auto_loss_chunk(vocab_size: int) -> int:
    """Positions per chunk under ``loss_chunk: auto``: as many as keep one chunk's fp32 logits within
    :data:`AUTO_LOSS_CHUNK_BYTES` (32,768 at an 2k vocabulary, 441 at Qwen's 152k), at least 64."""
    return max(MIN_AUTO_LOSS_CHUNK, AUTO_LOSS_CHUNK_BYTES // (4 * max(1, int(vocab_size))))


def loss_chunk_auto_applies(cfg: RunConfig) -> bool:
    """Whether ``loss_chunk: auto`` may use the chunked loss for this run config (the model may still refuse it:
    train/loss.py): stages sft/pt, no ``train.distill``, and not under the sharding strategies
    (FSDP/DeepSpeed hold the LM head's parameters sharded outside the model's forward)."""
    return cfg.stage in ("sft", "pt") and cfg.train.distill is None and cfg.distributed.strategy == "ddp"


class TrainConfig(Strict):
    """Optimisation, schedule, checkpointing and logging."""

    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(4, gt=0)
    eval_batch_size: int | None = Field(None, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts"] = "cosine"
    num_cycles: int = Field(1, gt=0, description="restarts for cosine_with_restarts")
    max_grad_norm: float | None = Field(1.0, gt=0)
    optim: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "sgd", "adafactor"] = "adamw_torch"
    gradient_checkpointing: bool = False
    neftune_alpha: float | None = Field(None, gt=0)
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0)
    save_steps: int | None = Field(None, gt=0)
    save_total_limit: int | None = Field(3, gt=0)
    early_stopping_patience: int | None = Field(None, gt=0)
    report_to: list[Literal["tensorboard", "wandb", "none"]] = ["tensorboard"]
    memory_budget_gb: float | None = Field(None, gt=0)
    dataloader_workers: int = Field(0, ge=0)
    monitor: MonitorConfig = MonitorConfig()
    retention: RetentionConfig | None = None
    distill: DistillConfig | None = None
    # speed and memory (train/loss.py, docs/performance.md)
    compile: Literal["auto"] | bool = Field("auto", description="torch.compile the decoder for training; auto: off "
                                            "(measured: +11% per step on CPU after a ~23 s warm-up)")
    loss_chunk: Literal["auto"] | PositiveInt | None = Field(
        "auto", description="cross-entropy from the LM head's input: logits only for supervised positions, N at a "
        "time, so the full [batch, length, vocab] logits are never materialised; auto: on for sft/pt where the model "
        "allows it, chunks of <= 256 MiB of logits; null: the model's own loss")
    kernels: list[Literal["liger", "flash_attention"]] = Field(
        default_factory=list, description="CUDA kernels (refused on other devices)")
    embedding_lr: float | None = Field(None, gt=0, description="learning rate of the trainable embedding and "
                                       "output rows (new tokens: model.add_tokens); default: lr")

    @model_validator(mode="after")
    def _early_stopping_needs_eval(self) -> TrainConfig:
        if self.early_stopping_patience and not self.eval_steps:
            raise ValueError("train.early_stopping_patience needs train.eval_steps (and an eval set)")
        return self

    @model_validator(mode="after")
    def _loss_chunk_combinations(self) -> TrainConfig:
        if isinstance(self.loss_chunk, int) and self.distill is not None:
            raise ValueError("train.loss_chunk with train.distill: distillation compares the model's full logits "
                             "with the teacher's, which the chunked loss never computes; remove one of them")
        return self


# --------------------------------------------------------------------------- stage sections (config/stages.py)

#: ``stage:`` values, from the stage registry
StageName = Literal[tuple(STAGES)]  # type: ignore[valid-type]


# --------------------------------------------------------------------------- distributed (docs/distributed.md)


class FsdpOptions(Strict):
    """PyTorch FSDP, as accelerate's FSDP plugin takes it (``TrainingArguments.fsdp_config``)."""

    sharding: Literal["full_shard", "shard_grad_op", "hybrid_shard"] = Field(
        "full_shard", description="full_shard: parameters, gradients and optimizer state sharded (ZeRO-3-like); "
        "shard_grad_op: gradients and optimizer state (ZeRO-2-like); hybrid_shard (version 1 only): full_shard "
        "within a node, replicated across nodes")
    cpu_offload: bool = Field(False, description="keep sharded parameters (and their optimizer state) in CPU memory")
    auto_wrap: bool = Field(True, description="wrap each decoder layer as its own FSDP unit (the model's "
                                              "_no_split_modules); false: the whole model is one unit")
    activation_checkpointing: bool = Field(False, description="FSDP's own activation checkpointing per wrapped "
                                                              "layer (instead of train.gradient_checkpointing)")
    version: Literal[1, 2] = Field(2, description="FSDP2 (fully_shard, per-parameter DTensor shards) or FSDP1")

    @model_validator(mode="after")
    def _hybrid_needs_v1(self) -> FsdpOptions:
        if self.sharding == "hybrid_shard" and self.version != 1:
            raise ValueError("distributed.fsdp.sharding hybrid_shard exists only in FSDP1: set "
                             "distributed.fsdp.version: 1 (FSDP2 takes full_shard or shard_grad_op)")
        return self


class DeepSpeedOptions(Strict):
    """DeepSpeed ZeRO; written as ``<run>/deepspeed.json`` and passed to the Trainer."""

    zero_stage: Literal[1, 2, 3] = Field(2, description="1: optimizer state sharded; 2: + gradients; "
                                                        "3: + parameters")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: optimizer state and step on the CPU")
    offload_parameters: bool = Field(False, description="ZeRO-3 only: parameters in CPU memory between uses")

    @model_validator(mode="after")
    def _offload_params_needs_zero3(self) -> DeepSpeedOptions:
        if self.offload_parameters and self.zero_stage != 3:
            raise ValueError("distributed.deepspeed.offload_parameters needs zero_stage: 3 (stages 1 and 2 keep "
                             "a full copy of the parameters on every GPU)")
        return self


class DistributedConfig(Strict):
    """How a run trains on several processes (``tuneforge train --nproc N`` or ``torchrun``); ignored on one."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto: nccl on CUDA, gloo on CPU")
    timeout: float = Field(600, gt=0, description="seconds a collective (all-reduce, barrier) may wait for the "
                           "other ranks; then every rank stops, naming the dead or stalled rank (the watchdog, "
                           "docs/distributed.md)")
    connect_timeout_s: float = Field(120, gt=0, description="how long a node waits for the master address to "
                                                            "answer before it gives up")
    shutdown_timeout_s: int = Field(300, gt=0, description="after SIGTERM: seconds torchrun gives the ranks to "
                                                           "save their checkpoint before it kills them")
    fsdp: FsdpOptions = FsdpOptions()
    deepspeed: DeepSpeedOptions = DeepSpeedOptions()

    @model_validator(mode="before")
    @classmethod
    def _minutes(cls, raw):  # the key of old configs (and old runs' config.yaml): timeout_minutes → timeout (s)
        if isinstance(raw, dict) and "timeout_minutes" in raw and "timeout" not in raw:
            raw = {**raw}
            raw["timeout"] = float(raw.pop("timeout_minutes")) * 60
        return raw

    @model_validator(mode="after")
    def _options_match_strategy(self) -> DistributedConfig:
        for section, default in (("fsdp", FsdpOptions()), ("deepspeed", DeepSpeedOptions())):
            if getattr(self, section) != default and self.strategy != section:
                raise ValueError(f"distributed.{section} options are for strategy {section!r}, not "
                                 f"{self.strategy!r}: set distributed.strategy: {section} or remove them")
        return self


# --------------------------------------------------------------------------- run


class RunConfig(Strict):
    """One training run, as written in a YAML file."""

    run_name: str = "run"
    output_dir: str | None = None
    seed: int = 42
    stage: StageName = "sft"
    model: ModelConfig
    method: MethodConfig = Field(default_factory=lambda: METHOD_CONFIGS["lora"](name="lora"))
    data: DataConfig
    train: TrainConfig = TrainConfig()
    preference: PreferenceConfig | None = None
    grpo: GrpoConfig | None = None
    rm: RmConfig | None = None
    distributed: DistributedConfig = DistributedConfig()

    @field_validator("output_dir", mode="after")
    @classmethod
    def _home(cls, value):
        return home(value)  # `~/runs/x` made a literal ./~ directory

    @model_validator(mode="after")
    def _stage_sections(self) -> RunConfig:
        spec = STAGES[self.stage]
        for section in sorted({s.section for s in STAGES.values() if s.section}):
            users = [name for name, s in STAGES.items() if s.section == section]
            value = getattr(self, section)
            if section != spec.section:
                if value is not None:
                    raise ValueError(f"{section}: is for stage{'s' if len(users) > 1 else ''} {', '.join(users)}, "
                                     f"not stage {self.stage!r}")
                continue
            if value is None:
                if spec.required:
                    raise ValueError(f"stage {self.stage!r} needs a {section}: section (see docs/preference.md)")
                setattr(self, section, spec.config())
            elif spec.keys:
                unused = sorted(getattr(self, section).model_fields_set - set(spec.keys))
                if unused:
                    raise ValueError(f"{section}.{unused[0]} has no effect in stage {self.stage!r}; its keys: "
                                     f"{', '.join(spec.keys)}")
        if self.train.embedding_lr is not None and self.distributed.strategy != "ddp":
            raise ValueError(f"train.embedding_lr with distributed.strategy {self.distributed.strategy!r}: its "
                             "optimizer group is built over whole, unsharded parameters before sharding; remove "
                             "train.embedding_lr (or use strategy ddp)")
        if isinstance(self.train.loss_chunk, int) and self.distributed.strategy != "ddp":
            raise ValueError(f"train.loss_chunk with distributed.strategy {self.distributed.strategy!r}: the chunked "
                             "loss calls the LM head outside the model's forward, where a sharded head is not "
                             "gathered; remove train.loss_chunk (or use strategy ddp)")
        if self.data.streaming and self.stage != "pt":
            raise ValueError(f"data.streaming is for stage pt (raw text packed on the fly), not stage "
                             f"{self.stage!r}: remove data.streaming — prepared data is cached and memory-mapped, "
                             "so a large chat or preference set need not fit in memory")
        if self.data.streaming and not self.train.max_steps:
            raise ValueError("data.streaming: true needs train.max_steps (a stream has no length, so epochs cannot "
                             "be counted); set train.max_steps, or drop data.streaming to use prepared (cached, "
                             "memory-mapped) data")
        if self.data.streaming and self.train.dataloader_workers:
            raise ValueError("data.streaming reads in the training process (its position is saved with each "
                             "checkpoint): set train.dataloader_workers: 0")
        for key, used in (("data.mix", self.data.mix), ("data.task_prefix", self.data.task_prefix),
                          ("data.task_weights", self.data.task_weights), ("train.retention", self.train.retention),
                          ("train.distill", self.train.distill)):
            if used and self.stage != "sft":
                raise ValueError(f"{key} is for stage 'sft', not stage {self.stage!r}")
        return self

    @model_validator(mode="after")
    def _defaults(self) -> RunConfig:
        if self.output_dir is None:
            self.output_dir = f"runs/{self.run_name}"
        if self.method.name == "auto" and self.train.memory_budget_gb is None:
            raise ValueError("method.name 'auto' needs train.memory_budget_gb (the GPU memory to fit in, in GB)")
        return self
