"""vmbalance: reads VM load back from PromQL and plans the few live migrations that balance it."""

__version__ = "0.1.0"
