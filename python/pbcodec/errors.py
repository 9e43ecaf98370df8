"""Exception types shared by the compiled core and the pure-Python reference."""


class FormatError(ValueError):
    """Malformed serialized or encoded pbcodec data (bad magic, version, length,
    checksum, or a stream that does not decode within its array)."""
