"""Inflating a deflated data set (PS3.5 A.5, Deflated Explicit VR Little Endian) with a bound.

pydicom inflates a deflated data set whole, with no limit, and 200 KiB can inflate to 200 MiB
and more (a "deflate bomb"). Every data set the node takes from outside in this syntax (a
C-STORE, a STOW-RS part, a file uploaded to be explained by the routing rules) is inflated here.
"""

from __future__ import annotations

import zlib

MAX_INFLATED_BYTES = 256 << 20  # a deflated data set may inflate to this much, no more


class NotInflatable(ValueError):
    """The deflate stream does not inflate, inflates past the limit, is cut short, or is
    followed by stray bytes."""


def inflate(raw: bytes | memoryview, limit: int = MAX_INFLATED_BYTES) -> bytes:
    """The inflated data set, or NotInflatable: refused when it inflates past `limit`, is cut
    short, or has bytes after the end of its deflate stream other than the one 00H pad byte of
    PS3.5 A.5."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(bytes(raw), limit)
    except zlib.error:
        raise NotInflatable("deflated data set does not inflate") from None
    if inflater.unconsumed_tail:
        raise NotInflatable(f"deflated data set inflates to more than {limit >> 20} MiB")
    if not inflater.eof:
        raise NotInflatable("deflated data set is cut short")
    # PS3.5 Annex A.5 (Deflate Transfer Syntax): a deflated bitstream of odd length is followed
    # by a single 00H pad byte so that the data set has even length (dcmtk writes it). That one
    # byte is allowed; anything else after the end of the stream is not.
    if inflater.unused_data and inflater.unused_data != b"\x00":
        raise NotInflatable(f"{len(inflater.unused_data)} bytes after the end of the deflated data set")
    return data
