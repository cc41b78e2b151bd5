"""`edgectl demo` as a user meets it: run twice in one work directory, as real processes.

The demo trains, compresses, packs, deploys to a real agent and profiles it (several seconds
of CPU each time), so this module runs it twice and every test reads those two runs:
the first as `make demo > demo.log 2>&1` would (plain text, stdout and stderr in one file),
the second with ``--json`` in the same work directory, where it must reuse the first run's keys.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from harness import BIN

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class DemoRuns:
    user_home: Path
    work: Path
    log: str  # the first run: stdout and stderr in one file
    first_code: int
    second: subprocess.CompletedProcess[str]  # the second run, --json, same work directory
    leftovers: list[list[str]]  # processes still naming the work directory after the second run


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> DemoRuns:
    root = tmp_path_factory.mktemp("demo")
    user_home = root / "user"
    user_home.mkdir()
    work = root / "work"
    env = dict(os.environ, HOME=str(user_home))
    env.pop("EDGE_SDK_HOME", None)
    command = [str(BIN / "edgectl"), "demo", "--runs", "20", "--workdir", str(work)]
    # The timeouts only bound a hang; the demo's speed is not a test's business.
    log = root / "demo.log"
    with open(log, "w") as out:
        first = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=300, env=env)
    second = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=300, env=env)
    leftovers = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if any(str(work) in part for part in (p.info["cmdline"] or []))
    ]
    return DemoRuns(user_home, work, log.read_text(), first.returncode, second, leftovers)


def test_the_demo_log_is_whole_lines_and_ends_with_its_table_not_a_progress_bar(demo_runs):
    text = demo_runs.log
    assert demo_runs.first_code == 0, text[-2000:]
    assert "\r" not in text and "\x1b" not in text
    assert "%|" not in text  # no tqdm bar
    assert "(estimated)" in text and "p99 ms" in text
    lines = text.rstrip().splitlines()
    table = next(i for i, line in enumerate(lines) if "smaller than fp32" in line)
    assert not any("%" in line for line in lines[table:]), text[-1000:]  # the table, not a bar, ends the log
    assert lines[-1].startswith("whole path in"), lines[-1]


def test_the_demo_runs_the_whole_path_again_in_the_same_workdir(demo_runs):
    second = demo_runs.second
    assert second.returncode == 0, second.stderr
    rows = json.loads(second.stdout)["rows"]
    assert [r["precision"] for r in rows] == ["fp32", "int8"]
    fp32, int8 = rows
    assert fp32["size_bytes"] / int8["size_bytes"] > 3
    assert fp32["accuracy"] > 0.9 and fp32["accuracy"] - int8["accuracy"] < 0.02
    for r in rows:
        assert r["device"]["latency"]["p99_ms"] > 0
        assert r["device"]["power"]["estimated"] in (True, False)
    work = demo_runs.work
    assert f"keys and registry in {work / 'home'}" in second.stderr
    assert "root of trust v1 (existing" in second.stderr  # the keys of the first run, reused


def test_the_demo_keeps_to_its_workdir_and_leaves_no_process_behind(demo_runs):
    work = demo_runs.work
    assert demo_runs.second.returncode == 0, demo_runs.second.stderr
    assert not (demo_runs.user_home / ".edge-sdk").exists()
    assert (work / "home" / "keys" / "root.json").exists() and (work / "home" / "registry.db").exists()
    assert (work / "agent-data" / "state.json").exists()
    assert "every process the demo started has stopped" in demo_runs.second.stderr
    assert demo_runs.leftovers == []
