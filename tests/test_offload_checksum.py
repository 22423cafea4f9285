"""The Internet checksum helpers against the textbook loop and known values."""

from __future__ import annotations

import struct

import pytest
from engines import engine_fixture
from hypothesis import given
from hypothesis import strategies as st
from oracles import slow_checksum, slow_ones_sum, slow_pseudo_header

from tunkit._offload.checksum import (
    checksum,
    fold,
    ones_sum,
    pseudo_sum,
    pseudo_sum4,
    pseudo_sum6,
    update16,
)

engine = engine_fixture(__name__, "ones_sum", "checksum", "pseudo_sum", "update16")


@given(data=st.binary(max_size=3000), initial=st.integers(0, 0xFFFF))
def test_ones_sum_matches_the_obvious_loop(data: bytes, initial: int) -> None:
    assert ones_sum(memoryview(data), initial) == slow_ones_sum(data, initial)


@given(data=st.binary(max_size=3000), initial=st.integers(0, 0xFFFF))
def test_checksum_matches_the_obvious_loop(data: bytes, initial: int) -> None:
    assert checksum(memoryview(data), initial) == slow_checksum(data, initial)


@given(data=st.binary(min_size=1, max_size=600), cut=st.integers(0, 300))
def test_sums_of_even_pieces_add_up(data: bytes, cut: int) -> None:
    cut = min(cut * 2, len(data))  # pieces must start at even offsets
    whole = ones_sum(data)
    assert fold(ones_sum(data[:cut]) + ones_sum(data[cut:])) == whole


@given(st.binary(min_size=2, max_size=64).map(lambda b: b[: len(b) & ~1]))
def test_a_stored_checksum_verifies(data: bytes) -> None:
    # Appending the checksum makes the whole sum 0xFFFF (RFC 1071 section 1).
    assert ones_sum(data + struct.pack("!H", checksum(data))) == 0xFFFF


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0),
        (b"\x00\x00", 0),
        (b"\xff\xff", 0xFFFF),
        (b"\xff\xff\x00\x01", 0x0001),  # end-around carry
        (b"\x01", 0x0100),  # odd tail padded with zero
        # RFC 1071 section 3 example: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2
        (bytes.fromhex("0001f203f4f5f6f7"), 0xDDF2),
    ],
    ids=["empty", "zero-word", "negative-zero", "carry", "odd-tail", "rfc1071-example"],
)
def test_ones_sum_known_values(data: bytes, expected: int) -> None:
    assert ones_sum(data) == expected
    assert slow_ones_sum(data) == expected


def test_ipv4_header_checksum_known_value() -> None:
    # A well-known IPv4 header (Wikipedia "IPv4 header checksum"): checksum b861.
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert checksum(header) == 0xB861


@given(
    src=st.binary(min_size=4, max_size=4),
    dst=st.binary(min_size=4, max_size=4),
    proto=st.sampled_from([6, 17]),
    l4_len=st.integers(0, 0xFFFF),
)
def test_pseudo_sum4_matches_the_bytes(src: bytes, dst: bytes, proto: int, l4_len: int) -> None:
    expected = slow_ones_sum(slow_pseudo_header(src, dst, proto, l4_len))
    assert fold(pseudo_sum4(src, dst, proto, l4_len)) == expected
    assert fold(pseudo_sum(src + dst, proto, l4_len)) == expected


@given(
    src=st.binary(min_size=16, max_size=16),
    dst=st.binary(min_size=16, max_size=16),
    proto=st.sampled_from([6, 17]),
    l4_len=st.integers(0, 0xFFFF),
)
def test_pseudo_sum6_matches_the_bytes(src: bytes, dst: bytes, proto: int, l4_len: int) -> None:
    expected = slow_ones_sum(slow_pseudo_header(src, dst, proto, l4_len))
    assert fold(pseudo_sum6(src, dst, proto, l4_len)) == expected
    assert fold(pseudo_sum(src + dst, proto, l4_len)) == expected


@given(
    words=st.lists(st.integers(0, 0xFFFF), min_size=2, max_size=30),
    index=st.integers(0, 29),
    new=st.integers(0, 0xFFFF),
)
def test_update16_matches_recomputation(words: list[int], index: int, new: int) -> None:
    # Word 0 is the checksum field of the "header", zero while summing; the
    # word that changes is one of the others.
    index = 1 + index % (len(words) - 1)
    words[0] = 0
    before = struct.pack(f"!{len(words)}H", *words)
    csum = slow_checksum(before)
    old = words[index]
    words[index] = new
    after = struct.pack(f"!{len(words)}H", *words)
    updated = update16(csum, old, new)
    fresh = slow_checksum(after)
    if any(after[2:]):
        # RFC 1624 equation 3 agrees with a fresh computation, so it verifies.
        assert updated == fresh
        assert slow_ones_sum(struct.pack("!H", updated) + after[2:]) == 0xFFFF
    else:
        # All-zero data: +0 and -0 (RFC 1624 section 3) both stand for it.
        assert {updated, fresh} <= {0, 0xFFFF}
