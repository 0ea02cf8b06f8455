"""What changed between scrapes, logged once per change rather than once per scrape.

A VM that starts being skipped is a WARNING with its id and the reason, again only when the
reason changes; a VM read again after that is INFO. The backend going down (with its error)
is a WARNING, coming back INFO. So `journalctl -u vmbalance-exporter | grep skipped` finds
each VM that the `VMBalanceVMScrapeErrors` alert counts, without one line per 15 s scrape.
"""

from __future__ import annotations

import logging

from exporter.samples import ScrapeResult


class ScrapeLog:
    """Remembers the last scrape's state and logs the differences."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._skipped: dict[str, str] = {}
        self._down: str | None = None
        self._seen_up = False

    def record(self, result: ScrapeResult) -> None:
        if not result.up:
            error = result.error or "unknown error"
            if error != self._down:
                self._log.warning("backend down: %s; serving vmbalance_up 0", error)
            self._down = error
            return
        if self._down is not None:
            self._log.info("backend answers again")
        elif not self._seen_up:
            self._log.info("backend answers: %d VMs", len(result.vms))
        self._down, self._seen_up = None, True
        published = {vm.vm for vm in result.vms}
        for vm, reason in sorted(result.skipped.items()):
            if self._skipped.get(vm) != reason:
                self._log.warning("VM %s skipped: %s", vm, reason)
        for vm in sorted(self._skipped.keys() - result.skipped.keys()):
            if vm in published:
                self._log.info("VM %s read again", vm)
        self._skipped = dict(result.skipped)
