"""Safe extraction of dataset archives (.zip, .tar, .tar.gz, .tgz, .tar.bz2, .tar.xz).

Every member is checked *before* anything is written: absolute paths, `..` components, links that point
outside the destination, hard links and device files are refused with an IngestError naming the archive and
the member. The destination folder is built with `atomic_dir`, so a refused or broken archive leaves nothing.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

from medseg.errors import IngestError
from medseg.io import atomic_dir

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


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


def safe_extract(archive: str | Path, dest: str | Path) -> Path:
    """Extract `archive` into `dest` (replacing it whole) after checking every member; returns `dest`."""
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise IngestError(archive, "archive not found (or not a file)")
    name = archive.name.lower()
    try:
        if name.endswith(".zip"):
            return _extract_zip(archive, dest)
        if name.endswith(ARCHIVE_SUFFIXES):
            return _extract_tar(archive, dest)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise IngestError(archive, f"corrupt or unreadable archive ({type(exc).__name__}: {exc})") from exc
    raise IngestError(archive, f"not a supported archive (expected one of {', '.join(ARCHIVE_SUFFIXES)})")


def _extract_zip(archive: Path, dest: Path) -> Path:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for info in members:
            norm = _check_name(archive, info.filename)
            if _zip_is_symlink(info):
                _check_link(archive, norm, zf.read(info).decode("utf-8", "replace"))
        with atomic_dir(dest) as tmp:
            for info in members:
                norm = _check_name(archive, info.filename)
                target = tmp / norm
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                if _zip_is_symlink(info):
                    os.symlink(zf.read(info).decode("utf-8"), target)
                    continue
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
    return dest


def _extract_tar(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        for member in members:
            norm = _check_name(archive, member.name)
            if member.issym():
                _check_link(archive, norm, member.linkname)
            elif member.islnk():
                _check_name(archive, member.linkname)
            elif not (member.isfile() or member.isdir()):
                raise IngestError(archive, f"member {member.name!r} is a device/fifo, not a file")
        with atomic_dir(dest) as tmp:
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # second line of defence
            tf.extractall(tmp, members=members, **kwargs)
    return dest


def dataset_root(extracted: Path) -> Path:
    """Archives usually hold one top folder (`Task09_Spleen/`); descend into it when it is the only entry."""
    entries = [p for p in extracted.iterdir() if p.name not in ("__MACOSX",) and not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return extracted
