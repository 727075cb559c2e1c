"""What a NIfTI file's header declares, checked against what the file really holds, before any voxel is allocated.

nibabel allocates the array a header declares and only then reads: a 368-byte `.nii` declaring 3 GiB costs 3 GiB
before it fails, and a 1 MB `.nii.gz` of 1 GiB zeros is decompressed in full. `check_nifti_file` (every NIfTI
medseg reads goes through it: ingest, doctor, predict) and `check_nifti_bytes` (serving's payloads) refuse, from
the header and the file's size alone:

- voxel types that are not real numbers (complex, RGB, 1-bit): medseg segments real intensities;
- more voxel data than `ReadLimits.max_bytes` (MEDSEG_MAX_VOLUME_BYTES, default 2 GiB);
- an uncompressed file shorter than its header's offset + voxel bytes (truncated, or a lying header);
- a gzip file whose declared voxel data is more than `ReadLimits.max_ratio` (MEDSEG_MAX_COMPRESSION_RATIO,
  default 100) times its compressed size once it declares over `RATIO_FLOOR_BYTES` (a CT compresses 2-5x, a label
  map 50-500x at a few MiB, a zero bomb 1000x);
- a gzip stream that ends before the declared voxel data: its trailer (ISIZE, the length mod 2^32) is read first,
  and only when it disagrees is the stream inflated, in 1 MiB pieces that are thrown away, up to the declared size.

Every refusal is an `IngestError(path, problem)` naming the setting to raise for a genuinely large scan.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.config import env_number

from medseg.errors import IngestError

MAX_BYTES_ENV, MAX_RATIO_ENV = "MEDSEG_MAX_VOLUME_BYTES", "MEDSEG_MAX_COMPRESSION_RATIO"
DEFAULT_MAX_BYTES = 2 * 1024**3
DEFAULT_MAX_RATIO = 100.0
RATIO_FLOOR_BYTES = 256 * 1024**2  # below this the ratio is not checked: a big label map compresses 500x
HEADER_BYTES = 540  # a NIfTI-2 header; NIfTI-1's is 348
_GZIP_MAGIC = b"\x1f\x8b"
_INFLATE_PIECE = 1 << 20

# NIfTI datatype codes medseg reads (numpy dtype), and those it refuses (what they are).
REAL_TYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}
REFUSED_TYPES = {1: "1-bit binary", 32: "complex64", 128: "RGB24", 1536: "float128", 1792: "complex128",
                 2048: "complex256", 2304: "RGBA32"}


@dataclass(frozen=True)
class ReadLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_ratio: float = DEFAULT_MAX_RATIO
    bytes_setting: str = MAX_BYTES_ENV  # what the message tells the user to raise
    ratio_setting: str = MAX_RATIO_ENV

    @classmethod
    def from_env(cls) -> "ReadLimits":
        return cls(env_number(MAX_BYTES_ENV, DEFAULT_MAX_BYTES, int),
                   env_number(MAX_RATIO_ENV, DEFAULT_MAX_RATIO, float))


@dataclass(frozen=True)
class NiftiHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    vox_offset: int
    version: int  # 1 or 2

    @property
    def data_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_header(head: bytes, source: str | Path) -> NiftiHeader:
    """The shape, voxel type and data offset of a NIfTI-1/-2 header (`head`: the file's first bytes, unzipped)."""
    for endian in "<>":
        size = struct.unpack(f"{endian}i", head[:4])[0] if len(head) >= 4 else 0
        if size == 348 and len(head) >= 348:
            dims = struct.unpack(f"{endian}8h", head[40:56])
            code = struct.unpack(f"{endian}h", head[70:72])[0]
            offset = struct.unpack(f"{endian}f", head[108:112])[0]
            version = 1
            break
        if size == 540 and len(head) >= 540:
            code = struct.unpack(f"{endian}h", head[12:14])[0]
            dims = struct.unpack(f"{endian}8q", head[16:80])
            offset = struct.unpack(f"{endian}q", head[168:176])[0]
            version = 2
            break
    else:
        raise IngestError(source, "cannot read NIfTI (no NIfTI-1 or NIfTI-2 header)")
    if not 1 <= dims[0] <= 7 or min(dims[1 : dims[0] + 1]) < 1:
        raise IngestError(source, f"cannot read NIfTI (the header declares invalid dims {list(dims)})")
    if code in REFUSED_TYPES:
        raise IngestError(source, f"voxel type {REFUSED_TYPES[code]} is not a real-valued type medseg segments "
                                  "(save the image as integers, float32 or float64; of complex data, its magnitude)")
    if code not in REAL_TYPES:
        raise IngestError(source, f"cannot read NIfTI (unknown datatype code {code})")
    if not math.isfinite(offset) or offset < 0:
        raise IngestError(source, f"cannot read NIfTI (vox_offset {offset})")
    dtype = np.dtype(REAL_TYPES[code]).newbyteorder(endian)
    # a single-file NIfTI's voxels start after its header at the earliest (nibabel reads an offset of 0 so)
    offset = max(int(offset), 352 if version == 1 else 544)
    return NiftiHeader(tuple(int(d) for d in dims[1 : dims[0] + 1]), dtype, offset, version)


def check_nifti_file(path: str | Path, limits: ReadLimits | None = None) -> NiftiHeader:
    """The header of the NIfTI at `path`, or IngestError if reading it would cost more than the file holds or
    the limits allow (module docstring). Reads the header, and the gzip trailer; the stream only if that lies."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return _check_stream(fh, path.stat().st_size, path, limits or ReadLimits.from_env())
    except OSError as exc:
        raise IngestError(path, f"cannot read NIfTI ({exc.strerror or exc})") from exc


def check_nifti_bytes(data: bytes, source: str, limits: ReadLimits) -> NiftiHeader:
    """check_nifti_file for a file held in memory (a served payload)."""
    import io

    return _check_stream(io.BytesIO(data), len(data), source, limits)


def _check_stream(fh, size: int, source, limits: ReadLimits) -> NiftiHeader:
    """check_nifti_file's work on an open binary file of `size` bytes, positioned at its start."""
    compressed = fh.read(2) == _GZIP_MAGIC
    fh.seek(0)
    head = _inflate_head(fh, source) if compressed else fh.read(HEADER_BYTES)
    header = _check(head, size, compressed, source, limits)
    if compressed:
        fh.seek(max(size - 4, 0))
        if not _trailer_agrees(header, fh.read(4)):
            fh.seek(0)
            _check_stream_length(fh, header, source)
    return header


def _check(head: bytes, size: int, compressed: bool, source, limits: ReadLimits) -> NiftiHeader:
    header = parse_header(head, source)
    declared = header.data_bytes
    what = f"the header declares shape {list(header.shape)} of {header.dtype.name}: {_size(declared)} of voxels"
    if declared > limits.max_bytes:
        raise IngestError(source, f"{what}, over {limits.bytes_setting}={limits.max_bytes} ({_size(limits.max_bytes)}); "
                                  f"raise {limits.bytes_setting} for a genuinely larger scan")
    if not compressed and size < header.vox_offset + declared:
        raise IngestError(source, f"{what}, but the file holds {size - header.vox_offset} bytes after its header "
                                  "(truncated, or a header that lies)")
    if compressed and declared > RATIO_FLOOR_BYTES and declared > limits.max_ratio * size:
        raise IngestError(source, f"{what} from {_size(size)} of gzip, {declared / size:.0f}x, over "
                                  f"{limits.ratio_setting}={limits.max_ratio:g} (a decompression bomb?); raise "
                                  f"{limits.ratio_setting} for a genuinely so compressible scan")
    return header


def _inflate_head(fh, source) -> bytes:
    inflate, head = zlib.decompressobj(16 + zlib.MAX_WBITS), b""
    try:
        while len(head) < HEADER_BYTES and not inflate.eof:
            piece = fh.read(4096)  # small pieces: zlib keeps unconsumed input as a copy
            if not piece:
                break
            head += inflate.decompress(piece, HEADER_BYTES - len(head))
    except zlib.error as exc:
        raise IngestError(source, f"cannot read NIfTI (gzip data is corrupt: {exc})") from exc
    return head


def _trailer_agrees(header: NiftiHeader, tail: bytes) -> bool:
    """A one-member gzip's trailer holds its length mod 2^32: equal to what the header needs, the stream is long
    enough without inflating it (a crafted trailer gains nothing: the ratio and size limits were checked first)."""
    need = header.vox_offset + header.data_bytes
    return len(tail) == 4 and struct.unpack("<I", tail)[0] == need % 2**32


def _check_stream_length(fh, header: NiftiHeader, source) -> None:
    """Inflate (members one after another, output thrown away) until the declared length is reached; IngestError
    when the stream ends first or is corrupt."""
    need, got = header.vox_offset + header.data_bytes, 0
    inflate, pending = zlib.decompressobj(16 + zlib.MAX_WBITS), b""
    try:
        while got < need:
            if not pending:
                pending = fh.read(_INFLATE_PIECE)
                if not pending:
                    break
            got += len(inflate.decompress(pending, _INFLATE_PIECE))
            pending = inflate.unconsumed_tail
            if inflate.eof:  # the next gzip member, if any (zero padding between members is skipped, as gzip does)
                pending = (inflate.unused_data + pending).lstrip(b"\0")
                inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    except zlib.error as exc:
        raise IngestError(source, f"cannot read NIfTI (gzip data is corrupt: {exc})") from exc
    if got < need:
        raise IngestError(source, f"cannot read NIfTI (the header declares {header.data_bytes} bytes of voxels from "
                                  f"offset {header.vox_offset}, the gzip stream ends after {got} bytes: truncated)")


def _size(n: int | float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
