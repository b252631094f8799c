"""Retention terms' config classes: the ``train.retention`` section, one class per term told apart by ``method``.

Pure (no torch). Each term's implementation is one module of ``tuneforge.train.retention`` registered under the
same name (``@register("ewc")``); tests/test_registries.py keeps :data:`RETENTION_CONFIGS` and that registry in
agreement. Formulas and measured strengths: docs/forgetting.md.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import ConfigDict, Field, model_validator

from tuneforge.config.strict import Strict

_REFERENCE = "general data (files or a built-in corpus name such as pydoc)"


class _Term(Strict):
    """Shared options; ``lambda`` is spelled ``lambda_`` in Python (a keyword)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, serialize_by_alias=True,
                              validate_by_name=True, validate_by_alias=True)

    #: keys of other terms, and what to say when one is given to this term
    wrong_keys: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _other_terms_keys(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for key, why in cls.wrong_keys.items():
                if value.get(key) is not None:
                    raise ValueError(f"method {value.get('method')!r} {why}")
        return value


class EwcConfig(_Term):
    """``ewc`` (Kirkpatrick et al., 2017): ``lambda/2 * sum F_i (theta_i - theta*_i)^2`` with a diagonal Fisher
    ``F`` from ``reference`` data."""

    wrong_keys: ClassVar[dict[str, str]] = {"alpha": "is weighted by train.retention.lambda, not alpha"}

    method: Literal["ewc"]
    # No default: the right strength depends on the Fisher's scale (docs/forgetting.md has measured values).
    lambda_: float | None = Field(None, alias="lambda", ge=0, description="penalty strength")
    reference: str | list[str] | None = Field(None, description=_REFERENCE)
    samples: int = Field(64, gt=0, description="reference samples for the Fisher")

    @model_validator(mode="after")
    def _needs(self) -> EwcConfig:
        if not self.reference:
            raise ValueError("method 'ewc' needs train.retention.reference (general data: a file or 'pydoc')")
        if self.lambda_ is None:
            raise ValueError("method 'ewc' needs train.retention.lambda (its strength; docs/forgetting.md has "
                             "measured values)")
        return self


class L2spConfig(_Term):
    """``l2sp`` (Li et al., 2018): ``lambda/2 * sum (theta_i - theta*_i)^2`` towards the start weights."""

    wrong_keys: ClassVar[dict[str, str]] = {"alpha": "is weighted by train.retention.lambda, not alpha",
                   "reference": "uses no reference data (drop train.retention.reference)"}

    method: Literal["l2sp"]
    # No default: the right strength depends on the parameter count's scale.
    lambda_: float | None = Field(None, alias="lambda", ge=0, description="penalty strength")

    @model_validator(mode="after")
    def _needs(self) -> L2spConfig:
        if self.lambda_ is None:
            raise ValueError("method 'l2sp' needs train.retention.lambda (its strength; docs/forgetting.md has "
                             "measured values)")
        return self


class KdConfig(_Term):
    """``kd``: ``alpha * T^2 * KL(start || model)`` on ``reference`` batches (the start model is the same model
    with the adapter disabled)."""

    wrong_keys: ClassVar[dict[str, str]] = {"lambda": "is weighted by train.retention.alpha, not lambda",
                   "lambda_": "is weighted by train.retention.alpha, not lambda"}

    method: Literal["kd"]
    alpha: float = Field(1.0, ge=0, description="weight of the distillation term")
    temperature: float = Field(2.0, gt=0, description="softmax temperature")
    reference: str | list[str] | None = Field(None, description=_REFERENCE)
    samples: int = Field(64, gt=0, description="reference samples cycled")
    batch_size: int | None = Field(None, gt=0, description="reference samples per step (default train.batch_size)")

    @model_validator(mode="after")
    def _needs(self) -> KdConfig:
        if not self.reference:
            raise ValueError("method 'kd' needs train.retention.reference (general data: a file or 'pydoc')")
        return self


#: every retention term's config class by ``train.retention.method``
RETENTION_CONFIGS: dict[str, type[_Term]] = {
    cls.model_fields["method"].annotation.__args__[0]: cls for cls in (EwcConfig, L2spConfig, KdConfig)
}

#: the ``train.retention`` section: one config class per term, told apart by ``method``
RetentionConfig = Annotated[Union[tuple(RETENTION_CONFIGS.values())], Field(discriminator="method")]  # noqa: UP007
