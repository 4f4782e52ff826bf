"""The asyncio milter engine on the wire: what it answers an MTA for each command, as libmilter answers it.

A recording milter (a plain ``Milter.Base``, as PostroomMilter is one) sits behind the real engine on a unix
socket; the tests play the MTA with raw protocol packets.  What postroom's own callbacks make of a mail is tested
through both engines by tests/test_miltertest*.py (OpenDKIM's miltertest as the MTA) and the end-to-end tests
(Postfix), whose deployments run every behaviour test on libmilter and on this engine.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import Milter
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postroom.milter import aio

ALL_ACTIONS = 0x1FF
ALL_STEPS = 0x1FFFFF
NR_CONN, NR_MAIL, NR_RCPT, NR_HDR, NR_BODY = 0x1000, 0x4000, 0x8000, 0x80, 0x80000
NO_HELO, NO_DATA, NO_EOH, NO_UNKNOWN = 0x2, 0x200, 0x40, 0x100
SKIP = 0x400

Packet = tuple[bytes, bytes]


def pkt(code: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + code + data


def z(*parts: str) -> bytes:
    return b"".join(p.encode() + b"\0" for p in parts)


def negotiate(steps: int = ALL_STEPS, actions: int = ALL_ACTIONS) -> bytes:
    return pkt(b"O", struct.pack(">III", 6, actions, steps))


def macros(stage: bytes, **values: str) -> bytes:
    return pkt(b"D", stage + b"".join(z(k, v) for k, v in values.items()))


def connect_inet(host: str = "mx.customer.test", ip: str = "192.0.2.7", port: int = 40123) -> bytes:
    return pkt(b"C", z(host) + b"4" + struct.pack(">H", port) + z(ip))


def one_mail(qid: str = "4ABC", login: str = "", body: bytes = b"hello\r\n") -> list[bytes]:
    mail_macros = {"i": qid, "{auth_authen}": login} if login else {"i": qid}
    return [
        macros(b"M", **mail_macros),
        pkt(b"M", z("<alice@customer.test>")),
        pkt(b"R", z("<support@example.test>")),
        pkt(b"L", z("From", "alice@customer.test")),
        pkt(b"L", z("Subject", "Hello")),
        pkt(b"B", body),
        macros(b"E", i=qid),
        pkt(b"E"),
    ]


class Recorder(Milter.Base):  # type: ignore[misc]
    """Records the callbacks; at end of message runs ``at_eom`` (edits, a reply) and returns what it returns."""

    calls: list[tuple[Any, ...]]
    at_eom: Callable[[Recorder], int] = staticmethod(lambda m: Milter.ACCEPT)
    made: list[Recorder]

    def __init__(self) -> None:
        self.calls = []
        self.made.append(self)

    @Milter.noreply  # type: ignore[untyped-decorator]
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        self.calls.append(("connect", hostname, family, hostaddr))
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def envfrom(self, sender: str, *params: str) -> int:
        self.calls.append(("envfrom", sender, self.getsymval("{auth_authen}")))
        return Milter.CONTINUE  # type: ignore[no-any-return]

    @Milter.noreply  # type: ignore[untyped-decorator]
    def envrcpt(self, rcpt: str, *params: str) -> int:
        self.calls.append(("envrcpt", rcpt))
        return Milter.CONTINUE  # type: ignore[no-any-return]

    @Milter.noreply  # type: ignore[untyped-decorator]
    def header(self, name: str, value: str) -> int:
        self.calls.append(("header", name, value))
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def body(self, chunk: bytes) -> int:
        self.calls.append(("body", chunk))
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def eom(self) -> int:
        self.calls.append(
            ("eom", self.getsymval("{i}"), self.getsymval("{auth_authen}"), threading.current_thread().name)
        )
        return type(self).at_eom(self)

    def abort(self) -> int:
        self.calls.append(("abort",))
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def close(self) -> int:
        self.calls.append(("close",))
        return Milter.CONTINUE  # type: ignore[no-any-return]


def recorder(at_eom: Callable[[Recorder], int] | None = None) -> type[Recorder]:
    attrs: dict[str, Any] = {"made": []}
    if at_eom is not None:
        attrs["at_eom"] = staticmethod(at_eom)
    return type("BoundRecorder", (Recorder,), attrs)


def parse(data: bytes) -> list[Packet]:
    out = []
    while data:
        (size,) = struct.unpack(">I", data[:4])
        out.append((data[4:5], data[5 : 4 + size]))
        data = data[4 + size :]
    return out


def converse(
    tmp_path: Path,
    factory: type[Recorder],
    conversations: Sequence[Sequence[bytes]],
    ends: aio.Ends | None = None,
    timeout: float = 30.0,
) -> list[list[Packet]]:
    """Each conversation on its own connection to one engine; what the engine sent back on each, to its close."""
    path = str(tmp_path / "m.sock")

    async def main() -> list[list[Packet]]:
        shared = aio.Shared(factory, ends or aio.Ends(2, inline=True), timeout)
        server = await aio.start_server(f"unix:{path}", 0o077, shared)
        results = []
        try:
            for packets in conversations:
                reader, writer = await asyncio.open_unix_connection(path)
                writer.write(b"".join(packets))
                # Then the MTA's side closes, as Postfix's does when its session ends: a conversation cut short
                # (half a packet, no quit) ends there instead of waiting for the engine's idle timeout.
                writer.write_eof()
                await writer.drain()
                results.append(parse(await asyncio.wait_for(reader.read(), 10)))
                writer.close()
        finally:
            server.close()
            for conn in list(shared.connections):
                conn.close()
            await server.wait_closed()
            shared.ends.close()
        return results

    return asyncio.run(main())


def test_negotiation_asks_to_skip_what_the_milter_does_not_implement_or_answer(tmp_path: Path) -> None:
    factory = recorder()
    [answers] = converse(tmp_path, factory, [[negotiate(), pkt(b"Q")]])
    [(code, data)] = answers
    version, actions, steps = struct.unpack(">III", data)
    assert (code, version) == (b"O", 6)
    assert (
        actions == Milter.ADDHDRS | Milter.CHGHDRS | Milter.ADDRCPT | Milter.DELRCPT | Milter.CHGFROM | Milter.MODBODY
    )
    # Not implemented by the recorder: HELO, DATA, end of headers, unknown commands.  Not answered: connect,
    # recipients, headers.  MAIL and body are answered (a milter may refuse there; body may SKIP).
    for flag in (NO_HELO, NO_DATA, NO_EOH, NO_UNKNOWN, NR_CONN, NR_RCPT, NR_HDR, SKIP):
        assert steps & flag, hex(flag)
    for flag in (NR_MAIL, NR_BODY, 0x10, 0x20, 0x4, 0x8):  # no-reply for MAIL/body, no body/headers/MAIL/RCPT
        assert not steps & flag, hex(flag)
    # Never more than the MTA offered.
    [[(_, data)]] = converse(tmp_path, recorder(), [[negotiate(steps=NR_HDR), pkt(b"Q")]])
    assert struct.unpack(">III", data)[2] == NR_HDR


def test_a_mail_reaches_the_callbacks_decoded_as_pymilter_decodes_it(tmp_path: Path) -> None:
    factory = recorder()
    latin1 = pkt(b"L", b"Subject\0Gr\xfc\xdfe\0")  # not UTF-8: kept as surrogate escapes, as Milter.Base does
    mail = one_mail(login="meier")
    [answers] = converse(tmp_path, factory, [[negotiate(), connect_inet(), *mail[:4], latin1, *mail[4:], pkt(b"Q")]])
    # MAIL answers continue, the body continue, the end of message accept; connect, RCPT, headers nothing.
    assert [code for code, _ in answers] == [b"O", b"c", b"c", b"a"]
    [m] = factory.made
    assert m.calls[0] == ("connect", "mx.customer.test", socket.AF_INET, ("192.0.2.7", 40123))
    assert ("envfrom", "<alice@customer.test>", "meier") in m.calls
    assert ("header", "Subject", "Gr\udcfc\udcdfe") in m.calls
    assert ("body", b"hello\r\n") in m.calls
    assert m.calls[-2][:3] == ("eom", "4ABC", "meier")  # "{i}" finds Postfix's "i"
    assert m.calls[-1] == ("close",)


def test_without_no_reply_steps_every_callback_is_answered(tmp_path: Path) -> None:
    [answers] = converse(tmp_path, recorder(), [[negotiate(steps=0), connect_inet(), *one_mail(), pkt(b"Q")]])
    # connect, MAIL, RCPT, two headers, body: continue each; then accept.
    assert [code for code, _ in answers] == [b"O", b"c", b"c", b"c", b"c", b"c", b"c", b"a"]


def test_the_login_of_one_mail_never_carries_over_to_the_next_on_the_same_connection(tmp_path: Path) -> None:
    factory = recorder()
    [answers] = converse(
        tmp_path,
        factory,
        [[negotiate(), connect_inet(), *one_mail("4A1", login="meier"), *one_mail("4A2"), pkt(b"Q")]],
    )
    assert [code for code, _ in answers].count(b"a") == 2
    eoms = [c for c in factory.made[0].calls if c[0] == "eom"]
    assert [e[:3] for e in eoms] == [("eom", "4A1", "meier"), ("eom", "4A2", None)]


def test_edits_go_out_in_order_before_the_final_answer(tmp_path: Path) -> None:
    big = b"x" * 70_000 + b"\r\n"

    def edit(m: Recorder) -> int:
        m.addheader("X-Postroom-Ticket", "7")
        m.addheader("X-Top", "first", 0)
        m.chgheader("Subject", 1, "[Support #7] Hello")
        m.chgheader("X-Old", 1, "")
        m.addrcpt("<support+meier@example.test>")
        m.delrcpt("<support@example.test>")
        m.chgfrom("<support@example.test>")
        m.replacebody(big)
        return Milter.ACCEPT  # type: ignore[no-any-return]

    [answers] = converse(tmp_path, recorder(edit), [[negotiate(), connect_inet(), *one_mail(), pkt(b"Q")]])
    edits = answers[3:]
    assert edits[:7] == [
        (b"h", z("X-Postroom-Ticket", "7")),
        (b"i", struct.pack(">I", 0) + z("X-Top", "first")),
        (b"m", struct.pack(">I", 1) + z("Subject", "[Support #7] Hello")),
        (b"m", struct.pack(">I", 1) + z("X-Old", "")),
        (b"+", z("<support+meier@example.test>")),
        (b"-", z("<support@example.test>")),
        (b"e", z("<support@example.test>")),
    ]
    # The new body in libmilter's chunks of at most 65535 bytes, then the answer.
    assert [len(data) for _, data in edits[7:-1]] == [65535, len(big) - 65535]
    assert b"".join(data for _, data in edits[7:-1]) == big
    assert edits[-1] == (b"a", b"")


@pytest.mark.parametrize(
    ("rc", "reply", "expected"),
    [
        # A multi-line reply, as postroom refuses a rival agent's reply.
        (Milter.REJECT, ("550", "5.7.1", "Ticket #7 belongs to meier.", "Write #take to take it."),
         (b"y", b"550-5.7.1 Ticket #7 belongs to meier.\r\n550 5.7.1 Write #take to take it.\0")),
        (Milter.TEMPFAIL, ("451", "4.3.0", "Try again later."), (b"y", b"451 4.3.0 Try again later.\0")),
        (Milter.REJECT, ("550", None, "No."), (b"y", b"550 No.\0")),
        # libmilter sends a reply text only where its code agrees with the verdict.
        (Milter.TEMPFAIL, ("550", "5.7.1", "No."), (b"t", b"")),
        (Milter.REJECT, None, (b"r", b"")),
        (Milter.DISCARD, None, (b"d", b"")),
    ],
)  # fmt: skip
def test_replies_are_formatted_as_libmilter_formats_them(
    tmp_path: Path, rc: int, reply: tuple[str, ...] | None, expected: Packet
) -> None:
    def answer(m: Recorder) -> int:
        if reply is not None:
            m.setreply(*reply)
        return rc

    [answers] = converse(tmp_path, recorder(answer), [[negotiate(), connect_inet(), *one_mail(), pkt(b"Q")]])
    assert answers[-1] == expected


def test_skip_is_answered_only_where_the_mta_offered_it(tmp_path: Path) -> None:
    class Skipper(Recorder):
        def body(self, chunk: bytes) -> int:
            return Milter.SKIP  # type: ignore[no-any-return]

    Skipper.made = []
    with_skip, without = converse(
        tmp_path,
        Skipper,
        [
            [negotiate(), connect_inet(), *one_mail(), pkt(b"Q")],
            [negotiate(steps=ALL_STEPS & ~SKIP), connect_inet(), *one_mail(), pkt(b"Q")],
        ],
    )
    assert [code for code, _ in with_skip][2] == b"s"
    assert [code for code, _ in without][2] == b"c"


def test_abort_and_a_reused_connection_start_over_with_a_new_milter_object(tmp_path: Path) -> None:
    factory = recorder()
    mail = one_mail("4B1", login="meier")
    conversation = [negotiate(), connect_inet(), *mail[:5], pkt(b"A"), pkt(b"K"), connect_inet("other.test"),
                    *one_mail("4B2"), pkt(b"Q")]  # fmt: skip
    [answers] = converse(tmp_path, factory, [conversation])
    first, second = factory.made
    assert first.calls[-2:] == [("abort",), ("close",)]
    assert not any(c[0] == "eom" for c in first.calls)
    assert second.calls[0][1] == "other.test"
    assert [c[:3] for c in second.calls if c[0] == "eom"] == [("eom", "4B2", None)]
    assert [code for code, _ in answers][-1] == b"a"


def test_a_failing_callback_answers_tempfail_and_the_engine_goes_on(tmp_path: Path) -> None:
    def boom(m: Recorder) -> int:
        raise RuntimeError("a bug")

    failing, healthy = converse(
        tmp_path,
        recorder(boom),
        [[negotiate(), connect_inet(), *one_mail(), pkt(b"Q")], [negotiate(), pkt(b"Q")]],
    )
    assert failing[-1] == (b"t", b"")
    assert healthy[0][0] == b"O"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    garbage=st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.builds(pkt, st.sampled_from([*b"OCDHMRTLNBEAUKQXZ"]).map(lambda c: bytes([c])), st.binary(max_size=40)),
        ),
        max_size=12,
    )
)
def test_hostile_or_broken_packets_end_at_most_their_own_connection(tmp_path: Path, garbage: list[bytes]) -> None:
    factory = recorder()
    # Whatever one connection sends, the next one is served as usual.
    _, healthy = converse(
        tmp_path, factory, [[negotiate(), *garbage], [negotiate(), connect_inet(), *one_mail(), pkt(b"Q")]], timeout=5
    )
    assert [code for code, _ in healthy] == [b"O", b"c", b"c", b"a"]


def test_a_slow_end_of_message_sends_the_next_ones_to_threads_for_a_while(tmp_path: Path) -> None:
    slow_first = iter([0.3])

    def maybe_slow(m: Recorder) -> int:
        time.sleep(next(slow_first, 0.0))
        return Milter.ACCEPT  # type: ignore[no-any-return]

    factory = recorder(maybe_slow)
    ends = aio.Ends(2, inline=True, slow=0.1, hold=60)
    mails = [[negotiate(), connect_inet(), *one_mail(f"4C{i}"), pkt(b"Q")] for i in range(3)]
    converse(tmp_path, factory, mails, ends=ends)
    threads = [c[3] for m in factory.made for c in m.calls if c[0] == "eom"]
    loop_thread = threads[0]
    assert not loop_thread.startswith("eom")  # the first ran on the loop's own thread
    assert all(t.startswith("eom") for t in threads[1:]), threads  # then on the pool, for the hold time


def test_with_worker_processes_every_end_of_message_runs_on_a_thread(tmp_path: Path) -> None:
    factory = recorder()
    converse(tmp_path, factory, [[negotiate(), connect_inet(), *one_mail(), pkt(b"Q")]], ends=aio.Ends(2, inline=False))
    [eom] = [c for c in factory.made[0].calls if c[0] == "eom"]
    assert eom[3].startswith("eom")


def test_a_silent_mta_is_disconnected_after_the_timeout(tmp_path: Path) -> None:
    path = str(tmp_path / "m.sock")

    async def main() -> float:
        shared = aio.Shared(recorder(), aio.Ends(1, inline=True), 1.0)
        server = await aio.start_server(f"unix:{path}", 0o077, shared)
        watch = asyncio.create_task(aio.idle_watch(shared))
        try:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(negotiate())
            started = time.monotonic()
            await asyncio.wait_for(reader.read(), 10)  # returns at EOF: the engine closed the connection
            return time.monotonic() - started
        finally:
            watch.cancel()
            server.close()
            await server.wait_closed()
            shared.ends.close()

    assert 1.0 <= asyncio.run(main()) < 5.0


def test_a_stale_socket_file_is_replaced_and_another_file_is_not(tmp_path: Path) -> None:
    stale = tmp_path / "m.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on, as a killed milter leaves it
    [[(code, _)]] = converse(tmp_path, recorder(), [[negotiate(), pkt(b"Q")]])
    assert code == b"O"
    keep = tmp_path / "keep.txt"
    keep.write_text("not a socket")

    async def main() -> None:
        await aio.start_server(f"unix:{keep}", 0o077, aio.Shared(recorder(), aio.Ends(1, inline=True), 5))

    with pytest.raises(OSError):
        asyncio.run(main())
    assert keep.read_text() == "not a socket"


def test_a_nul_in_an_edit_never_reaches_the_wire(tmp_path: Path) -> None:
    def smuggle(m: Recorder) -> int:
        m.addheader("X-Postroom-Ticket", "7\0Bcc: mallory@customer.test")
        return Milter.ACCEPT  # type: ignore[no-any-return]

    [answers] = converse(tmp_path, recorder(smuggle), [[negotiate(), connect_inet(), *one_mail(), pkt(b"Q")]])
    # Refused as pymilter refuses it (an embedded null character): no header packet, the mail tempfailed.
    assert [code for code, _ in answers] == [b"O", b"c", b"c", b"t"]
