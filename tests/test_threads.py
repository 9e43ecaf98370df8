"""Worker threads: a forked child (multiprocessing's 'fork' start method) gets its own,
and calls from several Python threads at once give the single-threaded results."""

import multiprocessing
import os
import threading

import numpy as np
import pbcodec
import pytest


def _child_work(w, x, want_y, want_d, conn):
    t = pbcodec.compress(w, salient=0.1)  # rayon pool
    ok = np.array_equal(t.decompress(), want_d)  # rayon pool
    ok &= np.array_equal(t.matvec(x, activations="int8"), want_y)  # the team
    conn.send(bool(ok))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_has_working_threads():
    """Without the at-fork reset, the child's first multi-threaded call waited forever
    for the parent's worker threads, which a fork does not copy."""
    if pbcodec.get_num_threads() < 2:
        pytest.skip("needs >= 2 worker threads")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((1024, 1024)).astype(np.float32)
    x = rng.standard_normal((4, 1024)).astype(np.float32)
    t = pbcodec.compress(w, salient=0.1)
    want_y, want_d = t.matvec(x, activations="int8"), t.decompress()  # parent's threads started
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child_work, args=(w, x, want_y, want_d, child))
    p.start()
    p.join(60)
    if p.is_alive():
        p.kill()
        pytest.fail("the forked child hung in a multi-threaded call")
    assert p.exitcode == 0 and parent.poll() and parent.recv() is True


def test_concurrent_callers_match_single_threaded():
    """Several Python threads share the worker team: one holds it, the others compute
    alone; every result equals the one-thread result bit for bit."""
    rng = np.random.default_rng(1)
    t = pbcodec.compress(rng.standard_normal((768, 1024)).astype(np.float32), salient=0.1)
    xs = [rng.standard_normal((b, 1024)).astype(np.float32) for b in (1, 2, 16)]
    before = pbcodec.get_num_threads()
    pbcodec.set_num_threads(1)
    try:
        want = [(t.matvec(x, activations="int8"), t.matvec(x)) for x in xs]
    finally:
        pbcodec.set_num_threads(before)
    errors = []

    def worker(k):
        for r in range(30):
            i = (k + r) % len(xs)
            got8, got32 = t.matvec(xs[i], activations="int8"), t.matvec(xs[i])
            if not (np.array_equal(got8, want[i][0]) and np.array_equal(got32, want[i][1])):
                errors.append((k, r))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
