"""Hostile images the tests send, built byte by byte."""

from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG that claims width x height pixels in a few KB: 1-bit grayscale rows of zeros, which
    zlib squeezes about 1000:1. Decoding it takes width x height bytes, and 3x that once made RGB."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def text_bomb_png(chunks: int = 64, chunk_bytes: int = 1024 * 1024 - 100) -> bytes:
    """A 16x16 PNG carrying `chunks` zTXt chunks that each inflate to `chunk_bytes` (just under Pillow's
    per-chunk limit): ~70 KB on the wire, 64 MB of text once opened with Pillow's default limits."""
    header = struct.pack(">IIBBBBB", 16, 16, 8, 0, 0, 0, 0)  # 8-bit grayscale
    texts = b"".join(
        _chunk(b"zTXt", b"k%d\x00\x00" % i + zlib.compress(b"a" * chunk_bytes, 9)) for i in range(chunks)
    )
    pixels = zlib.compress(b"".join(b"\x00" + b"\x00" * 16 for _ in range(16)))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + texts
        + _chunk(b"IDAT", pixels)
        + _chunk(b"IEND", b"")
    )
