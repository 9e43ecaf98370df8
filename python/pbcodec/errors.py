"""Exception types shared by the compiled core and the pure-Python reference.

:class:`FormatError` covers all malformed data; the parsers of serialized blobs say
what kind it is with one of its subclasses, so callers can tell a file from a newer
pbcodec (:class:`UnsupportedVersionError`) or a cut-off one (:class:`TruncatedError`)
from damaged data (:class:`CorruptError`). ``except FormatError`` (or ``ValueError``)
catches all three.
"""


class FormatError(ValueError):
    """Malformed serialized or encoded pbcodec data (bad magic, version, length,
    checksum, or a stream that does not decode within its array), and malformed
    files (safetensors headers, components that disagree with their metadata)."""


class CorruptError(FormatError):
    """Damaged or invalid data: a bad magic, a checksum mismatch, sizes or parts that
    disagree, trailing bytes, a stream that does not decode within its array, a
    non-canonical encoding or a value out of range."""


class TruncatedError(FormatError):
    """Data that ends early: shorter than its fixed header, or than the length its
    header describes (a cut-off download or file)."""


class UnsupportedVersionError(FormatError):
    """Data in a format version this build does not read, or using a feature of the
    format it does not implement (a PBTensor ``dense_bits`` other than 1): written by
    a newer pbcodec. Upgrading pbcodec reads it; the data itself may be fine."""


class ScaleRangeError(ValueError):
    """A scale that the chosen scale dtype cannot hold: a ``mu``, ``alpha`` or ``sigma``
    that overflows float16, or a row with a nonzero weight whose float16 scales all
    underflow to zero, so that it would decompress to zeros (docs/format.md §6.1).
    Compress with ``scale_dtype="float32"`` instead; the
    command line and :func:`pbcodec.torch.compress_model` do so per tensor."""
