"""The read-ahead used by expand and export keeps order, raises where the producer failed, and stops early."""

import threading
import time

import pytest

from mmer_cl.runtime.prefetch import prefetched


def test_items_come_in_order_and_all_of_them():
    assert list(prefetched(range(100), depth=3)) == list(range(100))


def test_a_producer_error_is_raised_at_the_item_where_it_happened():
    def items():
        yield 1
        yield 2
        raise ValueError("bad tensor")

    got = []
    with pytest.raises(ValueError, match="bad tensor"):
        for x in prefetched(items()):
            got.append(x)
    assert got == [1, 2]


def test_the_next_item_is_produced_while_this_one_is_consumed():
    produced = []

    def items():
        for i in range(3):
            produced.append(i)
            yield i

    stream = prefetched(items())
    assert next(stream) == 0
    deadline = time.time() + 5
    while len(produced) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert produced[:2] == [0, 1]  # item 1 was made before it was asked for
    stream.close()


def test_closing_early_stops_the_producer():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    stream = prefetched(endless())
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    stream.close()
    time.sleep(0.3)
    assert threading.active_count() <= before


def test_at_most_the_held_item_and_the_next_one_exist_at_once():
    alive = set()
    most = []

    class Item:  # stands for a tensor's decoded inputs: counts how many exist at a time
        def __init__(self, i):
            self.i = i
            alive.add(i)
            most.append(len(alive))

        def __del__(self):
            alive.discard(self.i)

    def items():
        for i in range(20):
            yield Item(i)

    for item in prefetched(items(), depth=1):
        time.sleep(0.005)  # the consumer is the slower half, so the producer runs ahead as far as allowed
        del item
    assert max(most) <= 2
