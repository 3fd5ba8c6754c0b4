"""Distributed expand on Ray: one Ray task per tensor group.

The driver (``Store.expand(runner=RayRunner(...))``, or ``mmer expand --ray``)
holds the store's writer lock, plans the expansion from the registry
(:func:`mmer_cl.store.expansion_plan.plan_expansion`: plain picklable data naming
every blob a group reads) and submits one task per tensor group. Each task
opens the shared blob location itself (a directory every node mounts, or
``s3://bucket/prefix``), reads its task vectors and previous results from it,
merges and masks, writes its blobs there and returns their references and
statistics. Only when every group has succeeded does the driver commit the
version in one registry transaction
(:func:`mmer_cl.store.expansion_plan.commit_expansion`).

A failed or killed worker: Ray retries the task (``retries`` times; a group
is idempotent, blobs being content-addressed), after which the expand fails
with nothing committed. Blobs that finished groups already wrote stay
unreferenced until ``mmer gc`` removes them.

The math is the same code on the same inputs, on CPU, tensor by tensor, so
the result is bit-identical to a local expand.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from mmer_cl.errors import MmerError
from storage import BlobStore

Progress = Callable[[int, int, str], None]


class DistributedError(MmerError):
    """A distributed expand could not run or did not finish (a worker crashed, the cluster is unreachable);
    nothing was committed. A runtime failure: exit 1."""

    exit_code = 1


class RayMissingError(DistributedError):
    """Ray is not installed: fix the installation (exit 2, like other bad input)."""

    exit_code = 2


SHUTDOWN_SIGNALS = ("SIGTERM", "SIGHUP")


def _shutdown_then_die(signum, _frame) -> None:
    """On SIGTERM / SIGHUP: stop the local Ray cluster this driver started (raylet, GCS, workers), then die of
    the same signal, so a killed `mmer expand --ray` leaves no Ray process behind."""
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - dying anyway; the signal below ends the process
        pass
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def install_shutdown_handlers() -> None:
    """Make SIGTERM and SIGHUP stop Ray first (Ctrl-C already does: it ends the command normally). Only where
    nothing else handles them, and only from the main thread (where Python runs signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in SHUTDOWN_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, _shutdown_then_die)


@dataclass(frozen=True)
class GroupTraffic:
    """What one group task moved through the blob store, and where it ran."""

    group: int
    tensors: int
    read_bytes: int
    written_bytes: int
    blobs_read: int
    blobs_written: int
    seconds: float
    host: str
    pid: int


class CountingBlobStore(BlobStore):
    """A :class:`BlobStore` over another's backend that counts the bytes read and written."""

    def __init__(self, inner: BlobStore):
        super().__init__(backend=inner.backend)
        self.read_bytes = self.written_bytes = self.blobs_read = self.blobs_written = 0
        self._counting = threading.Lock()  # an expansion reads on several decoder threads

    def get(self, digest: str) -> bytes:
        data = super().get(digest)
        with self._counting:
            self.read_bytes += len(data)
            self.blobs_read += 1
        return data

    def _put(self, data: bytes) -> tuple[str, bool]:
        digest, new = super()._put(data)
        if new:
            with self._counting:
                self.written_bytes += len(data)
                self.blobs_written += 1
        return digest, new


def default_group_fn(reader, put, plan, group, device):
    from mmer_cl.store.expansion_plan import expand_group

    return expand_group(reader, put, plan, group, device)


def run_group(location: str, plan, index: int, group: Sequence, group_fn=None, device: str = "cpu"):
    """The body of one Ray task: expand ``group`` against the blob store at ``location``.

    Returns ``(index, GroupResult, GroupTraffic)``. Runs anywhere the blob location is reachable.
    """
    import torch

    from storage.reader import TensorReader

    torch.set_num_threads(1)
    # decode with as many threads as the task has CPUs (Ray puts that number in OMP_NUM_THREADS)
    os.environ["MMER_DECODERS"] = os.environ.get("OMP_NUM_THREADS") or "1"
    start = time.perf_counter()
    blobs = CountingBlobStore(BlobStore.open(location))
    reader = TensorReader(blobs)
    result = (group_fn or default_group_fn)(reader, blobs.put, plan, group, device)
    traffic = GroupTraffic(index, len(group), blobs.read_bytes, blobs.written_bytes, blobs.blobs_read,
                           blobs.blobs_written, time.perf_counter() - start, socket.gethostname(), os.getpid())
    return index, result, traffic


