"""Safe extraction of dataset archives (.zip, .tar, .tar.gz, .tgz, .tar.bz2, .tar.xz).

Two passes. First, from the archive's headers alone and before anything is written, every member is checked:
absolute paths, `..` components, members lying under a symlink, links that point outside the destination, hard
links that do not name an earlier regular file (the others are extracted as copies), sparse members and device files
are refused; so are more members, more declared uncompressed bytes or a higher compression ratio than `ArchiveLimits`
allows (decompression bombs), and a declared total larger than the free disk space. Then every member is copied in
chunks, counting the bytes the archive really yields, so an archive whose headers lie is stopped while writing.

Extraction goes to a temporary sibling of `dest`, renamed to `dest` only on success and removed on any failure
(Ctrl-C included); `dest` must not exist yet. The archive itself is only ever read. Every refusal is an IngestError
naming the archive and the member; a refusal by a limit also names the `dataset.archive_max_*` key to raise.
"""

from __future__ import annotations

import copy
import lzma
import math
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

from medseg.errors import ConfigError, IngestError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ARCHIVE_LIMIT_KEYS = ("archive_max_bytes", "archive_max_ratio", "archive_max_members")
_LIMIT_FIELDS = dict(zip(ARCHIVE_LIMIT_KEYS, ("max_total_bytes", "max_ratio", "max_members")))
RATIO_FLOOR = 1 << 20  # below 1 MiB uncompressed nothing can fill a disk, so small text members may compress well
CHUNK = 1 << 20
MAX_LINK_TARGET = 4096  # PATH_MAX; a zip symlink's data is its target, read before the size checks


@dataclass(frozen=True)
class ArchiveLimits:
    """How far an archive may expand; params.yaml `dataset.archive_max_bytes | _ratio | _members`."""

    max_total_bytes: int = 64 << 30
    max_ratio: float = 200.0  # .nii.gz inside an archive stays ~1:1; zlib bombs reach ~1000:1, bz2/xz far more
    max_members: int = 1_000_000

    @classmethod
    def from_params(cls, dataset_params: dict[str, Any] | None) -> ArchiveLimits:
        params, values = dataset_params or {}, {}
        for key, field in _LIMIT_FIELDS.items():
            if key not in params:
                continue
            value = params[key]
            whole = field != "max_ratio"
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0) or (whole and value != int(value)):
                raise ConfigError(f"dataset.{key} must be a positive {'whole ' if whole else ''}number, got {value!r}")
            values[field] = int(value) if whole else float(value)
        return cls(**values)


@dataclass
class _Member:
    """One entry of the extraction plan, checked from the headers."""

    name: str  # normalised path inside the destination
    kind: str  # "dir", "file", "hardlink" (extracted as a copy of the earlier member `link`) or "symlink"
    size: int = 0  # declared uncompressed bytes (a hard link: those of its source)
    link: str = ""
    source: Any = None  # ZipInfo / TarInfo of a file


def is_archive(path: str | Path) -> bool:
    name = Path(path).name.lower()
    return Path(path).is_file() and name.endswith(ARCHIVE_SUFFIXES)


