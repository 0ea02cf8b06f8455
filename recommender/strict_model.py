"""The base of every settings model: the config sections and the rules' own settings.

Unknown keys are errors (a misspelt key must not be ignored), values are frozen, and bare
numbers are accepted where names are expected: VMIDs and node names are often written
unquoted in YAML. Infinite and NaN numbers are refused.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, coerce_numbers_to_str=True, allow_inf_nan=False
    )
