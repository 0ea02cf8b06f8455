"""vmbalance-exporter: per-VM block I/O, CPU time and memory of a KVM node for Prometheus."""

__version__ = "0.1.0"
