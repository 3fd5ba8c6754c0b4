"""`mmer expand --ray` as a process: a crashed worker is a runtime failure (exit 1, not 2), and a driver
killed with SIGTERM stops the local Ray cluster it started (issue 20, item 9)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mmer_cl.store import Store
from scale.servers import REPO, wait_until

pytestmark = [pytest.mark.scale, pytest.mark.slow]
DRIVER = Path(__file__).with_name("ray_driver.py")


@pytest.fixture
def registered(family, tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]' in a clone of mmer-cl)")
    with Store.init(tmp_path / "store", family / "base") as store:
        store.register(family / "vision", "vision", "vision")
    return tmp_path / "store"


def ray_processes(temp_dir: Path) -> list[int]:
    """Processes whose command line names ``temp_dir`` (raylet, GCS, workers of that cluster)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(temp_dir) in cmdline and "pytest" not in cmdline:
            found.append(int(proc.name))
    return found


def driver(mode: str, store: Path, temp_dir: Path, flag: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MMER_ACTOR": "t"}
    return subprocess.Popen([sys.executable, str(DRIVER), mode, str(store), str(temp_dir), str(flag)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_a_crashed_worker_exits_with_the_runtime_failure_code(registered, tmp_path):
    temp_dir = Path("/tmp") / f"mr{os.getpid()}c"  # Ray's socket paths must stay short
    proc = driver("crash", registered, temp_dir, tmp_path / "flag")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    assert "Traceback" not in out and "failed on the Ray cluster" in out and "Nothing was committed" in out, out
    assert wait_until(lambda: not ray_processes(temp_dir), timeout=30), ray_processes(temp_dir)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killing_the_driver_stops_its_local_ray_cluster(registered, tmp_path, sig):
    temp_dir = Path("/tmp") / f"mr{os.getpid()}k{int(sig)}"
    flag = tmp_path / "flag"
    proc = driver("slow", registered, temp_dir, flag)
    try:
        assert wait_until(flag.exists, timeout=240), proc.stdout.read() if proc.poll() is not None else "no task"
        worker = int(flag.read_text())  # the busy worker, whose command line Ray renamed "ray::run_group"
        assert ray_processes(temp_dir) and Path(f"/proc/{worker}").exists()
        os.kill(proc.pid, sig)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode != 0 and "Traceback" not in out, (proc.returncode, out)
        assert wait_until(lambda: not ray_processes(temp_dir) and not Path(f"/proc/{worker}").exists(),
                          timeout=60), ray_processes(temp_dir)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in ray_processes(temp_dir):  # never leave a test's cluster behind, whatever failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    with Store.open(registered) as store:
        assert store.versions() == []
