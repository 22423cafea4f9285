"""Privilege-separated and multi-queue workers: processes that move a device's packets.

- :func:`drop_privileges` makes the calling process a user with no privilege
  at all (no capabilities, no groups, ``no_new_privs``), keeping the
  descriptors it holds: the first thing a worker does that a root parent
  started and will hand a device to (:func:`tunkit.send_tun`).
- :class:`QueueWorkers` runs one process per queue of two multi-queue
  devices, each joining its two queues with :func:`tunkit.copy`: the way to
  use more than one core, which threads in one Python process cannot.

Linux only; importing this module loads the Linux device (pyroute2).
"""

from __future__ import annotations

from ._linux.privileges import capabilities, drop_privileges
from ._linux.queues import QueueReport, QueueWorkers, Worker, cpu_seconds

__all__ = ["QueueReport", "QueueWorkers", "Worker", "capabilities", "cpu_seconds",
           "drop_privileges"]
