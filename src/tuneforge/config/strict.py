"""The base of every config section (its own module so that the plug-in declarations, config/methods.py and
config/stages.py, can use it without importing the schema, which is built from them)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
