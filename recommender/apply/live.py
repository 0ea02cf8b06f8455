"""The check before each migration, against a fresh snapshot of the cluster: the VM is still on
its source, the target still has room for it under every rule, and no rule keeps the VM where
it is (excluded, pinned, a node not in the snapshot). Otherwise the step is skipped with the
reason, and the steps waiting for it with it.

The live state is read from the same source the plan was (Prometheus, or the snapshot file
re-read), which lags the cluster by up to a scrape interval: the migrations this run has
finished are applied on top when the snapshot still shows the VM on their source, and those in
flight count on both their nodes, as the plan's waves count them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from recommender.apply.queue import LiveCheck
from recommender.apply.steps import Step
from recommender.config import Config
from recommender.engine.build import build_problem
from recommender.engine.problem import State
from recommender.engine.rules import Movers, allowed_targets, prepare_constraints
from recommender.model import Snapshot


def _with_finished(snapshot: Snapshot, done: Sequence[Step]) -> Snapshot:
    vms = snapshot.vms.copy()
    for step in done:
        if step.vm in vms.index and vms.at[step.vm, "node"] == step.source:
            vms.at[step.vm, "node"] = step.target
    return replace(snapshot, vms=vms)


def stale_reason(
    snapshot: Snapshot,
    config: Config,
    step: Step,
    done: Sequence[Step] = (),
    flying: Sequence[Step] = (),
) -> str | None:
    """Why `step` must not run now, in one line; None when it may."""
    snapshot = _with_finished(snapshot, done)
    if step.vm not in snapshot.vms.index:
        return f"VM {step.vm} is not in the live state"
    node = str(snapshot.vms.at[step.vm, "node"])
    if node != step.source:
        return f"VM {step.vm} is on {node} now, not on {step.source}"
    if step.target not in snapshot.nodes.index:
        return f"target {step.target} is not in the live state"
    problem = build_problem(snapshot, config)
    vm = problem.vm_index()[step.vm]
    target = problem.node_index()[step.target]
    constraints = prepare_constraints(problem)
    state = State.initial(problem)
    vm_pos, node_pos = problem.vm_index(), problem.node_index()
    for other in flying:
        if other.vm in vm_pos and other.target in node_pos and other.vm != step.vm:
            state.add_presence(problem, vm_pos[other.vm], node_pos[other.target])
    movers = Movers.of_groups(problem, state, [np.array([vm], dtype=np.int64)])
    if allowed_targets(constraints, state, movers)[0, target]:
        return None
    refusing = [c.name for c in constraints if not c.allowed_targets(state, movers)[0, target]]
    if not problem.receivable[target]:
        refusing.append("maintenance or unknown capacity")
    rules = ", ".join(dict.fromkeys(refusing)) or "the rules"
    return f"the rules refuse VM {step.vm} on {step.target} now ({rules})"


def live_check(snapshot_of: Callable[[], Snapshot], config: Config) -> LiveCheck:
    """A queue check that takes a fresh snapshot for every step."""

    def check(step: Step, done: Sequence[Step], flying: Sequence[Step]) -> str | None:
        return stale_reason(snapshot_of(), config, step, done, flying)

    return check
