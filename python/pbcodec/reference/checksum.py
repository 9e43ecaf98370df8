"""§5 CRC-32C, the checksum that ends every serialized blob (docs/format.md)."""

from __future__ import annotations

#: Bytes of the CRC-32C that ends every serialized blob.
_CRC_SIZE = 4


# ---------------------------------------------------------------------------
# §5 CRC-32C
# ---------------------------------------------------------------------------


def _make_crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data) -> int:
    """CRC-32C (Castagnoli): reflected polynomial 0x82F63B78, init and final XOR
    0xFFFFFFFF. ``data`` is any bytes-like object; returns an int in 0..2**32-1."""
    table = _CRC32C_TABLE
    crc = 0xFFFFFFFF
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
