"""Exception types shared by the compiled core and the pure-Python reference."""


class FormatError(ValueError):
    """Malformed serialized or encoded pbcodec data (bad magic, version, length,
    checksum, or a stream that does not decode within its array), and malformed
    files (safetensors headers, components that disagree with their metadata)."""


class ScaleRangeError(ValueError):
    """A scale that the chosen scale dtype cannot hold: a ``mu``, ``alpha`` or ``sigma``
    that overflows float16, or a row with a nonzero weight whose float16 scales all
    underflow to zero, so that it would decompress to zeros (docs/format.md §6.1).
    Compress with ``scale_dtype="float32"`` instead; the
    command line and :func:`pbcodec.torch.compress_model` do so per tensor."""
