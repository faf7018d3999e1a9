"""evaluate's forward-ahead pipeline (yolo.evaluate._ahead): order, overlap, bounded, errors."""

from __future__ import annotations

import threading

import pytest
import torch

from yolo.evaluate import _ahead


def test_results_in_order_and_next_item_computes_while_the_caller_works():
    started = {k: threading.Event() for k in range(4)}

    def fn(k):
        started[k].set()
        assert torch.is_inference_mode_enabled()  # per thread in torch: the worker must set it
        return k * 10

    seen = []
    for k, value in _ahead(iter(range(4)), fn, overlap=True):
        seen.append((k, value))
        if k < 3:  # the caller still holds item k: item k+1 is already being computed
            assert started[k + 1].wait(5)
    assert seen == [(0, 0), (1, 10), (2, 20), (3, 30)]


def test_at_most_two_items_are_taken_ahead_of_the_caller():
    taken = []

    def items():
        for k in range(10):
            taken.append(k)
            yield k

    for k, _ in _ahead(items(), lambda k: k, overlap=True):
        assert len(taken) <= k + 2  # item k and the one being computed
    assert taken == list(range(10))


def test_in_order_without_overlap_runs_on_the_callers_thread():
    caller = threading.get_ident()
    out = list(_ahead(iter(range(3)), lambda k: (k, threading.get_ident()), overlap=False))
    assert out == [(k, (k, caller)) for k in range(3)]


def test_an_error_in_the_forward_reaches_the_caller():
    def fn(k):
        if k == 2:
            raise ValueError("bad chunk 2")
        return k

    got = []
    with pytest.raises(ValueError, match="bad chunk 2"):
        for k, _ in _ahead(iter(range(5)), fn, overlap=True):
            got.append(k)
    assert got == [0, 1]


def test_the_worker_keeps_the_callers_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        counts = [n for _, n in _ahead(iter(range(2)), lambda _: torch.get_num_threads(), overlap=True)]
    finally:
        torch.set_num_threads(before)
    assert counts == [1, 1]
