"""Executing a plan: the rolling queue, the live checks before each migration, the backends
that migrate (Proxmox VE's API, libvirt), the audit log and the metrics.

Beside `recommender.outputs`: it reads the plan (or its JSON document) and the live state from
the source, and the engine never imports it.
"""
