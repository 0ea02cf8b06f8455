"""The faces an operator meets: the `vmbalance` command line, `vmbalance serve`, and the
report run; each wires the source, the plan and the outputs together."""
