"""The balance engine: from a snapshot and the config to the migrations that balance it.

Modules in the order the data flows through them:

* `build` — the snapshot, the config and the rules into a `problem` (arrays by node and VM,
  units of VMs that move together, the mutable `State` the search plans on);
* `measure` — the imbalance, defined once; `hysteresis` — when to plan, which moves pay;
* `rules` — one module per hard rule, each with its settings, preparation, checks and rows
  for the exact program, registered in `rules.RULES`;
* `forced` — the moves the rules force (evacuation, repairs);
* `scorer`, `candidates`, `search` — the heuristic: moves scored with numpy, beam search,
  pilot method, tabu search; `exact` — the same question as a mixed-integer program;
* `ordering` — a feasible order for a set of moves; `held_back` — gain thresholds and the
  moves rules stopped;
* `planner` — `plan_moves`, which runs all of the above; `result` — what it returns.

`recommender.plan` turns the result into waves of migrations.
"""
