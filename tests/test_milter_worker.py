"""The milter's worker processes: a worker that dies or hangs costs the mails in flight the failure policy, never
the mail, and is started again; stopping the milter stops its workers.

The pool tests run real processes that stand in for a broken worker (no Postfix needed); the end-to-end tests run
the real `postroom milter` with its real worker between Postfix and Dovecot.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postroom.body import Body
from postroom.bundle import Loaded, load_all
from postroom.config import example_config_path, to_toml, with_changes
from postroom.dkim import public_txt
from postroom.milter.worker import Handled, RemotePipeline, WorkerError, WorkerPool, _Worker
from postroom.mime import Message
from postroom.parts import Parts
from postroom.runtime import Runtime
from postroom.store.memory import MemoryStore
from postroom.verdict import AddHeader, Envelope, SetHeader, apply_to_headers
from postroom_testbed import MILTER_ADAPTERS, Adapter, Deployment, MilterDaemon, deploy, free_port, pid_alive
from tests.conftest import CUSTOMERS, e2e_base_config
from tests.dkim_check import assert_verified
from tests.test_inbound_e2e import customer_mail, deliver, ticket_number
from tests.test_reload_e2e import wait_log
from tests.test_sla_e2e import _scrape

# Stand-ins started the way the milter starts a worker (the pool appends --channel-fd N): one that says it is
# ready and then never answers, one that dies at once.
SILENT_WORKER = [
    sys.executable,
    "-c",
    "import socket, sys, time\n"
    "c = socket.socket(fileno=int(sys.argv[-1]))\n"
    "c.sendall(b'R')\n"
    "while True: time.sleep(60)",
]
DYING_WORKER = [sys.executable, "-c", "raise SystemExit(3)"]
# The real worker loop over an in-memory store (no Redis, no database); it takes its time to start while the file
# named by its first argument exists.
REPO = str(Path(__file__).resolve().parents[1])
MEMORY_WORKER = [
    sys.executable,
    "-c",
    "import os, socket, sys, time\n"
    f"sys.path.insert(0, {REPO!r})\n"
    "from postroom.milter.worker import receive_bundle, serve_worker\n"
    "from postroom.parts import Parts\n"
    "from postroom.runtime import Runtime\n"
    "from postroom.store.memory import MemoryStore\n"
    "channel = socket.socket(fileno=int(sys.argv[-1]))\n"
    "bundle = receive_bundle(channel)\n"
    "if os.path.exists(sys.argv[1]): time.sleep(1.5)\n"
    "serve_worker(Runtime(Parts(bundle.current.config, MemoryStore())), channel, bundle.generation)\n",
]
# The same with the bundle's DKIM keys, for agents' replies.
SIGNING_WORKER = [
    *MEMORY_WORKER[:2],
    MEMORY_WORKER[2].replace("MemoryStore())", "MemoryStore(), keys=bundle.current.keys)"),
]
REQUEST: tuple[object, ...] = ("process", 0, None, [], None, 0.0)
# What the milter process would send its workers (the stand-ins above never read it).
LOADED = load_all(example_config_path(), environ={})


def wait_until(check: object, timeout: float = 10.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_worker_stuck_outside_any_mail_is_killed_and_replaced(caplog: pytest.LogCaptureFixture) -> None:
    pool = WorkerPool(SILENT_WORKER, 1, reply_timeout=0.5, loaded=LOADED)
    try:
        (first,) = pool.pids
        started = time.monotonic()
        # It never starts the mail: killed once it made no progress for a reply timeout, the mail is handed on to
        # its replacement (as silent here), and after a few such hand-ons the mail gets the failure policy.
        with caplog.at_level(logging.ERROR, "postroom.milter"), pytest.raises(WorkerError):
            pool.call(REQUEST)
        assert time.monotonic() - started < 30
        wait_until(lambda: pool.pids[0] != first and not pid_alive(first))
        assert "made no progress in 0.5 s with mail waiting; killing it" in caplog.text
        assert f"worker 0 (pid {first}) exited with status -9; starting a new one" in caplog.text
    finally:
        pool.close(timeout=2)


def test_while_no_worker_can_start_a_mail_waits_briefly_then_fails(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, "postroom.milter"):
        pool = WorkerPool(DYING_WORKER, 1, reply_timeout=30, loaded=LOADED, replace_wait=1.0)
        try:
            wait_until(lambda: "exited with status 3" in caplog.text)
            started = time.monotonic()
            with pytest.raises(WorkerError):
                pool.call(REQUEST)
            # Not the reply timeout: a worker that cannot start is waited for about replace_wait.
            assert time.monotonic() - started < 5
        finally:
            pool.close(timeout=2)


# The real worker loop over an in-memory store, whose pipeline takes 30 s for a mail with the subject "slow".
SLOW_WORKER = [
    sys.executable,
    "-c",
    "import socket, sys, time\n"
    f"sys.path.insert(0, {REPO!r})\n"
    "from postroom.milter.worker import receive_bundle, serve_worker\n"
    "from postroom.parts import Parts\n"
    "from postroom.runtime import Runtime\n"
    "from postroom.store.memory import MemoryStore\n"
    "class Slow(Runtime):\n"
    "    def handle(self, message, now):\n"
    "        if message.header('Subject') == 'slow': time.sleep(30)\n"
    "        return super().handle(message, now)\n"
    "channel = socket.socket(fileno=int(sys.argv[-1]))\n"
    "bundle = receive_bundle(channel)\n"
    "serve_worker(Slow(Parts(bundle.current.config, MemoryStore())), channel, bundle.generation)\n",
]


def test_one_slow_mail_costs_only_itself_the_innocent_mails_behind_it_go_to_the_replacement() -> None:
    pool = WorkerPool(SLOW_WORKER, 1, reply_timeout=2.0, loaded=LOADED)
    results: dict[str, object] = {}

    def send(name: str, subject: str) -> None:
        request = ("process", 0, ENVELOPE, [("From", "alice@customer.test"), ("Subject", subject)], None, 0.0)
        try:
            results[name] = pool.call(request)
        except WorkerError as exc:
            results[name] = exc

    try:
        slow = threading.Thread(target=send, args=("slow", "slow"))
        slow.start()
        time.sleep(0.5)  # the worker has started the slow mail; these queue behind it
        innocent = [threading.Thread(target=send, args=(f"mail{i}", f"Hello {i}")) for i in range(5)]
        for t in innocent:
            t.start()
        for t in [slow, *innocent]:
            t.join(60)
        # The slow mail pays (failure policy after its reply timeout); the others were never started by the
        # killed worker and got real verdicts from its replacement.
        assert isinstance(results["slow"], WorkerError)
        for i in range(5):
            handled = results[f"mail{i}"]
            assert isinstance(handled, Handled), handled
            assert new_subject(handled).endswith(f"] Hello {i}")
    finally:
        pool.close(timeout=2)


def test_close_stops_every_worker() -> None:
    pool = WorkerPool(SILENT_WORKER, 2, reply_timeout=1, loaded=LOADED)
    pids = pool.pids
    assert len(set(pids)) == 2 and all(pid_alive(p) for p in pids)
    # The stand-in ignores its closed channel, so this also covers the kill after the grace time.
    pool.close(timeout=1)
    assert not any(pid_alive(p) for p in pids)


ENVELOPE = Envelope("<alice@customer.test>", ["<support@example.test>"], queue_id="Q1")
HEADERS = [("From", "alice@customer.test"), ("Subject", "Hello")]


def new_subject(handled: Handled) -> str:
    return next(e.value for e in handled.verdict.edits if isinstance(e, SetHeader) and e.name == "Subject")


_queue_ids = itertools.count(1)


def subject_of(worker: _Worker, generation: int) -> str:
    """The new subject of another customer mail (its own queue id: the same mail twice would get one ticket)."""
    envelope = dataclasses.replace(ENVELOPE, queue_id=f"Q{next(_queue_ids)}")
    return new_subject(worker.process(generation, envelope, HEADERS, None, 0.0))


def renamed(tag: str) -> Loaded:
    box = LOADED.config.mailboxes["support"].model_dump()
    return dataclasses.replace(
        LOADED, config=with_changes(LOADED.config, {"mailboxes": {"support": {**box, "tag": tag}}})
    )


def test_a_mail_keeps_the_config_generation_it_started_with_across_a_reload() -> None:
    runtime = Runtime(Parts(LOADED.config, MemoryStore()))
    worker = _Worker(runtime, 0)
    worker.load(1, renamed("Help"))
    # A mail whose MAIL FROM came before the reload runs with the config it started with (its body was kept or
    # skipped by those rules); the next one with the new config; an unknown generation with the newest.
    assert subject_of(worker, 0) == "[Support #1] Hello"
    assert subject_of(worker, 1) == "[Help #2] Hello"
    assert subject_of(worker, 7) == "[Help #3] Hello"
    worker.load(2, LOADED)
    assert subject_of(worker, 0) == "[Support #4] Hello"  # generation 0 is gone: the newest is used


def test_every_mail_runs_with_the_config_it_names_across_reloads_and_a_restart(tmp_path: Path) -> None:
    slow = tmp_path / "slow-start"
    pool = WorkerPool([*MEMORY_WORKER, str(slow)], 1, reply_timeout=10, loaded=LOADED)
    try:

        def mail(generation: int) -> str:
            envelope = dataclasses.replace(ENVELOPE, queue_id=f"Q{next(_queue_ids)}")  # another mail each time
            handled = pool.call(("process", generation, envelope, HEADERS, None, 0.0))
            assert isinstance(handled, Handled)
            return new_subject(handled)

        assert mail(0) == "[Support #1] Hello"
        # The next mail reuses the pooled connection: its request and the new config can arrive at the same time.
        generation = pool.reload(renamed("Help"))
        assert mail(generation) == "[Help #2] Hello"
        # A reload while a new worker starts (it has its config, but does not read its channel yet).
        (first,) = pool.pids
        slow.touch()
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: pool.pids[0] != first)
        time.sleep(0.3)  # the new worker has received generation 1 and sleeps before it serves
        generation = pool.reload(renamed("Team"))
        assert mail(generation) == "[Team #1] Hello"  # a new worker, a new in-memory store
        assert mail(generation - 1) == "[Help #2] Hello"  # a mail that started before that reload
    finally:
        pool.close(timeout=2)


def test_a_spooled_body_reaches_the_worker_as_its_file_and_is_signed_whole() -> None:
    """A large body goes to the worker as the descriptor of its spool file, not as a pickled copy: the worker signs
    all of it (the signature verifies over the whole 3 MB body with dkimpy and OpenDKIM)."""
    pool = WorkerPool(SIGNING_WORKER, 1, reply_timeout=30, loaded=LOADED)
    body = Body(threshold=64 * 1024)
    for i in range(30_000):
        body.append(f"line {i:06d} of a long reply, with  some   spaces \r\n".encode())
    assert body.spooled
    headers = [
        ("From", "Support <support@example.test>"),
        ("To", "carol@customer.test"),
        ("Subject", "Your order"),
        ("Message-ID", "<big1@example.test>"),
    ]
    envelope = Envelope("<meier@example.test>", ["<carol@customer.test>"], queue_id="Q2", auth_login="meier")
    try:
        remote = RemotePipeline(LOADED.config, LOADED.rules, pool)
        handled = remote.handle(Message(envelope, headers, body=body), time.time())
    finally:
        pool.close(timeout=2)
    edits = handled.verdict.edits
    signature = next(e.value for e in edits if isinstance(e, AddHeader) and e.name == "DKIM-Signature")
    final = [("DKIM-Signature", signature), *apply_to_headers(headers, edits)]
    raw = "".join(f"{k}: {v}\r\n" for k, v in final).encode() + b"\r\n" + body()
    key = LOADED.config.dkim["example.test"]
    assert_verified(raw, {f"{key.selector}._domainkey.example.test.": public_txt(Path(key.key_file).read_bytes())})
    body.close()


# -- end to end ----------------------------------------------------------------------------------------------------


@pytest.fixture(params=MILTER_ADAPTERS)
def milter_deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """One worker process, behind either milter engine (the asyncio engine sends every mail to a thread then)."""
    base = with_changes(e2e_base_config(), {"milter": {"workers": 1}})
    with deploy(base, CUSTOMERS, adapter=request.param) as d:
        yield d


def worker_pids(d: Deployment) -> list[int]:
    assert isinstance(d.daemon, MilterDaemon) and d.daemon.pid is not None
    pid = d.daemon.pid
    return [
        int(child)
        for tid in os.listdir(f"/proc/{pid}/task")
        for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
    ]


@pytest.mark.e2e
def test_killed_worker_loses_no_mail_and_the_milter_recovers(milter_deployment: Deployment) -> None:
    d = milter_deployment
    first = deliver(d, customer_mail("alice@customer.test", "Before"))
    assert ticket_number(first) == 1
    (worker,) = worker_pids(d)
    os.kill(worker, signal.SIGKILL)
    wait_log(d, f"(pid {worker}) exited with status -9; starting a new one")
    # Sent while no worker runs, or just after the new one started: delivered either way, never lost.
    during = deliver(d, customer_mail("bob@customer.test", "During"))
    assert during["X-Postroom-Status"] == "degraded" or ticket_number(during) == 2
    wait_until(lambda: len(worker_pids(d)) == 1 and worker_pids(d) != [worker])
    after = deliver(d, customer_mail("mallory@customer.test", "After"))
    assert after["X-Postroom-Ticket"] is not None and after["X-Postroom-Status"] is None
    assert str(after["Subject"]).startswith("[Support #")
    assert d.daemon.is_running()


@pytest.mark.e2e
@pytest.mark.parametrize("adapter", MILTER_ADAPTERS)
def test_redis_errors_a_worker_meets_are_on_the_milters_metrics(adapter: Adapter) -> None:
    """The worker runs the pipeline, the milter process serves /metrics: a mail delivered degraded because Redis
    was down is counted there."""
    errors = ("postroom_redis_errors_total", ())
    listen = f"127.0.0.1:{free_port()}"
    base = with_changes(e2e_base_config(), {"milter": {"workers": 1}, "metrics": {"milter_listen": listen}})
    with deploy(base, CUSTOMERS, adapter=adapter) as d:
        deliver(d, customer_mail("alice@customer.test", "Fine"))
        assert _scrape(d)[errors] == 0
        d.stack.redis.stop()
        got = deliver(d, customer_mail("bob@customer.test", "Redis away"))
        assert got["X-Postroom-Status"] == "degraded"
        assert _scrape(d)[errors] == 1


@pytest.mark.e2e
def test_sigterm_stops_the_workers_after_their_history_is_written(milter_deployment: Deployment) -> None:
    d = milter_deployment
    deliver(d, customer_mail("bob@customer.test", "Last one"))
    workers = worker_pids(d)
    assert len(workers) == d.config.milter.workers == 1
    d.daemon.stop()
    assert not any(pid_alive(p) for p in workers)
    log = d.daemon.log_text()
    assert "postroom milter worker stopped" in log and "postroom milter stopped" in log
    assert "Traceback" not in log
    db = sqlite3.connect(d.config.database.url.removeprefix("sqlite:///"))
    try:
        subjects = [row[0] for row in db.execute("SELECT subject FROM messages")]
    finally:
        db.close()
    assert subjects == ["Last one"]


@pytest.mark.e2e
def test_a_restarted_worker_runs_the_last_good_config_not_the_broken_file(milter_deployment: Deployment) -> None:
    d = milter_deployment
    assert isinstance(d.daemon, MilterDaemon) and d.daemon.pid is not None
    box = d.config.mailboxes["support"].model_dump()
    d.daemon.config_path.write_text(to_toml(with_changes(d.config, {"mailboxes": {"support": {**box, "tag": "Help"}}})))
    os.kill(d.daemon.pid, signal.SIGHUP)
    wait_log(d, "worker: reloaded")
    # The admin breaks the file after the reload, and then the worker dies: the new worker must not need the file.
    d.daemon.config_path.write_text("[milter]\nsokcet = 'oops'\n")
    (worker,) = worker_pids(d)
    os.kill(worker, signal.SIGKILL)
    wait_log(d, f"(pid {worker}) exited with status -9; starting a new one")
    wait_until(lambda: len(worker_pids(d)) == 1 and worker_pids(d) != [worker])
    mail = deliver(d, customer_mail("alice@customer.test", "After the crash"))
    assert mail["X-Postroom-Status"] is None
    assert str(mail["Subject"]) == "[Help #1] After the crash"
    assert "sokcet" not in d.daemon.log_text()
    assert d.daemon.is_running()
