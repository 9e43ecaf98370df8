"""Exception types shared by the compiled core and the pure-Python reference."""


class FormatError(ValueError):
    """Malformed serialized or encoded pbcodec data (bad magic, version, length,
    checksum, or a stream that does not decode within its array), and malformed
    files (safetensors headers, components that disagree with their metadata)."""


class ScaleRangeError(ValueError):
    """A scale that the chosen scale dtype cannot hold: a float16 ``mu``, ``alpha``
    or ``sigma`` that overflows, or a nonzero ``alpha``/``sigma`` that underflows to
    zero (docs/format.md §6.1). Compress with ``scale_dtype="float32"`` instead; the
    command line and :func:`pbcodec.torch.compress_model` do so per tensor."""
