"""The planner's one error type."""

from __future__ import annotations


class PlanError(ValueError):
    """A planning question that cannot be answered as asked; the message names the option."""
