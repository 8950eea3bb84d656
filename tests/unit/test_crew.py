"""Threads kept for reuse (sparkcache/fetch/crew.py): every job runs, a
finished thread takes the next job instead of a new thread being started,
and an idle one ends."""

from __future__ import annotations

import threading
import time

from sparkcache.fetch.crew import Crew


def _until(cond: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_a_finished_thread_takes_the_next_job() -> None:
    crew = Crew("test-crew")
    ran: list[int] = []
    crew.run(lambda: ran.append(threading.get_ident()))
    _until(lambda: crew.waiting == 1)
    before = threading.active_count()
    crew.run(lambda: ran.append(threading.get_ident()))
    _until(lambda: len(ran) == 2 and crew.waiting == 1)
    assert ran[0] == ran[1] and threading.active_count() == before  # no thread started


def test_jobs_run_at_once_in_threads_of_their_own_while_others_run() -> None:
    crew = Crew("test-crew")
    gate = threading.Event()
    started: list[int] = []
    for n in range(4):
        crew.run(lambda n=n: (started.append(n), gate.wait(30)))
    _until(lambda: len(started) == 4)  # none waits for another (each streams a body)
    gate.set()
    _until(lambda: crew.waiting == 4)


def test_an_idle_thread_ends_and_the_crew_starts_one_again() -> None:
    crew = Crew("test-crew-idle", idle=0.05)
    mine = lambda: [t for t in threading.enumerate() if t.name == "test-crew-idle"]  # noqa: E731
    for _ in range(2):
        done = threading.Event()
        crew.run(done.set)
        assert done.wait(30)
        _until(lambda: crew.waiting == 0 and not mine())  # ended once idle


def test_no_job_is_left_unrun_when_threads_time_out_as_jobs_come() -> None:
    crew = Crew("test-crew", idle=0.0005)
    count = 0
    lock = threading.Lock()

    def job() -> None:
        nonlocal count
        with lock:
            count += 1

    def feed() -> None:
        for n in range(300):
            crew.run(job)
            if n % 7 == 0:
                time.sleep(0.001)  # (idle threads time out between some jobs)

    feeders = [threading.Thread(target=feed) for _ in range(4)]
    for t in feeders:
        t.start()
    for t in feeders:
        t.join()
    _until(lambda: count == 1200)
    _until(lambda: crew.waiting == 0)  # and every idle thread ended
