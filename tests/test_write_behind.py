"""Blobs written behind the caller: names at once, every write done when the block ends, errors surface."""

import threading
import time

import pytest

from mmer_cl.runtime.write_behind import write_behind
from storage.blobstore import sha256


def test_put_returns_the_blob_name_and_every_write_has_landed_when_the_block_ends():
    written = {}

    def slow_put(data: bytes) -> str:
        time.sleep(0.01)
        written[sha256(data)] = data
        return sha256(data)

    blobs = [bytes([i]) * 1000 for i in range(10)]
    with write_behind(slow_put) as put:
        names = [put(b) for b in blobs]
    assert names == [sha256(b) for b in blobs]
    assert written == dict(zip(names, blobs))


def test_writes_run_on_another_thread_while_the_caller_goes_on():
    threads = set()

    def put(data: bytes) -> str:
        threads.add(threading.current_thread().name)
        return sha256(data)

    with write_behind(put) as put_behind:
        put_behind(b"x")
    assert threads == {"mmer-write"}


def test_a_failed_write_is_raised_to_the_caller():
    def failing(data: bytes) -> str:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with write_behind(failing) as put:
            for _ in range(5):
                put(b"blob")
                time.sleep(0.01)


def test_leaving_the_block_on_an_error_waits_for_the_writer_so_nothing_lands_after_a_rollback():
    landed = []

    def slow_put(data: bytes) -> str:
        time.sleep(0.05)
        landed.append(data)
        return sha256(data)

    with pytest.raises(RuntimeError):
        with write_behind(slow_put, depth=1) as put:
            put(b"a")
            put(b"b")
            raise RuntimeError("the computation failed")
    count = len(landed)
    time.sleep(0.2)
    assert len(landed) == count  # the writer thread is done: a rollback after this sees every blob


def test_a_recorded_ctrl_c_is_raised_at_the_next_put_even_if_it_was_swallowed_before():
    import mmer_cl.runtime.interrupts as interrupts

    interrupts._requested.set()  # what the CLI's SIGINT handler records before raising
    try:
        with pytest.raises(KeyboardInterrupt):
            with write_behind(lambda data: sha256(data)) as put:
                put(b"blob")
    finally:
        interrupts._requested.clear()
