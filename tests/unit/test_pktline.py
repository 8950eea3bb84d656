import pytest

from sparkcache.git.pktline import FLUSH, DELIM, DELIM_PKT, FLUSH_PKT, PktError, iter_pkt_lines, parse_request, pkt_line

A = "a" * 40
B = "b" * 40


def test_framing_round_trip() -> None:
    data = pkt_line("hello\n") + DELIM + pkt_line(b"x") + FLUSH
    assert data[:4] == b"000a"
    assert list(iter_pkt_lines(data)) == [b"hello", DELIM_PKT, b"x", FLUSH_PKT]


def test_binary_payload_keeps_its_final_newline() -> None:
    # Side-band pack data is binary: a payload that happens to end in 0x0a
    # must come back whole, or the pack it carries is corrupt.
    data = pkt_line(b"\x01PACK\x00\n") + FLUSH
    assert list(iter_pkt_lines(data, text=False)) == [b"\x01PACK\x00\n", FLUSH_PKT]


@pytest.mark.parametrize("bad", [b"00", b"zzzz", b"0003", b"0010abc"])
def test_malformed(bad: bytes) -> None:
    with pytest.raises(PktError):
        list(iter_pkt_lines(bad))


def test_v2_fetch() -> None:
    body = (pkt_line("command=fetch\n") + pkt_line("agent=git/2.39\n") + pkt_line("object-format=sha1\n") + DELIM
            + pkt_line("thin-pack\n") + pkt_line("ofs-delta\n") + pkt_line(f"want {A}\n") + pkt_line(f"have {B}\n")
            + pkt_line("filter blob:none\n") + pkt_line("deepen 1\n") + pkt_line("done\n") + FLUSH)
    r = parse_request(body, 2)
    assert r.version == 2 and r.command == "fetch"
    assert r.capabilities == ("agent=git/2.39", "object-format=sha1")
    assert r.wants == (A,) and r.haves == (B,) and r.done
    assert r.filter == "blob:none" and r.deepen == ("deepen 1",) and r.shallow_or_filtered
    assert r.arguments == ("thin-pack", "ofs-delta")


def test_v2_ls_refs_is_not_a_fetch() -> None:
    body = pkt_line("command=ls-refs\n") + DELIM + pkt_line("peel\n") + pkt_line("ref-prefix refs/heads/\n") + FLUSH
    r = parse_request(body, 2)
    assert r.command == "ls-refs" and r.wants == () and r.arguments == ("peel", "ref-prefix refs/heads/")


def test_v0_fetch() -> None:
    body = (pkt_line(f"want {A} multi_ack_detailed side-band-64k ofs-delta\n") + pkt_line(f"want {B}\n") + FLUSH
            + pkt_line(f"have {B}\n") + pkt_line("done\n"))
    r = parse_request(body, 0)
    assert r.wants == (A, B) and r.haves == (B,) and r.done and not r.shallow_or_filtered
    assert r.capabilities == ("multi_ack_detailed", "side-band-64k", "ofs-delta")


def test_bad_oid_and_missing_command() -> None:
    with pytest.raises(PktError):
        parse_request(pkt_line("want nothex\n") + FLUSH, 0)
    with pytest.raises(PktError):
        parse_request(DELIM + pkt_line(f"want {A}\n") + FLUSH, 2)
