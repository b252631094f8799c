"""THE stage registry: every ``stage:`` a run can name, with its config section, trainer, data kind and defaults.

Pure (no torch): the schema's ``stage:`` values and its section checks, the CLI help, ``data preview``, the trainer
dispatch (``tuneforge.train.stages.get_stage``) and the docs list are all read from :data:`STAGES`. A stage is
declared here by one :func:`register_stage` call and implemented by one module of ``tuneforge.train.stages`` whose
``stage(name)`` returns the trainer strategy (``trainer``; ``None`` for pt/sft, which the causal-LM trainer of
``tuneforge.train`` runs itself). See docs/architecture.md, "How to add a stage".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, model_validator

from tuneforge.config.strict import Strict

#: record kinds a stage reads: ``text`` (pt: any text), ``chat`` (sft: text / alpaca / chat records),
#: ``paired`` (prompt + chosen + rejected), ``unpaired`` (prompt + completion + label), ``prompt`` (prompt + fields)
DATA_KINDS = ("text", "chat", "paired", "unpaired", "prompt")


@dataclass(frozen=True)
class StageSpec:
    """One stage.

    Attributes:
        name: the ``stage:`` value.
        data: the record kind it trains on (one of :data:`DATA_KINDS`).
        trainer: the module of ``tuneforge.train.stages`` whose ``stage(name)`` builds its data and trainer;
            ``None``: the causal-LM trainer of ``tuneforge.train`` (pt, sft).
        section: the run config key holding the stage's own options (several stages may share one), or None.
        config: that section's config class.
        keys: the section's keys this stage reads (setting another one is an error); empty = all of them.
        defaults: per-stage defaults of section keys left unset (read through :func:`section_value`).
        required: the section must be written (it has required keys); otherwise its defaults are filled in.
        help: one line for the CLI and the docs.
    """

    name: str
    data: str
    trainer: str | None = None
    section: str | None = None
    config: type | None = None
    keys: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)
    required: bool = False
    help: str = ""


STAGES: dict[str, StageSpec] = {}


def register_stage(spec: StageSpec) -> StageSpec:
    """Declare a stage (its name must be new, its data kind known, a section needs a config class)."""
    if spec.name in STAGES:
        raise ValueError(f"stage {spec.name!r} is registered twice")
    if spec.data not in DATA_KINDS:
        raise ValueError(f"stage {spec.name!r}: data kind {spec.data!r} is not one of {DATA_KINDS}")
    if (spec.section is None) != (spec.config is None):
        raise ValueError(f"stage {spec.name!r}: give both section and config, or neither")
    STAGES[spec.name] = spec
    return spec


def section_value(section: Any, stage: str, key: str) -> Any:
    """``section.<key>`` as written, else the stage's default for it (e.g. ``beta``: dpo 0.1, simpo 2.0)."""
    value = getattr(section, key)
    return STAGES[stage].defaults.get(key) if value is None else value


# --------------------------------------------------------------------------- sections

DPO_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")


class PreferenceConfig(Strict):
    """Keys of the preference stages; ``beta`` defaults per stage (dpo/kto/orpo 0.1, simpo 2.0)."""

    loss: Literal[DPO_LOSSES] = "sigmoid"  # type: ignore[valid-type]
    beta: float | None = Field(None, gt=0, description="dpo/kto: KL strength; orpo: lambda; simpo: reward scale")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo robust/exo_pair; simpo")
    precompute_ref: bool = Field(False, description="full fine-tuning: reference log-probs computed once, no copy")
    gamma: float = Field(0.5, ge=0, description="simpo: target reward margin")
    desirable_weight: float = Field(1.0, gt=0, description="kto")
    undesirable_weight: float = Field(1.0, gt=0, description="kto")

    def beta_for(self, stage: str) -> float:
        """``beta`` as given, else the stage's default."""
        return section_value(self, stage, "beta")


class RmConfig(Strict):
    """Reward-model training (``stage: rm``): Bradley–Terry loss ``-log σ(r_chosen - r_rejected - margin)``."""

    margin: Literal["none", "record"] | float = Field(
        "none", description="none | record (each pair's numeric 'margin' field) | a number (the same for every pair)")
    center_rewards: float | None = Field(None, ge=0, description="coefficient of the mean squared reward added to "
                                         "the loss (keeps rewards centred on 0; TRL's center_rewards_coefficient)")


