"""labhelpers.progress: noisy output to a log file, a heartbeat on the terminal."""

from __future__ import annotations

import os
import time

import pytest

from labhelpers import progress


def test_output_goes_to_the_log_and_a_heartbeat_to_the_terminal(tmp_path, capfd):
    log = tmp_path / "build.log"
    with progress.output_to_file(log, what="quantizing", every_s=0.05, status=lambda: "; x"):
        os.write(1, b"table from C code\n")
        print("python noise", flush=True)
        os.write(2, b"stderr noise\n")
        time.sleep(0.3)
    print("after", flush=True)
    out = capfd.readouterr().out
    assert "noise" not in out and "table" not in out
    assert "… still quantizing (" in out and "s; x)" in out
    assert out.rstrip().endswith("after")
    text = log.read_text()
    assert "table from C code" in text and "python noise" in text and "stderr noise" in text


def test_output_is_restored_after_an_error(tmp_path, capfd):
    with pytest.raises(RuntimeError):
        with progress.output_to_file(tmp_path / "x.log", what="working"):
            raise RuntimeError("boom")
    print("visible again", flush=True)
    assert "visible again" in capfd.readouterr().out


def test_last_gptq_layer_reads_the_newest_log(tmp_path):
    assert progress.last_gptq_layer(tmp_path) is None
    old = tmp_path / "gptq_log_a.log"
    old.write_text('{"layer": 29}')
    os.utime(old, (1, 1))
    (tmp_path / "gptq_log_b.log").write_text('{\n "layer": 0\n}\n{\n "layer": 4\n}')
    assert progress.last_gptq_layer(tmp_path) == 4
