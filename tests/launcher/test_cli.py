"""The `mso` command line on its own: a service facing an unreachable Redis exits with a clear error after a
bounded wait instead of hanging."""

import subprocess
import sys
import time

import pytest

from services.shared.ports import free_port


@pytest.mark.parametrize("service", ["rollout", "trainer", "launcher"])
def test_serve_without_redis_exits_with_a_clear_error(service):
    url = f"redis://127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "services.cli", service, "serve", "--port=0",
                          f"--redis-url={url}", "--redis-timeout=2"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"Redis at {url} is not reachable after 2s" in out.stderr
    assert time.monotonic() - started < 30


def test_mso_bench_runs_every_measure_and_writes_the_table(tmp_path):
    """The benchmarks still run end to end (their numbers are read by people, never asserted)."""
    import json

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "services.cli", "bench", "--quick", f"--json={out}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["measure"].split()[0] for r in rows} == {"1", "2", "3", "4", "5", "6", "6b", "6c", "6d", "7", "8"}
    assert [s["why"] for s in json.loads(out.read_text())["skipped"]] == ["--quick"]  # 4b/3b, said so
    assert all(r["ratio"] > 0 for r in rows if r["ratio"] is not None)


def test_benchmarks_without_minestudio_skip_the_vpt_rows_and_say_why(monkeypatch):
    """`pip install -e '.[dev]'` then `mso bench`: every measure that can run runs; the VPT rows say why not."""
    from benchmarks.__main__ import vpt

    monkeypatch.setitem(sys.modules, "minestudio", None)  # as on an install without the [minecraft] extra
    rows, skipped = vpt(quick=False)
    assert rows == [] and len(skipped) == 1
    assert "minestudio is not installed" in skipped[0][1] and "[minecraft]" in skipped[0][1]