def _check_name(archive: Path, name: str) -> str:
    """The member's normalised relative path, or IngestError if it would land outside the destination."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise IngestError(archive, f"member {name!r} has an absolute path")
    norm = posixpath.normpath(name.replace("\\", "/"))
    if norm == ".." or norm.startswith("../") or "/../" in f"/{norm}/":
        raise IngestError(archive, f"member {name!r} escapes the destination folder (..)")
    return norm


def _check_link(archive: Path, name: str, target: str) -> None:
    """A symlink may only point inside the destination (resolved relative to its own folder)."""
    if target.startswith(("/", "\\")):
        raise IngestError(archive, f"symlink {name!r} -> {target!r} points outside the destination (absolute)")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
    if resolved == ".." or resolved.startswith("../"):
        raise IngestError(archive, f"symlink {name!r} -> {target!r} points outside the destination")


def _zip_is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{int(n)} bytes ({n / scale:.1f} {unit})"
    return f"{int(n)} bytes"


def _over_limit(archive: Path, member: str, problem: str, limits: ArchiveLimits, key: str) -> IngestError:
    now = getattr(limits, _LIMIT_FIELDS[key])
    now = f"{now:g}" if isinstance(now, float) else now
    return IngestError(archive, f"member {member!r}: {problem}; raise dataset.{key} (now {now}) if the archive is "
                       "genuine")


def safe_extract(archive: str | Path, dest: str | Path, limits: ArchiveLimits | None = None) -> Path:
    """Extract `archive` into the new folder `dest` after checking every member against `limits`; returns `dest`."""
    archive, dest, limits = Path(archive), Path(dest), limits or ArchiveLimits()
    if not archive.is_file():
        raise IngestError(archive, "archive not found (or not a file)")
    if os.path.lexists(dest):
        raise IngestError(dest, "extraction target already exists; medseg only extracts into a new folder")
    name = archive.name.lower()
    if not name.endswith(ARCHIVE_SUFFIXES):
        raise IngestError(archive, f"not a supported archive (expected one of {', '.join(ARCHIVE_SUFFIXES)})")
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                return _extract(_zip_plan(archive, zf, limits), dest, lambda info: _open_zip(zf, info))
        with tarfile.open(archive) as tf:
            return _extract(_tar_plan(archive, tf, limits), dest, tf.extractfile)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise IngestError(archive, f"corrupt or unreadable archive ({type(exc).__name__}: {exc})") from exc


class _Plan:
    """The members checked so far and their declared total, refused as soon as a limit is passed: tar headers are
    read one by one, so a bomb is refused at its first big header, before the rest is decompressed."""

    def __init__(self, archive: Path, limits: ArchiveLimits):
        self.archive, self.limits = archive, limits
        self.packed = archive.stat().st_size
        self.members: list[_Member] = []
        self.total = 0

    def add(self, member: _Member, raw_name: str) -> None:
        self.members.append(member)
        self.total += member.size
        archive, limits, total = self.archive, self.limits, self.total
        if len(self.members) > limits.max_members:
            raise _over_limit(archive, raw_name, f"is member number {len(self.members)}, over the limit of "
                              f"{limits.max_members}", limits, "archive_max_members")
        if total > limits.max_total_bytes:
            raise _over_limit(archive, raw_name, f"brings the declared uncompressed total to {_size(total)}, over "
                              f"the limit of {_size(limits.max_total_bytes)}", limits, "archive_max_bytes")
        if total > RATIO_FLOOR and total > limits.max_ratio * self.packed:
            raise _over_limit(archive, raw_name, f"brings the declared uncompressed total to {_size(total)} from a "
                              f"{_size(self.packed)} archive (ratio {total / max(self.packed, 1):.0f}:1, over the "
                              f"limit of {limits.max_ratio:g}:1), a likely decompression bomb", limits,
                              "archive_max_ratio")

    def checked(self) -> _Plan:
        """Nothing may be written through a symlink of the archive (a link to `..` with a member below it escapes)."""
        links = {m.name for m in self.members if m.kind == "symlink"}
        for member in self.members if links else ():
            parent = posixpath.dirname(member.name)
            while parent:
                if parent in links:
                    raise IngestError(self.archive, f"member {member.name!r} lies under the symlink {parent!r}; "
                                      "medseg does not write through links")
                parent = posixpath.dirname(parent)
        return self


def _zip_plan(archive: Path, zf: zipfile.ZipFile, limits: ArchiveLimits) -> _Plan:
    plan = _Plan(archive, limits)
    for info in zf.infolist():
        norm = _check_name(archive, info.filename)
        if info.is_dir():
            member = _Member(norm, "dir")
        elif _zip_is_symlink(info):
            if info.file_size > MAX_LINK_TARGET:
                raise IngestError(archive, f"symlink {info.filename!r} declares a {_size(info.file_size)} target, "
                                  f"longer than any path ({MAX_LINK_TARGET} bytes)")
            target = zf.read(info).decode("utf-8", "replace")
            _check_link(archive, norm, target)
            member = _Member(norm, "symlink", link=target)
        else:
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size > RATIO_FLOOR and ratio > limits.max_ratio:
                raise _over_limit(archive, info.filename, f"declares {_size(info.file_size)} from "
                                  f"{_size(info.compress_size)} compressed (ratio {ratio:.0f}:1, over the limit of "
                                  f"{limits.max_ratio:g}:1), a likely decompression bomb", limits, "archive_max_ratio")
            member = _Member(norm, "file", info.file_size, source=info)
        plan.add(member, info.filename)
    return plan.checked()


def _tar_plan(archive: Path, tf: tarfile.TarFile, limits: ArchiveLimits) -> _Plan:
    plan = _Plan(archive, limits)
    file_sizes: dict[str, int] = {}  # regular files so far, the only valid hard-link sources
    for info in tf:
        norm = _check_name(archive, info.name)
        if info.issym():
            _check_link(archive, norm, info.linkname)
            member = _Member(norm, "symlink", link=info.linkname)
        elif info.islnk():
            source = _check_name(archive, info.linkname)
            if source not in file_sizes:
                raise IngestError(archive, f"hard link {info.name!r} -> {info.linkname!r} does not name an earlier "
                                  "regular file of the archive")
            member = _Member(norm, "hardlink", file_sizes[source], link=source)
        elif info.issparse():  # before isfile(), which sparse members also pass
            raise IngestError(archive, f"member {info.name!r} is a sparse file, which medseg does not extract")
        elif info.isfile():
            file_sizes[norm] = info.size
            member = _Member(norm, "file", info.size, source=info)
        elif info.isdir():
            member = _Member(norm, "dir")
        else:
            raise IngestError(archive, f"member {info.name!r} is a device/fifo, not a file")
        plan.add(member, info.name)
    return plan.checked()


def _open_zip(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> IO[bytes]:
    # zipfile cuts a member at its declared size and fails the CRC there; declaring more than one chunk (plus
    # zipfile's read-ahead) beyond it lets _copy see, and name, the excess of an under-declared member first
    probe = copy.copy(info)
    probe.file_size += 2 * CHUNK
    return zf.open(probe)


def _extract(plan: _Plan, dest: Path, open_member: Callable[[Any], IO[bytes]]) -> Path:
    archive, declared = plan.archive, plan.total
    dest.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest.parent).free
    if declared > free:
        raise IngestError(archive, f"declares {_size(declared)} uncompressed but only {_size(free)} are free at "
                          f"{dest.parent}")
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.extract-"))
    try:
        written = 0
        for member in plan.members:  # symlinks come last, so no file is ever written through one
            target = tmp / member.name
            if member.kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
            elif member.kind != "symlink":
                target.parent.mkdir(parents=True, exist_ok=True)
                src = open(tmp / member.link, "rb") if member.kind == "hardlink" else open_member(member.source)
                with src, open(target, "wb") as out:
                    written = _copy(plan, member, src, out, written)
        links = [m for m in plan.members if m.kind == "symlink"]
        for member in links:
            (tmp / member.name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(member.link, tmp / member.name)
        _check_links_resolve(archive, tmp, links)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _copy(plan: _Plan, member: _Member, src: IO[bytes], out: IO[bytes], written: int) -> int:
    """Copy in chunks, counting what the archive really yields (headers can lie); returns the running total."""
    archive, limits = plan.archive, plan.limits
    size = 0
    while chunk := src.read(CHUNK):
        size += len(chunk)
        if size > member.size:
            raise IngestError(archive, f"member {member.name!r}: yields more than its declared {_size(member.size)}; "
                              "its headers are wrong (a corrupt or crafted archive)")
        if written + size > limits.max_total_bytes:
            raise _over_limit(archive, member.name, f"brings the extracted total over the limit of "
                              f"{_size(limits.max_total_bytes)}", limits, "archive_max_bytes")
        out.write(chunk)
    return written + size


def _check_links_resolve(archive: Path, tmp: Path, links: list[_Member]) -> None:
    """Each link was checked alone; a chain (`b -> p/q`, `p/q -> ..`, `l -> b/..`) can still leave the folder."""
    root = os.path.realpath(tmp)
    for member in links:
        real = os.path.realpath(tmp / member.name)
        if real != root and not real.startswith(root + os.sep):
            raise IngestError(archive, f"symlink {member.name!r} -> {member.link!r} points outside the destination "
                              "(through other links)")


def dataset_root(extracted: Path) -> Path:
    """Archives usually hold one top folder (`Task09_Spleen/`); descend into it when it is the only entry."""
    entries = [p for p in extracted.iterdir() if p.name not in ("__MACOSX",) and not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return extracted
