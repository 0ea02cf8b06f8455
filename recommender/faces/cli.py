"""`vmbalance`: snapshot, plan, apply, config check, serve, report.

Every failure an operator can cause (unreachable Prometheus, a bad config or snapshot file, no
data) ends as one line on stderr and exit status 2; a plan, empty or not, is exit 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeAlias

from pydantic import ValidationError

from recommender import __version__
from recommender.config import Config, ConfigError, load_config, validation_problems
from recommender.engine.rules.maintenance import MaintenanceSettings
from recommender.errors import CommandError
from recommender.faces.errors import known_error
from recommender.faces.stdout import document_stdout
from recommender.output_file import write_output
from recommender.outputs.formats import FORMATS
from recommender.quoting import display

if TYPE_CHECKING:  # the data frames load with the commands that need them
    from recommender.model import Snapshot

EXIT_OK = 0
EXIT_ERROR = 2

# What `add_subparsers` returns.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Prometheus (any server with the PromQL HTTP API)")
    group.add_argument(
        "--prometheus-url",
        metavar="URL",
        help="base URL of the API (default http://localhost:9090)",
    )
    group.add_argument("--bearer-token-file", metavar="FILE", help="file holding a bearer token")
    group.add_argument("--username", help="basic auth user")
    group.add_argument(
        "--password-file", metavar="FILE", help="file holding the basic auth password"
    )
    group.add_argument(
        "--ca-file", metavar="FILE", help="CA bundle to verify the server's certificate"
    )
    group.add_argument(
        "--insecure-skip-verify",
        action="store_true",
        default=None,
        help="do not verify the server's TLS certificate",
    )
    group.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="deadline of each query: connect, headers and body (default 30)",
    )
    window = parser.add_argument_group("load estimate")
    window.add_argument("--window", help="history window, e.g. 1h (default 1h)")
    window.add_argument(
        "--estimator", choices=("mean", "quantile"), help="mean rate, or a high quantile"
    )
    window.add_argument("--quantile", type=float, help="quantile for --estimator quantile")
    window.add_argument(
        "--at", metavar="TIME", help="evaluate at this ISO-8601 time instead of now"
    )


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--config", metavar="FILE", help="YAML config (every setting has a default)"
    )


def _add_cluster_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cluster", metavar="NAME",
        help="only this cluster (the nodes' cluster label); needed when the data holds several",
    )  # fmt: skip


def _add_plan_command(commands: Subcommands) -> None:
    """`vmbalance plan`."""
    plan = commands.add_parser(
        "plan",
        help="compute and print a migration plan",
        description="Read the cluster (from Prometheus, or a snapshot file with --input), find "
        "the fewest migrations that bring the imbalance under the target within the rules, "
        "and print the plan: a table, JSON, Markdown, or a bash script of qm / virsh commands.",
    )
    _add_config_option(plan)
    _add_source_options(plan)
    plan.add_argument(
        "-i", "--input", metavar="FILE",
        help="plan from a snapshot file instead of Prometheus ('-' = stdin)",
    )  # fmt: skip
    plan.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        default="table",
        help="output format (default: table)",
    )
    plan.add_argument(
        "--commands",
        choices=("auto", "proxmox", "libvirt"),
        help="which migration commands (default auto: qm when every VM id is a VMID)",
    )
    _add_cluster_option(plan)
    plan.add_argument("--max-migrations", type=int, metavar="N", help="at most N migrations")
    plan.add_argument("--maintenance", action="append", default=[], metavar="NODE",
                      help="evacuate NODE (repeatable)")  # fmt: skip
    plan.add_argument(
        "--out-file", metavar="FILE",
        help="write the output to FILE instead of stdout (replaced atomically)",
    )  # fmt: skip


def _add_apply_command(commands: Subcommands) -> None:
    """`vmbalance apply`."""
    apply = commands.add_parser(
        "apply",
        help="execute a plan: live migrations in a rolling queue",
        description="Execute a saved plan (--plan FILE) or a fresh one: each migration starts "
        "when the ones it waits for are done and its nodes have a free slot, after a check of "
        "the live state. Exit 0 when every migration not skipped succeeded, 1 when one failed "
        "or the run was stopped, 2 for bad input (docs/automation.md).",
    )
    _add_config_option(apply)
    _add_source_options(apply)
    apply.add_argument("--plan", metavar="FILE", help="a plan document (plan -o json)")
    apply.add_argument(
        "-i",
        "--input",
        metavar="FILE",
        help="plan from, and check the live state against, this snapshot file",
    )
    _add_cluster_option(apply)
    apply.add_argument(
        "--commands",
        choices=("auto", "proxmox", "libvirt"),
        help="backend of a fresh plan (default auto, as for plan)",
    )
    apply.add_argument("--max-migrations", type=int, metavar="N", help="at most N migrations")
    apply.add_argument(
        "--maintenance",
        action="append",
        default=[],
        metavar="NODE",
        help="evacuate NODE (repeatable)",
    )
    apply.add_argument("-y", "--yes", action="store_true", help="do not ask before starting")
    apply.add_argument("--dry-run", action="store_true", help="print the steps; migrate nothing")
    apply.add_argument(
        "--continue-on-error",
        action="store_true",
        help="after a failure, go on with migrations on other nodes",
    )
    apply.add_argument(
        "--max-parallel",
        type=int,
        metavar="N",
        help="migrations at once in the cluster (apply.max_parallel)",
    )
    apply.add_argument(
        "--max-parallel-per-node",
        type=int,
        metavar="N",
        help="migrations at once per node (apply.max_parallel_per_node)",
    )
    apply.add_argument("--audit-log", metavar="FILE", help="JSON Lines audit log, appended to")
    apply.add_argument(
        "--metrics-file",
        metavar="FILE",
        help="write the run's metrics here (node_exporter textfile)",
    )


def _add_snapshot_command(commands: Subcommands) -> None:
    """`vmbalance snapshot`."""
    snapshot = commands.add_parser(
        "snapshot",
        help="save the cluster snapshot to a file",
        description="Read the cluster from Prometheus and save it as a snapshot file "
        "(docs/snapshot.md), to plan from later with `plan --input`.",
    )
    _add_config_option(snapshot)
    _add_source_options(snapshot)
    snapshot.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="file to write ('-' = stdout)"
    )
    _add_cluster_option(snapshot)


def _add_config_command(commands: Subcommands) -> None:
    """`vmbalance config check|defaults`."""
    config = commands.add_parser(
        "config",
        help="configuration helpers",
        description="Check a config file, or print every setting with its default.",
    )
    config_commands = config.add_subparsers(
        dest="config_command", required=True, metavar="SUBCOMMAND"
    )
    check = config_commands.add_parser(
        "check",
        help="validate a config file",
        description="Validate a config file: every problem on one line, as FILE:LINE: field.",
    )
    check.add_argument("file", metavar="FILE", help="the YAML config to check")
    config_commands.add_parser(
        "defaults",
        help="print the default configuration as YAML",
        description="Print every setting with its default value, as YAML.",
    )


def _add_serve_command(commands: Subcommands) -> None:
    """`vmbalance serve`."""
    serve = commands.add_parser(
        "serve",
        help="re-plan periodically; serve metrics and the plan",
        description="Re-plan every interval and serve the result: /metrics for Prometheus and "
        "/plan (the latest JSON plan). A failed run is counted and retried at the next one.",
    )
    _add_config_option(serve)
    _add_source_options(serve)
    serve.add_argument(
        "--listen", metavar="ADDRESS",
        help="HOST:PORT, :PORT or [IPV6]:PORT (default from config: 127.0.0.1:9643)",
    )  # fmt: skip
    serve.add_argument("--interval", type=float, metavar="SECONDS",
                       help="seconds between runs (default 300)")  # fmt: skip
    serve.add_argument("--once", action="store_true", help="run once, print metrics, exit")


def _add_report_command(commands: Subcommands) -> None:
    """`vmbalance report`."""
    report = commands.add_parser(
        "report",
        help="write the weekly Markdown report with charts",
        description="Read a period of history from Prometheus and write report.md with its "
        "PNG charts (docs/report.md).",
    )
    _add_config_option(report)
    _add_source_options(report)
    report.add_argument("--period", default="7d", help="period to report on (default 7d)")
    _add_cluster_option(report)
    report.add_argument(
        "--out", required=True, metavar="DIR", help="directory for report.md and the charts"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmbalance",
        description="Plan the few live migrations that even out VM load across KVM nodes.",
        epilog="Exit status: 0 with a plan (empty or not); 2 with a one-line reason on stderr.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_plan_command,
        _add_apply_command,
        _add_snapshot_command,
        _add_config_command,
        _add_serve_command,
        _add_report_command,
    ):
        add(commands)
    return parser


# Each flag that sets one setting as it is given, and that setting (section, key).
_FLAG_SETTINGS: dict[str, tuple[str, str]] = {
    "prometheus_url": ("prometheus", "url"),
    "bearer_token_file": ("prometheus", "bearer_token_file"),
    "username": ("prometheus", "username"),
    "ca_file": ("prometheus", "ca_file"),
    "insecure_skip_verify": ("prometheus", "insecure_skip_verify"),
    "timeout": ("prometheus", "timeout_seconds"),
    "window": ("query", "window"),
    "estimator": ("query", "estimator"),
    "quantile": ("query", "quantile"),
    "max_migrations": ("balance", "max_migrations"),
    "commands": ("output", "commands"),
    "listen": ("serve", "listen"),
    "interval": ("serve", "interval_seconds"),
}


def effective_config(args: argparse.Namespace, base: Config | None = None) -> Config:
    """The config file (else `base`, else defaults) with the command-line flags on top."""
    config = load_config(args.config) if getattr(args, "config", None) else base or Config()
    updates: dict[str, dict[str, Any]] = {}
    for flag, (section, key) in _FLAG_SETTINGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            updates.setdefault(section, {})[key] = value
    if getattr(args, "password_file", None):
        password = _read_secret("--password-file", args.password_file)
        updates.setdefault("prometheus", {})["password"] = password
    if getattr(args, "maintenance", None):
        configured = MaintenanceSettings.of(config.rules).maintenance
        updates.setdefault("rules", {})["maintenance"] = sorted({*configured, *args.maintenance})
    merged = config.model_dump()
    for section, values in updates.items():
        merged[section].update(values)
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:  # a bad flag value
        raise CommandError(_first_validation_error(exc)) from None


# The flag behind each setting a flag can change, to name it in an error.
_FLAGS = {
    "prometheus.url": "--prometheus-url",
    "prometheus.timeout_seconds": "--timeout",
    "prometheus.ca_file": "--ca-file",
    "query.window": "--window",
    "query.quantile": "--quantile",
    "query.estimator": "--estimator",
    "balance.max_migrations": "--max-migrations",
    "serve.listen": "--listen",
    "serve.interval_seconds": "--interval",
}


def _first_validation_error(exc: ValidationError) -> str:
    loc, message = validation_problems(exc)[0]
    where = ".".join(str(part) for part in loc[:2])
    flag = _FLAGS.get(where)
    return f"{flag} ({where}): {message}" if flag else f"invalid option: {where}: {message}"


def _read_secret(option: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise CommandError(f"{option} {path}: cannot read: {reason}") from None


def evaluation_time(args: argparse.Namespace) -> datetime | None:
    if not getattr(args, "at", None):
        return None
    try:
        at = datetime.fromisoformat(args.at)
    except ValueError:
        raise CommandError(f"--at {args.at!r}: not an ISO-8601 time") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def cmd_config(args: argparse.Namespace, out: TextIO) -> int:
    if args.config_command == "defaults":
        import yaml

        out.write(yaml.safe_dump(Config().model_dump(), sort_keys=False))
        return EXIT_OK
    try:
        load_config(args.file)
    except ConfigError as exc:
        for problem in getattr(exc, "problems", None) or [str(exc)]:
            print(f"vmbalance: {display(problem)}", file=sys.stderr)
        return EXIT_ERROR
    out.write(f"{display(args.file)}: ok\n")
    return EXIT_OK


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"warning: {display(warning)}", file=sys.stderr)


def cmd_snapshot(args: argparse.Namespace, out: TextIO) -> int:
    from recommender.snapshot import snapshot_text

    config = effective_config(args)
    snapshot = _prometheus_snapshot(config, evaluation_time(args), args.cluster)
    if args.cluster is not None:
        from recommender.preflight import select_cluster

        snapshot = select_cluster(snapshot, args.cluster)
    text = snapshot_text(snapshot, config)
    if args.output == "-":
        out.write(text)
    else:
        _write_file(args.output, text, out)
        print(
            f"wrote {display(args.output)}: {len(snapshot.nodes)} nodes, {len(snapshot.vms)} VMs",
            file=sys.stderr,
        )
    _warn(snapshot.warnings)
    return EXIT_OK


def _write_file(path: str, text: str, out: TextIO) -> None:
    """Through the one writer; `/dev/stdout` is the document stream, not fd 1 (see
    `recommender.stdout`)."""
    out.flush()
    write_output(path, text, fd_aliases={1: out.fileno()})


def _prometheus_snapshot(
    config: Config, at: datetime | None, cluster: str | None = None
) -> Snapshot:
    """The snapshot from Prometheus; with `cluster`, of that cluster's series only (and, when
    it has none, of all of them, so that the refusal names the clusters there are)."""
    from recommender.preflight import select_cluster
    from recommender.source.cluster import NoVMData
    from recommender.source.prometheus import PrometheusSource

    source = PrometheusSource(config.prometheus)
    if cluster is None:
        return source.build_snapshot(config, at=at)
    try:
        return source.build_snapshot(config, at=at, cluster=cluster)
    except NoVMData:
        return select_cluster(source.build_snapshot(config, at=at), cluster)


def load_plan_input(args: argparse.Namespace) -> tuple[Snapshot, Config]:
    """The snapshot to plan from and the config that applies to it.

    A snapshot file may carry the settings it was taken with; an explicit --config wins, and
    flags win over both."""
    at = evaluation_time(args)  # validated even when a file makes it moot
    if args.input:
        from recommender.snapshot import load_snapshot

        source = sys.stdin if args.input == "-" else args.input
        snapshot, embedded = load_snapshot(source)
        return snapshot, effective_config(args, base=embedded)
    config = effective_config(args)
    return _prometheus_snapshot(config, at, getattr(args, "cluster", None)), config


def cmd_plan(args: argparse.Namespace, out: TextIO) -> int:
    from recommender.outputs.formats import render
    from recommender.outputs.table import render_table
    from recommender.plan import build_plan
    from recommender.preflight import check_snapshot, select_cluster

    snapshot, config = load_plan_input(args)
    snapshot = select_cluster(snapshot, args.cluster)
    check_snapshot(snapshot)
    plan = build_plan(snapshot, config)
    if args.output == "table" and not args.out_file:
        from rich.console import Console

        render_table(plan, config, Console(file=out, highlight=False))
        return EXIT_OK
    text = render(plan, args.output, config)
    if args.out_file:
        _write_file(args.out_file, text, out)
    else:
        out.write(text)
    if args.output != "table":
        _warn(plan.warnings)
    return EXIT_OK


def cmd_apply(args: argparse.Namespace, out: TextIO) -> int:
    from recommender.faces.apply import run_apply

    return run_apply(args, out)


def cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    from recommender.faces.serve import serve

    return serve(effective_config(args), once=args.once, out=out, at=evaluation_time(args))


def cmd_report(args: argparse.Namespace, out: TextIO) -> int:
    from recommender.faces.report import write_report

    config = effective_config(args)
    path = write_report(config, period=args.period, out_dir=Path(args.out),
                        at=evaluation_time(args), cluster=args.cluster)  # fmt: skip
    out.write(f"wrote {display(path)}\n")
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace, TextIO], int]] = {
    "plan": cmd_plan,
    "apply": cmd_apply,
    "snapshot": cmd_snapshot,
    "config": cmd_config,
    "serve": cmd_serve,
    "report": cmd_report,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with document_stdout() as out:
        try:
            return COMMANDS[args.command](args, out)
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:
            return EXIT_OK
        except Exception as exc:
            message = known_error(exc)
            if message is None:
                raise
            print(f"vmbalance: {message}", file=sys.stderr)
            return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
