"""The real hypervisor lab: QEMU guests doing disk I/O on a private libvirtd and Proxmox-like
nodes, watched by the exporters, Prometheus and the recommender (`python -m lab.run`)."""
