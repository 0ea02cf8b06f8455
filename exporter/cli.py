"""`vmbalance-exporter`: pick a backend, register the collector, serve until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from functools import partial
from pathlib import Path

from prometheus_client.registry import CollectorRegistry

from exporter import __version__
from exporter.collector import VMCollector
from exporter.hostio import HostReader, ReadTimeout
from exporter.httpserver import ServerLimits
from exporter.samples import Backend, BackendError
from exporter.web import MetricsApp, landing_page, serve
from exporter.webconfig import WebConfig, WebConfigError, load_web_config

DEFAULT_LISTEN = ":9641"
PVE_CONF_DIR = "/etc/pve/qemu-server"
PVE_RUN_DIR = "/var/run/qemu-server"
PVE_LOCAL_LINK = "/etc/pve/local"

log = logging.getLogger("vmbalance-exporter")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmbalance-exporter",
        description="Publish each VM's block I/O, CPU time and memory for Prometheus.",
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "libvirt", "qmp"),
        default="auto",
        help="auto: qmp when the Proxmox config dir exists, else libvirt (default: auto)",
    )
    parser.add_argument("--libvirt-uri", default="qemu:///system", help="libvirt connection URI")
    parser.add_argument(
        "--qmp-run-dir", default=PVE_RUN_DIR, help="directory of <vmid>.qmp and <vmid>.pid"
    )
    parser.add_argument(
        "--pve-conf-dir", default=PVE_CONF_DIR, help="directory of <vmid>.conf VM configs"
    )
    parser.add_argument(
        "--pve-dir",
        help="Proxmox cluster files: storage.cfg, ha/resources.cfg, corosync.conf "
        "(default: the parent of --pve-conf-dir)",
    )
    parser.add_argument(
        "--shared-path",
        action="append",
        default=[],
        metavar="PATH",
        help="libvirt: file disks under PATH are on storage every node reaches (repeatable)",
    )
    parser.add_argument(
        "--shared-pool",
        action="append",
        default=[],
        metavar="POOL",
        help="libvirt: volumes of storage pool POOL are shared between the nodes (repeatable)",
    )
    parser.add_argument(
        "--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT to serve on (default {DEFAULT_LISTEN})"
    )
    parser.add_argument(
        "--web-config", help="exporter-toolkit web config file (TLS, basic auth users)"
    )
    parser.add_argument(
        "--node-name", help="node label (default: Proxmox node name, else short hostname)"
    )
    parser.add_argument(
        "--cluster-name",
        help="cluster label (default: Proxmox's cluster_name in corosync.conf, else empty)",
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds one scrape may take (default 5)"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="VMs read at once (default 8)")
    parser.add_argument(
        "--max-connections",
        type=int,
        default=ServerLimits.max_connections,
        help=f"HTTP connections served at once (default {ServerLimits.max_connections})",
    )
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


# /etc/pve is pmxcfs, which hangs while the cluster has no quorum: what the start reads there
# is bounded, so the exporter starts (and says vmbalance_up 0) instead of hanging.
START_READ_TIMEOUT = 5.0
_start_reads = HostReader(threads=1, max_threads=2)


def default_node_name(pve_local: str = PVE_LOCAL_LINK) -> str:
    """Proxmox's /etc/pve/local points at nodes/<name>; elsewhere the short hostname."""
    try:
        target = _start_reads.call(
            "conf", pve_local, partial(os.readlink, pve_local), _start_deadline()
        )
    except ReadTimeout:
        log.warning("%s does not answer: node label from the hostname", pve_local)
        return socket.gethostname().split(".")[0]
    except OSError:
        return socket.gethostname().split(".")[0]
    return Path(target).name


def choose_backend(args: argparse.Namespace) -> str:
    if args.backend != "auto":
        return str(args.backend)
    path = args.pve_conf_dir
    try:
        is_dir = _start_reads.call("conf", path, partial(os.path.isdir, path), _start_deadline())
    except ReadTimeout:
        return "qmp"  # only a FUSE file system such as pmxcfs hangs a stat: this is Proxmox
    return "qmp" if is_dir else "libvirt"


def _start_deadline() -> float:
    return time.monotonic() + START_READ_TIMEOUT


def make_backend(kind: str, args: argparse.Namespace) -> Backend:
    if kind == "qmp":
        from exporter.qmp import QmpBackend

        return QmpBackend(
            run_dir=args.qmp_run_dir,
            conf_dir=args.pve_conf_dir,
            concurrency=args.concurrency,
            pve_dir=args.pve_dir,
        )
    from exporter.libvirt import LibvirtBackend
    from exporter.libvirt_stats import SharedStorage

    shared = SharedStorage.of(tuple(args.shared_path), tuple(args.shared_pool))
    return LibvirtBackend(uri=args.libvirt_uri, concurrency=args.concurrency, shared=shared)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.log_level != "debug":
        # qemu.qmp logs every hung or refused socket as an ERROR; the collector counts those.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    if args.timeout <= 0 or args.concurrency < 1 or args.max_connections < 1:
        return fail("--timeout must be > 0, --concurrency and --max-connections >= 1")
    relative = [path for path in args.shared_path if not os.path.isabs(path)]
    if relative:
        return fail(f"--shared-path must be an absolute path, not {relative[0]!r}")
    try:
        web = load_web_config(args.web_config) if args.web_config else WebConfig()
        kind = choose_backend(args)
        backend = make_backend(kind, args)
    except (WebConfigError, BackendError) as exc:
        return fail(str(exc))

    node = args.node_name or default_node_name()
    registry = CollectorRegistry(auto_describe=True)
    collector = VMCollector(backend, node=node, timeout=args.timeout, cluster=args.cluster_name)
    registry.register(collector)
    details = {"node": node, "backend": kind, "version": __version__}
    if args.cluster_name is not None:
        details["cluster"] = args.cluster_name
    details["source"] = args.libvirt_uri if kind == "libvirt" else args.qmp_run_dir
    landing = landing_page("vmbalance-exporter", details)
    app = MetricsApp(registry, landing, web, collector.exposition)
    try:
        server = serve(args.listen, app, web, ServerLimits(max_connections=args.max_connections))
    except WebConfigError as exc:
        app.close()
        backend.close()
        return fail(str(exc))

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    scheme = "https" if web.tls else "http"
    log.info("serving %s://%s/metrics for node %s (%s backend)", scheme, args.listen, node, kind)
    stop.wait()
    server.stop()
    app.close()
    backend.close()
    return 0


def fail(message: str) -> int:
    print(f"vmbalance-exporter: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
