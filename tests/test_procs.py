"""labhelpers.procs: the /proc process table."""

from __future__ import annotations

import os
import subprocess
import sys

from labhelpers.procs import proc_stats


def test_this_process_and_a_child_are_listed_with_their_parents():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        rows = {p.pid: p for p in proc_stats()}
        me = rows[os.getpid()]
        assert (me.ppid, me.pgrp) == (os.getppid(), os.getpgrp())
        assert me.state in {"R", "S"}
        assert rows[child.pid].ppid == os.getpid()
    finally:
        child.kill()
        child.wait()