def _last_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1].rstrip(".") if lines else "no message"


def _group_label(group: Sequence) -> str:
    keys = [getattr(job, "key", str(job)) for job in group]
    return keys[0] if len(keys) == 1 else f"{keys[0]} .. {keys[-1]} ({len(keys)} tensors)"


class RayRunner:
    """Runs an expansion plan's tensor groups as Ray tasks (see the module docstring).

    ``address``: a Ray cluster address (``ray://host:10001``, ``host:6379``, ``auto``); None connects
    to the cluster named by ``RAY_ADDRESS`` or a local one, or starts a local cluster. ``retries``: how
    often Ray reruns a group whose worker died. ``group_fn`` replaces the per-group computation
    (tests inject failures with it); it must be picklable.
    """

    def __init__(self, address: str | None = None, *, retries: int = 2, num_cpus_per_task: float = 1,
                 group_fn=None, init_kwargs: dict | None = None):
        self.address = address
        self.retries = retries
        self.num_cpus_per_task = num_cpus_per_task
        self.group_fn = group_fn
        self.init_kwargs = init_kwargs or {}
        self.traffic: list[GroupTraffic] = []

    def _ray(self):
        try:
            import ray
        except ImportError:
            raise RayMissingError("Ray is not installed; pip install -e '.[ray]' in a clone of mmer-cl (on the driver and on "
                                  "every node of the cluster)") from None
        if not ray.is_initialized():
            install_shutdown_handlers()  # before ray.init: a kill while the cluster starts stops it too
            try:
                ray.init(address=self.address, log_to_driver=False, **self.init_kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise DistributedError(f"cannot connect to the Ray cluster at {self.address or 'default'}: "
                                       f"{exc}; start one (`ray start --head`) or pass its address to "
                                       "--ray") from None
        return ray

    def __call__(self, blobs: BlobStore, plan, groups: Sequence[Sequence] | None = None,
                 progress: Progress | None = None) -> list:
        """Expand every group of ``plan`` on the cluster; the group results in plan order.

        Raises :class:`DistributedError` (after cancelling the rest) as soon as one group fails for good.
        """
        ray = self._ray()
        groups = list(plan.groups if groups is None else groups)
        task = ray.remote(run_group).options(num_cpus=self.num_cpus_per_task, max_retries=self.retries,
                                             retry_exceptions=False)
        plan_ref = ray.put(plan)
        fn_ref = ray.put(self.group_fn) if self.group_fn is not None else None
        pending = {task.remote(blobs.location, plan_ref, i, g, fn_ref): i for i, g in enumerate(groups)}
        results: list = [None] * len(groups)
        self.traffic = []
        done_count = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            index = pending.pop(ref)
            try:
                _, result, traffic = ray.get(ref)
            except Exception as exc:  # RayTaskError, WorkerCrashedError, TaskCancelledError, ...
                for other in pending:
                    ray.cancel(other, force=True)
                raise DistributedError(
                    f"tensor group {index + 1}/{len(groups)} ({_group_label(groups[index])}) failed on the "
                    f"Ray cluster: {type(exc).__name__}: {_last_line(exc)}. "
                    "Nothing was committed; blobs the finished groups wrote are unreferenced and `mmer gc` "
                    "removes them. Fix the cause and run expand again.") from None
            results[index] = result
            self.traffic.append(traffic)
            done_count += 1
            if progress:
                progress(done_count, len(groups), f"group {index + 1}: {_group_label(groups[index])}")
        return results

    def summary(self) -> dict:
        """Bytes and time of the last run, summed over groups."""
        t = self.traffic
        return {"groups": len(t), "read_bytes": sum(x.read_bytes for x in t),
                "written_bytes": sum(x.written_bytes for x in t), "blobs_read": sum(x.blobs_read for x in t),
                "blobs_written": sum(x.blobs_written for x in t),
                "task_seconds": round(sum(x.seconds for x in t), 3),
                "workers": sorted({f"{x.host}:{x.pid}" for x in t})}
