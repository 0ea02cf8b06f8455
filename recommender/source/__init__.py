"""The source: everything that speaks PromQL.

`queries` builds every query (the snapshot's and the report's), `http` sends them with one
deadline each, `answers` reads what comes back, `cluster` and `history` turn the answers
into a `Snapshot` for the plan and a `History` for the report, and `prometheus` ties them
together as `PrometheusSource`.
"""
