"""Attacks on source files, for the integrity tests: damage that still decodes.

A JPEG's entropy-coded scan carries no checksum, so bytes overwritten inside it decode to an image of the right
size with wrong pixels; libjpeg notices only when the Huffman decoder loses its place (it then warns "Corrupt
JPEG data: ..." and carries on), which Pillow does not report.
"""

from __future__ import annotations


def scan_bounds(jpeg: bytes) -> tuple[int, int]:
    """``(start, end)`` byte offsets of the first scan's entropy-coded data: after the SOS segment, before EOI.

    Only used to place the attack (the code under test reads JPEGs through libjpeg, never through this).
    """
    sos = jpeg.find(b"\xff\xda")
    eoi = jpeg.rfind(b"\xff\xd9")
    if sos < 0 or eoi < sos:
        raise ValueError("not a baseline JPEG with a scan and an end marker")
    header_length = int.from_bytes(jpeg[sos + 2 : sos + 4], "big")  # the SOS segment's length field
    return sos + 2 + header_length, eoi


def overwrite_mid_scan(jpeg: bytes, fraction: float = 0.6, length: int = 200, fill: int = 0) -> bytes:
    """``jpeg`` with ``length`` bytes at ``fraction`` of the file overwritten by ``fill`` (zeros by default).

    Zeros insert no marker (a marker starts with 0xFF), so the file keeps its size, headers and end marker.

    Raises:
        ValueError: the overwritten window does not lie inside the entropy-coded scan.
    """
    start = int(len(jpeg) * fraction)
    scan_start, scan_end = scan_bounds(jpeg)
    if not (scan_start <= start and start + length <= scan_end):
        raise ValueError(f"bytes {start}..{start + length} are not inside the scan ({scan_start}..{scan_end})")
    return jpeg[:start] + bytes([fill]) * length + jpeg[start + length :]
