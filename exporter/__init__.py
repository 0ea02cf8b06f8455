"""vmbalance-exporter: per-VM block I/O, CPU time and memory of a KVM node for Prometheus.

The modules in the order a scrape passes through them:

- `cli`: picks a backend, registers the collector, serves until SIGTERM.
- `samples`: the plain samples every backend yields (no metric names).
- Proxmox VE: `qmp` (the scrape), `qmp_session` (one read-only QMP session per VM),
  `qmp_replies` (replies as samples), `pve_conf` (the `.conf` files), `pve_cluster` (storages,
  HA resources, the cluster's name; what decides whether a VM can move), `hostfiles` and
  `hostio` (/proc and sysfs, each read bounded by the deadline).
- libvirt: `libvirt` (the scrape), `libvirt_connection` (the connection, bounded calls),
  `libvirt_events` (domain events on a thread of their own, voiding cached XML),
  `libvirt_dirtyrate` (the dirty-rate group, asked only where a measurement is likely),
  `libvirt_workers` (per-domain reads on threads), `libvirt_domain` (one domain as a
  sample, its XML cached), `libvirt_stats` (libvirt's stat records and domain XML as samples).
- `labels`, `collector`, `scrapelog`: samples as metric families and text, the only place
  that knows metric names; what changed between scrapes, logged once.
- `httpserver`, `web`, `webconfig`, `tlsconfig`, `basicauth`: `/metrics` over HTTP(S).
"""

__version__ = "0.1.0"
