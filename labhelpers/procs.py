"""The process table read from /proc, for when psutil is not installed.

Used by labhelpers.bench (RSS of a server's process tree, notebooks 05 and 06) and
labhelpers.serve (which processes a server left in its process group, notebook 05).
"""

from __future__ import annotations

import os
from typing import NamedTuple


class ProcStat(NamedTuple):
    """The fields of ``/proc/<pid>/stat`` the course needs."""

    pid: int
    state: str  # "R", "S", ... "Z" for a zombie
    ppid: int
    pgrp: int


def proc_stats() -> list[ProcStat]:
    """Every process visible in /proc (processes that exit while reading are skipped)."""
    rows = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: the fields follow it.
        fields = stat[stat.rfind(")") + 2 :].split()
        rows.append(ProcStat(int(entry), fields[0], int(fields[1]), int(fields[2])))
    return rows
