"""CRC-32 (zlib's polynomial), the file format's checksum of its header
and of every section.

zlib-ng's where it is installed (a dependency on the common platforms):
about 30 GB/s against zlib's 4 on x86, where checking a checkpoint's
sections had cost a third as much as decoding them.  zlib's elsewhere:
the same values.
"""
try:
    from zlib_ng.zlib_ng import crc32
except ImportError:   # a platform without its wheel, or a bare environment
    from zlib import crc32

__all__ = ["crc32"]