class RewardConfig(Strict):
    """One reward of a GRPO run (summed with ``weight``): a verifiable rule, a function, or a trained reward model."""

    type: Literal["exact", "regex", "numeric", "format", "function", "model"] | None = Field(
        None, description="may be left out when 'model' is given")
    field: str = Field("answer", description="exact/numeric: the record field holding the expected answer")
    pattern: str | None = Field(None, description="regex: must match the completion; format: must match it whole")
    function: str | None = Field(None, description="function: 'package.module:name' called per completion")
    tolerance: float = Field(1e-6, ge=0, description="numeric: allowed absolute difference")
    model: str | None = Field(None, description="model: a reward-model run (stage rm) scoring prompt + completion")
    weight: float = 1.0

    @model_validator(mode="after")
    def _needs(self) -> RewardConfig:
        if self.type is None:
            if self.model is None:
                raise ValueError("a reward needs 'type' (exact, regex, numeric, format, function) or 'model: RUN'")
            self.type = "model"
        if (self.type == "model") != (self.model is not None):
            raise ValueError("'model: RUN' (a reward model trained with stage rm) goes with type 'model' only")
        if self.type in ("regex", "format") and not self.pattern:
            raise ValueError(f"reward type {self.type!r} needs 'pattern' (a Python regular expression)")
        if self.type == "function" and not self.function:
            raise ValueError("reward type 'function' needs 'function: package.module:name'")
        return self


class GrpoConfig(Strict):
    """GRPO: sample ``group_size`` completions per prompt, score them, push towards the better ones."""

    rewards: list[RewardConfig] = Field(min_length=1)
    group_size: int = Field(4, ge=2)
    beta: float = Field(0.0, ge=0, description="KL coefficient against the reference (0: no reference pass)")
    epsilon: float = Field(0.2, gt=0, description="clipping range of the policy ratio")
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    steps_per_generation: int | None = Field(None, gt=0, description="optimizer steps per generation batch")


# --------------------------------------------------------------------------- the stages

register_stage(StageSpec("pt", data="text", help="continued pre-training: next-token loss on every token"))
register_stage(StageSpec("sft", data="chat", help="supervised fine-tuning: loss on the assistant's answers"))
register_stage(StageSpec(
    "dpo", data="paired", trainer="tuneforge.train.stages.dpo", section="preference", config=PreferenceConfig,
    keys=("loss", "beta", "label_smoothing", "precompute_ref"), defaults={"beta": 0.1},
    help="direct preference optimisation against a reference (TRL's DPOTrainer)"))
register_stage(StageSpec(
    "orpo", data="paired", trainer="tuneforge.train.stages.pairwise", section="preference", config=PreferenceConfig,
    keys=("beta",), defaults={"beta": 0.1}, help="odds-ratio preference optimisation, reference-free"))
register_stage(StageSpec(
    "kto", data="unpaired", trainer="tuneforge.train.stages.kto", section="preference", config=PreferenceConfig,
    keys=("beta", "precompute_ref", "desirable_weight", "undesirable_weight"), defaults={"beta": 0.1},
    help="Kahneman-Tversky optimisation on single good/bad examples (TRL's KTOTrainer)"))
register_stage(StageSpec(
    "simpo", data="paired", trainer="tuneforge.train.stages.pairwise", section="preference", config=PreferenceConfig,
    keys=("beta", "gamma", "label_smoothing"), defaults={"beta": 2.0},
    help="simple preference optimisation (length-normalised, reference-free)"))
register_stage(StageSpec(
    "rm", data="paired", trainer="tuneforge.train.stages.rm", section="rm", config=RmConfig,
    help="reward model: a one-output score head trained on pairs with the Bradley-Terry loss (TRL's RewardTrainer)"))
register_stage(StageSpec(
    "grpo", data="prompt", trainer="tuneforge.train.stages.grpo", section="grpo", config=GrpoConfig, required=True,
    help="group relative policy optimisation with verifiable rewards (TRL's GRPOTrainer)"))
