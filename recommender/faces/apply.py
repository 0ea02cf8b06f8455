"""`vmbalance apply`: execute a plan — a saved plan document (`--plan FILE`) or a fresh one —
through the rolling queue (`recommender.apply`).

The plan is shown and confirmed first (unless `--yes`); `--dry-run` prints the steps and the
order they wait for, and executes nothing. Stdout carries only that dry-run list; the plan
table, the progress and the summary go to stderr. Exit status: 0 when every migration that was
not skipped succeeded, 1 when one failed or the run was stopped (SIGINT, SIGTERM), 2 for bad
input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TextIO

from rich.console import Console
from rich.table import Table

from recommender.apply.audit import AuditLog
from recommender.apply.backend import Backend
from recommender.apply.live import live_check
from recommender.apply.metrics import ApplyMetrics
from recommender.apply.queue import Queue, QueueResult
from recommender.apply.steps import (
    Step,
    cluster_of_document,
    dependencies,
    steps_of_document,
    steps_of_plan,
)
from recommender.config import Config
from recommender.errors import CommandError
from recommender.faces.apply_progress import LineProgress, LiveProgress
from recommender.model import Snapshot
from recommender.output_file import append_output, write_output
from recommender.quoting import display

EXIT_OK = 0
EXIT_FAILED = 1

# The config, the steps, their command flavour, the live source and the plan's cluster.
Loaded = tuple[Config, list[Step], str, Callable[[], Snapshot], str]


def _live_source(args: argparse.Namespace, config: Config, cluster: str) -> Callable[[], Snapshot]:
    """Where each live check reads the plan's cluster: the snapshot file again, or
    Prometheus (that cluster's series only, where the plan names one)."""
    from recommender.faces.cli import evaluation_time
    from recommender.preflight import select_cluster

    if args.input:
        from recommender.snapshot import load_snapshot

        path = args.input
        return lambda: _only(load_snapshot(path)[0], cluster)
    from recommender.source.prometheus import PrometheusSource

    source = PrometheusSource(config.prometheus)
    at = evaluation_time(args)
    if not cluster:
        return lambda: select_cluster(source.build_snapshot(config, at=at), None)
    return lambda: _only(source.build_snapshot(config, at=at, cluster=cluster), cluster)


def _only(snapshot: Snapshot, cluster: str) -> Snapshot:
    """`snapshot`'s part in `cluster`; data of one unnamed cluster stands for a plan that
    names none, and data of several is refused for it."""
    from recommender.model import clusters_of
    from recommender.preflight import select_cluster

    if not cluster:
        return select_cluster(snapshot, None)
    if clusters_of(snapshot.nodes) == [cluster]:
        return snapshot
    return select_cluster(snapshot, cluster)


def _read_plan(path: str) -> object:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise CommandError(f"--plan {path}: cannot read: {reason}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandError(f"--plan {path}: not JSON: {exc.msg} at line {exc.lineno}") from None


def load_steps(args: argparse.Namespace) -> Loaded:
    """The config, the steps, their command flavour and the live source of one apply run."""
    from recommender.faces.cli import effective_config, load_plan_input

    if args.input == "-":
        raise CommandError(
            "--input -: apply re-reads the snapshot before each migration; give a file"
        )
    if args.plan:
        document = _read_plan(args.plan)
        steps, flavour = steps_of_document(document, display(args.plan))
        assert isinstance(document, dict)  # steps_of_document refuses anything else
        cluster = cluster_of_document(document, display(args.plan))
        if args.cluster is not None and args.cluster != cluster:
            raise CommandError(
                f"--plan {display(args.plan)} is for cluster {display(cluster or '(none)')}, "
                f"not {display(args.cluster)}"
            )
        config = effective_config(args)
        return config, steps, flavour, _live_source(args, config, cluster), cluster
    from recommender.outputs.commands import command_flavour
    from recommender.plan import build_plan
    from recommender.preflight import check_snapshot, select_cluster

    snapshot, config = load_plan_input(args)
    snapshot = select_cluster(snapshot, args.cluster)
    check_snapshot(snapshot)
    plan = build_plan(snapshot, config)
    live = _live_source(args, config, plan.cluster)
    return config, steps_of_plan(plan), command_flavour(plan, config), live, plan.cluster


def make_backend(flavour: str, config: Config) -> Backend:
    """The backend the plan's command flavour names."""
    if flavour == "proxmox":
        from recommender.apply.proxmox import ProxmoxBackend

        return ProxmoxBackend(config.apply)
    from recommender.apply.libvirt import LibvirtBackend

    return LibvirtBackend(config.apply, config.output.libvirt_uri)


def plan_table(steps: Sequence[Step], config: Config) -> Table:
    table = Table(title=f"{len(steps)} migration(s) to apply", title_justify="left")
    for column in ("step", "wave", "vm", "name", "from", "to", "kind", "memory", "estimate"):
        table.add_column(column)
    for s in steps:
        table.add_row(
            str(s.step),
            str(s.wave),
            display(s.vm),
            display(s.name),
            display(s.source),
            display(s.target),
            s.kind,
            f"{s.memory_bytes / 2**30:.1f} GiB",
            f"{s.estimate_seconds(config.apply):.0f} s",
        )
    return table


def dry_run_text(steps: Sequence[Step]) -> str:
    deps = dependencies(steps)
    lines = []
    for s in steps:
        waits = ", ".join(str(n) for n in deps[s.step]) or "nothing"
        lines.append(
            f"step {s.step}: migrate {display(s.vm)} from {display(s.source)} to "
            f"{display(s.target)} ({s.kind}); waits for {waits}\n"
        )
    return "".join(lines)


def _confirm(count: int) -> None:
    if not sys.stdin.isatty():
        raise CommandError(
            "not confirmed: standard input is not a terminal; pass --yes to apply without asking"
        )
    answer = input(f"Apply {count} migration(s)? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise CommandError("not confirmed; nothing was migrated")


def progress_view(
    console: Console, config: Config, steps: Sequence[Step], live: bool
) -> LineProgress | LiveProgress:
    """The live table on a terminal, plain lines elsewhere."""
    if live:
        return LiveProgress(console, config.apply, steps)
    return LineProgress(console, config.apply)


@contextlib.contextmanager
def stopping_on_signals(queue: Queue) -> Iterator[None]:
    """SIGINT and SIGTERM stop new starts while the queue runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        del frame
        queue.stop(f"stopped by {signal.Signals(signum).name}")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _summary(result: QueueResult) -> str:
    counts = {r: len(result.of(r)) for r in ("done", "failed", "skipped", "not-started")}
    text = ", ".join(f"{n} {r}" for r, n in counts.items() if n) or "nothing ran"
    return f"{text}; {result.stopped}" if result.stopped else text


def run_apply(args: argparse.Namespace, out: TextIO) -> int:
    config, steps, flavour, snapshot_of, cluster = load_steps(args)
    if args.max_parallel is not None or args.max_parallel_per_node is not None:
        config = _with_limits(config, args.max_parallel, args.max_parallel_per_node)
    console = Console(file=sys.stderr, highlight=False)
    if not steps:
        console.print("nothing to apply: the plan has no migrations", markup=False)
        return EXIT_OK
    console.print(plan_table(steps, config))
    if args.dry_run:
        out.write(dry_run_text(steps))
        return EXIT_OK
    backend = make_backend(flavour, config)
    audit_path = args.audit_log or config.apply.audit_log
    if audit_path:  # a log that cannot be written stops the run before anything moves
        append_output(audit_path, b"")
    if not args.yes:
        _confirm(len(steps))
    metrics = ApplyMetrics()
    view = progress_view(console, config, steps, live=sys.stderr.isatty())
    queue = Queue(
        steps,
        backend,
        config.apply,
        check=live_check(snapshot_of, config),
        audit=AuditLog(audit_path),
        metrics=metrics,
        cluster=cluster,
        continue_on_error=args.continue_on_error,
        report=view,
    )
    with stopping_on_signals(queue), view:
        result = queue.run()
    if args.metrics_file:
        write_output(args.metrics_file, metrics.text())
    if result.ok:
        console.print(_summary(result), markup=False)
    else:
        print(f"vmbalance: apply: {display(_summary(result))}", file=sys.stderr)
    return EXIT_OK if result.ok else EXIT_FAILED


def _with_limits(config: Config, total: int | None, per_node: int | None) -> Config:
    from pydantic import ValidationError

    values = config.apply.model_dump()
    if total is not None:
        values["max_parallel"] = total
    if per_node is not None:
        values["max_parallel_per_node"] = per_node
    try:
        return config.model_copy(update={"apply": type(config.apply).model_validate(values)})
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"])
        raise CommandError(f"--max-parallel: apply.{field}: {error['msg']}") from None
