"""host_tools.fleet.signature_workers: a backlog's signatures checked in worker processes,
with the same answers as this process, a broken pool falling back, and no worker outliving
a killed collector."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
from report_stream import ReportingDevice

from edge_sdk.errors import ConfigError
from edge_sdk.protocol import SignedReport, decode, signature_input
from edge_sdk.trust import SignatureCheck, check_device_signatures
from host_tools.fleet.signature_workers import SignaturePool

NOW = 1_700_000_000.0


def _checks(n: int) -> list[SignatureCheck]:
    devices = [ReportingDevice(f"pool-{i}") for i in range(3)]
    checks = []
    for i in range(n):
        d = devices[i % 3]
        signed = decode(d.report(NOW + i))
        assert isinstance(signed, SignedReport)
        got = signature_input(signed)
        assert got is not None
        sig, data = got
        raw = d.key.public_key.raw if i % 7 else devices[(i + 1) % 3].key.public_key.raw  # some by the wrong key
        checks.append((raw, sig, data if i % 5 else data + b" "))  # some over changed bytes
    return checks


def test_a_signature_pool_answers_as_this_process_would_and_survives_a_broken_pool() -> None:
    checks = _checks(40)
    expected = check_device_signatures(checks)
    assert expected.count(False) >= 10 and expected.count(True) >= 10
    pool = SignaturePool(1)  # a real spawned worker process
    try:
        assert pool(checks) == expected
        assert pool(checks[:1]) == expected[:1]  # too few to share: checked here
    finally:
        pool.close()

    def broken(workers: int) -> Executor:
        raise OSError("cannot start a process")

    assert SignaturePool(2, broken)(checks) == expected  # checked here instead, nothing skipped
    with pytest.raises(ConfigError):
        SignaturePool(0)


def test_submitted_checks_come_back_in_order_from_the_workers_or_from_here_when_they_break() -> None:
    checks = _checks(30)
    expected = check_device_signatures(checks)
    pool = SignaturePool(2)  # real spawned worker processes: the batch is split between them
    try:
        answers = pool.submit(checks)
        assert answers() == expected
        assert pool.submit([])() == []
    finally:
        pool.close()

    class DiesMidBatch(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
            return super().submit(_worker_killed)

    assert SignaturePool(2, DiesMidBatch)(checks) == expected
    assert SignaturePool(2, DiesMidBatch).submit(checks)() == expected

    def broken(workers: int) -> Executor:
        raise OSError("cannot start a process")

    assert SignaturePool(1, broken).submit(checks)() == expected


def _worker_killed() -> list[bool]:
    raise BrokenProcessPool("a worker died")


def test_workers_exit_when_their_collector_is_killed(tmp_path: Path) -> None:
    """SIGKILL leaves no worker behind (one would hold the collector's stdout open for good)."""
    script = tmp_path / "collector_like.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, time
            sys.path.insert(0, sys.argv[1])
            from test_signature_workers import _checks
            from host_tools.fleet.signature_workers import SignaturePool

            if __name__ == "__main__":
                pool = SignaturePool(2)
                pool(_checks(30))
                print(" ".join(str(p) for p in pool._executor._processes), flush=True)
                time.sleep(60)
            """
        )
    )
    here = str(Path(__file__).parent)
    repo, tests = Path(__file__).parents[4], Path(__file__).parents[3]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(tests), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), here], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert len(workers) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.05)
    assert not any(_alive(p) for p in workers)
    with proc.stdout:
        assert proc.stdout.read() == ""  # every end of the pipe closed: nothing holds it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1].split()[0] not in ("Z", "X")  # a zombie is gone
