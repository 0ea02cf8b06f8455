"""At most `max_migrations` VM migrations per plan."""

from __future__ import annotations

import numpy as np

from recommender.engine.problem import Problem, State
from recommender.engine.rules.base import Constraint, LinearModel, Movers, Violation


class MaxMigrations(Constraint):
    name = "max_migrations"

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.limit = problem.balance.max_migrations

    def migration_budget(self) -> int:
        return self.limit

    def allowed_targets(self, state: State, movers: Movers) -> np.ndarray:
        fits = state.migrations + movers.count <= self.limit
        return np.repeat(fits[:, None], self.problem.n_nodes, axis=1)

    def check(self, state: State, *, final: bool = False) -> list[Violation]:
        if state.migrations <= self.limit:
            return []
        return [Violation(self.name, "plan", f"{state.migrations} > {self.limit} migrations")]

    def add_to_model(self, model: LinearModel) -> None:
        model.add_budget_row(float(self.limit))
