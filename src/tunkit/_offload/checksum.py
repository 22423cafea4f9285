"""The Internet checksum (RFC 1071), its pseudo-headers and its incremental update.

Sums are kept unfolded (any non-negative ``int``) while they are built and
folded to 16 bits once, at the end: :func:`fold` accepts any total, so a
caller adds the sums of several pieces with plain ``+``. No Python loop runs
per byte or per word: :func:`ones_sum` reads the whole buffer as one integer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = [
    "checksum",
    "fold",
    "ones_sum",
    "pseudo_sum",
    "pseudo_sum4",
    "pseudo_sum6",
    "update16",
]


def fold(total: int) -> int:
    """Fold a non-negative sum of 16-bit words to its 16-bit one's-complement sum.

    The end-around carry of RFC 1071 is arithmetic modulo 0xFFFF, except that
    a non-zero total that is a multiple of 0xFFFF folds to 0xFFFF ("negative
    zero"), as the textbook loop gives; only an all-zero total folds to 0.
    """
    folded = total % 0xFFFF
    return 0xFFFF if folded == 0 and total else folded


def ones_sum(data: ReadableBuffer, initial: int = 0) -> int:
    """Return the 16-bit one's-complement sum of *data* (RFC 1071) plus *initial*.

    As 2**16 == 1 (mod 0xFFFF), the sum of the big-endian words is the whole
    buffer read as one integer, modulo 0xFFFF: a single pass in C. *initial*
    is any non-negative partial sum (folded or not), a pseudo-header's say.

    Raises:
        ValueError: *initial* is negative.
    """
    if initial < 0:
        raise ValueError("initial sum must be non-negative")
    n = int.from_bytes(data, "big")
    if memoryview(data).nbytes & 1:
        n <<= 8  # an odd tail is padded with a zero byte
    return fold(n + initial)


def checksum(data: ReadableBuffer, initial: int = 0) -> int:
    """Return the Internet checksum of *data*: the complement of its sum with *initial*.

    Store the result in a checksum field that was zero while *data* was
    summed; a receiver's :func:`ones_sum` over the result is then 0xFFFF.
    """
    return ~ones_sum(data, initial) & 0xFFFF


def pseudo_sum4(src: ReadableBuffer, dst: ReadableBuffer, proto: int, l4_len: int) -> int:
    """Return the unfolded sum of the IPv4 pseudo-header (RFC 9293 section 3.1, RFC 768).

    *src* and *dst* are the 4-byte addresses; *l4_len* is the length of the
    TCP or UDP header plus data.
    """
    return (
        int.from_bytes(src, "big") % 0xFFFF + int.from_bytes(dst, "big") % 0xFFFF + proto + l4_len
    )


def pseudo_sum6(src: ReadableBuffer, dst: ReadableBuffer, proto: int, l4_len: int) -> int:
    """Return the unfolded sum of the IPv6 pseudo-header (RFC 8200 section 8.1).

    *src* and *dst* are the 16-byte addresses; *l4_len* is the upper-layer
    packet length (the 32-bit field; only its low 16 bits can be non-zero here).
    """
    return (
        int.from_bytes(src, "big") % 0xFFFF + int.from_bytes(dst, "big") % 0xFFFF + proto + l4_len
    )


def pseudo_sum(addrs: ReadableBuffer, proto: int, l4_len: int) -> int:
    """Return the unfolded pseudo-header sum for the adjacent source and destination *addrs*.

    *addrs* is the 8 (IPv4) or 32 (IPv6) bytes of an IP header that hold the
    source address followed by the destination address; both pseudo-headers
    sum to the same words: the addresses, the protocol and the length.
    """
    return int.from_bytes(addrs, "big") % 0xFFFF + proto + l4_len


def update16(csum: int, old: int, new: int) -> int:
    """Return checksum field *csum* after one 16-bit word of its data changed from *old* to *new*.

    RFC 1624 equation 3: ``HC' = ~(~HC + ~m + m')``. Unlike equation 2 it
    agrees with a fresh computation (and so always verifies) for any data
    that is not all zero, as a real IP header never is.
    """
    return ~fold((~csum & 0xFFFF) + (~old & 0xFFFF) + new) & 0xFFFF
