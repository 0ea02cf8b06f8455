"""Nodes and VMs of different clusters behind one store, kept apart.

Node names repeat across clusters (every Proxmox cluster may have a `pve1`), and so do VM ids
(each Proxmox cluster counts VMIDs from 100). Every snapshot query keeps the `cluster` label;
before the answers are assembled, a node name or VM id seen in more than one cluster is
replaced by a key of its own per cluster, so the assembly (`recommender.source.cluster`) sees
nodes by (cluster, node) and VMs by (cluster, vm). The snapshot's frames then carry the plain
names again, each node and VM with its cluster (a `cluster` column on both frames), and
`recommender.model.cluster_snapshot` gives every cluster its own part, where names are unique.

A series without a `cluster` label on a name that is in several clusters (a node_exporter job
not relabelled with the cluster, docs/deploy.md) cannot be told to which it belongs: it joins
none, and the snapshot's warnings say so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd

from recommender.config import Config
from recommender.model import Snapshot
from recommender.source.answers import Answer
from recommender.text import and_more

# Between the cluster and the name in a key: a control character no label value carries in
# practice; the keys never leave this module's two functions.
_SEP = "\x1f"


@dataclass
class Qualified:
    """The answers with repeated names keyed per cluster, and how to undo it."""

    answers: dict[str, Answer]
    nodes: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (cluster, node)
    vms: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (cluster, vm)
    unassigned: set[str] = field(default_factory=set)  # repeated names seen without a cluster

    @property
    def any(self) -> bool:
        return bool(self.nodes or self.vms)


def _clusters_by(answers: Mapping[str, Answer], label: str) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {}
    for answer in answers.values():
        for item in answer:
            labels = item.get("metric", {})
            if label in labels and labels.get("cluster"):
                seen.setdefault(labels[label], set()).add(labels["cluster"])
    return seen


def _key(cluster: str, name: str) -> str:
    return f"{cluster}{_SEP}{name}"


def qualify(answers: Mapping[str, Answer]) -> Qualified:
    """The answers with every node name and VM id that is in more than one cluster replaced
    by a key per (cluster, name); the answers as they are when no name repeats."""
    repeated = {
        label: {name for name, found in _clusters_by(answers, label).items() if len(found) > 1}
        for label in ("node", "vm")
    }
    if not repeated["node"] and not repeated["vm"]:
        return Qualified(dict(answers))
    out = Qualified({})
    keys = {"node": out.nodes, "vm": out.vms}
    for name, answer in answers.items():
        items: Answer = []
        for item in answer:
            labels: dict[str, Any] = dict(item.get("metric", {}))
            cluster = labels.get("cluster") or ""
            for label in ("node", "vm"):
                value = labels.get(label)
                if value is None or value not in repeated[label]:
                    continue
                if not cluster:
                    out.unassigned.add(str(value))
                    labels[label] = _key("", value)  # joins nothing
                    continue
                labels[label] = _key(cluster, value)
                keys[label][labels[label]] = (cluster, value)
            items.append({**item, "metric": labels})
        out.answers[name] = items
    return out


def per_cluster_config(config: Config, qualified: Qualified) -> Config:
    """`config` with each `capacity.per_node` entry of a repeated node name given to that
    name's node in every cluster (the capacities are read while the keys are in place)."""
    per_node = dict(config.capacity.per_node)
    for key, (_cluster, node) in qualified.nodes.items():
        if node in config.capacity.per_node:
            per_node[key] = config.capacity.per_node[node]
    for _cluster, node in qualified.nodes.values():
        per_node.pop(node, None)
    capacity = config.capacity.model_copy(update={"per_node": per_node})
    return config.model_copy(update={"capacity": capacity})


def _shown(text: str, names: Mapping[str, tuple[str, str]]) -> str:
    for key, (cluster, name) in names.items():
        text = text.replace(key, f"{name} (cluster {cluster})")
    return text


def unqualify(snapshot: Snapshot, qualified: Qualified) -> Snapshot:
    """The snapshot assembled from qualified answers, with plain names again and a `cluster`
    column on both frames (node names may then repeat across clusters, never within one)."""
    if not qualified.any:
        return snapshot
    nodes, vms = snapshot.nodes.copy(), snapshot.vms.copy()
    node_cluster = {str(n): str(c) for n, c in nodes["cluster"].items()}
    for key, (cluster, _node) in qualified.nodes.items():
        node_cluster[key] = cluster
    nodes["cluster"] = [node_cluster[str(n)] for n in nodes.index]
    plain_node = {key: node for key, (_cluster, node) in qualified.nodes.items()}
    nodes.index = pd.Index([plain_node.get(str(n), str(n)) for n in nodes.index], name="node")
    vms["cluster"] = [node_cluster.get(str(n), "") for n in vms["node"]]
    vms["node"] = [plain_node.get(str(n), str(n)) for n in vms["node"]]
    plain_vm = {key: vm for key, (_cluster, vm) in qualified.vms.items()}
    vms.index = pd.Index([plain_vm.get(str(v), str(v)) for v in vms.index], name="vm")
    names = {**qualified.nodes, **qualified.vms}
    warnings = [_shown(w, names) for w in snapshot.warnings]
    if qualified.unassigned:
        warnings.append(
            "series without a cluster label for names that are in several clusters "
            f"(joined to none): {and_more(sorted(qualified.unassigned))}"
        )
    return replace(
        snapshot, nodes=nodes, vms=vms, warnings=[w.replace(_SEP, "/") for w in warnings]
    )


__all__ = ["Qualified", "per_cluster_config", "qualify", "unqualify"]
