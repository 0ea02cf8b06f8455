"""Names that repeat across clusters told apart in the answers, on known answers."""

from __future__ import annotations

from recommender.config import Config
from recommender.source.clusters import per_cluster_config, qualify


def series(value: float, **labels: str) -> dict[str, object]:
    return {"metric": labels, "value": [0, str(value)]}


def test_only_names_in_several_clusters_are_keyed_per_cluster() -> None:
    answers = {
        "node_cpus": [
            series(8, cluster="west", node="pve1"),
            series(16, cluster="east", node="pve1"),
            series(8, cluster="west", node="w2"),
        ],
        "host_cpu": [series(1, node="pve1"), series(2, node="w2")],  # no cluster label
    }
    apart = qualify(answers)
    nodes = [item["metric"]["node"] for item in apart.answers["node_cpus"]]
    assert nodes[2] == "w2" and nodes[0] != nodes[1]
    assert sorted(apart.nodes.values()) == [("east", "pve1"), ("west", "pve1")]
    # A host series on a repeated name without its cluster joins neither node.
    host = [item["metric"]["node"] for item in apart.answers["host_cpu"]]
    assert host[1] == "w2" and host[0] not in apart.nodes and host[0] not in nodes
    assert apart.unassigned == {"pve1"}


def test_without_repeated_names_the_answers_are_as_they_were() -> None:
    answers = {"node_cpus": [series(8, cluster="west", node="w1"), series(8, node="e1")]}
    apart = qualify(answers)
    assert not apart.any and apart.answers == answers


def test_a_per_node_capacity_applies_to_the_name_in_every_cluster() -> None:
    answers = {
        "node_cpus": [
            series(8, cluster="west", node="pve1"),
            series(8, cluster="east", node="pve1"),
        ]
    }
    apart = qualify(answers)
    config = Config.model_validate({"capacity": {"per_node": {"pve1": {"network": 1e9}, "x": {}}}})
    per_node = per_cluster_config(config, apart).capacity.per_node
    assert sorted(per_node) == sorted([*apart.nodes, "x"])
    assert all(per_node[key] == {"network": 1e9} for key in apart.nodes)
