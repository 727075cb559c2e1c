"""Safe extraction of dataset archives: decompression bombs, lying headers, links, and nothing left behind."""

from __future__ import annotations

import hashlib
import io
import os
import random
import stat
import struct
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from medseg.data import archive as archive_module
from medseg.data.archive import ARCHIVE_LIMIT_KEYS, ArchiveLimits, safe_extract
from medseg.errors import ConfigError, IngestError

from conftest import snapshot

BOMB = 200 << 20  # 200 MiB of zeros: ~200 KiB compressed, ratio ~1000:1


class _Zeros(io.RawIOBase):
    """`n` zero bytes, read in chunks, never held in memory at once."""

    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def _bomb(folder: Path, kind: str) -> Path:
    folder.mkdir()
    path = folder / f"bomb.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("data/zeros.nii", "w") as out:
            zeros = bytes(1 << 20)
            for _ in range(BOMB >> 20):
                out.write(zeros)
    else:
        with tarfile.open(path, "w:gz") as tf:
            info = tarfile.TarInfo("data/zeros.nii")
            info.size = BOMB
            tf.addfile(info, _Zeros(BOMB))
    return path


def _sourcesnapshot(root: Path) -> Path:
    """A dataset folder like MSD's: random (incompressible, like .nii.gz) files, nested folders, an inner link."""
    rng = random.Random(0)
    files = {
        "Task/dataset.json": b'{"name": "x"}',
        "Task/imagesTr/case_000.nii.gz": rng.randbytes(2 << 20),
        "Task/imagesTr/case_001.nii.gz": rng.randbytes(50_000),
        "Task/labelsTr/deep/er/case_000.nii.gz": rng.randbytes(20_000),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "Task" / "empty").mkdir()
    os.symlink("imagesTr/case_000.nii.gz", root / "Task" / "latest.nii.gz")
    return root


def _pack(src: Path, path: Path) -> Path:
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(src.rglob("*")):
                name = p.relative_to(src).as_posix()
                if p.is_symlink():  # zipfile.write follows links; store the link itself
                    info = zipfile.ZipInfo(name)
                    info.external_attr = (stat.S_IFLNK | 0o777) << 16
                    zf.writestr(info, os.readlink(p))
                else:
                    zf.write(p, name)
    else:
        with tarfile.open(path, "w:" + path.suffix[1:]) as tf:
            tf.add(src / "Task", arcname="Task")
    return path


def _fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def _refused(archive: Path, dest: Path, limits: ArchiveLimits | None = None, match: str = "") -> IngestError:
    """Extraction is refused, the archive is untouched, and dest's parent holds what it held before."""
    before, fingerprint = sorted(os.listdir(dest.parent)), _fingerprint(archive)
    with pytest.raises(IngestError, match=match) as info:
        safe_extract(archive, dest, limits)
    assert sorted(os.listdir(dest.parent)) == before
    assert _fingerprint(archive) == fingerprint
    assert info.value.path == str(archive)
    return info.value


@pytest.fixture
def out(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_bomb_is_refused_by_the_ratio_check(tmp_path, out, kind):
    bomb = _bomb(tmp_path / "in", kind)
    err = _refused(bomb, out / "raw", match="decompression bomb")
    assert "'data/zeros.nii'" in err.problem and "209715200 bytes" in err.problem
    assert "raise dataset.archive_max_ratio (now 200) if the archive is genuine" in err.problem
    assert not os.listdir(out)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_total_size_limit(tmp_path, out, kind):
    archive = _pack(_sourcesnapshot(tmp_path / "src"), tmp_path / f"ds.{kind}")
    err = _refused(archive, out / "raw", ArchiveLimits(max_total_bytes=1 << 20), match="over the limit of 1048576")
    assert "'Task/imagesTr/case_000.nii.gz'" in err.problem
    assert "raise dataset.archive_max_bytes (now 1048576)" in err.problem


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_member_count_limit(tmp_path, out, kind):
    archive = _pack(_sourcesnapshot(tmp_path / "src"), tmp_path / f"ds.{kind}")
    err = _refused(archive, out / "raw", ArchiveLimits(max_members=3), match="is member number 4, over the limit of 3")
    assert "raise dataset.archive_max_members (now 3)" in err.problem


def test_not_enough_free_disk_space(tmp_path, out, monkeypatch):
    archive = _pack(_sourcesnapshot(tmp_path / "src"), tmp_path / "ds.zip")
    monkeypatch.setattr(archive_module.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    _refused(archive, out / "raw", match="only 1000 bytes are free")


def test_under_declared_member_is_stopped_while_writing(tmp_path, out):
    path = tmp_path / "liar.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok.txt", b"fine")
        zf.writestr("big.bin", os.urandom(300_000))
    with zipfile.ZipFile(path) as zf:
        offset = zf.getinfo("big.bin").header_offset
    data = bytearray(path.read_bytes())
    assert data[offset:offset + 4] == b"PK\x03\x04"
    struct.pack_into("<I", data, offset + 22, 1000)  # local header: uncompressed size
    central = data.index(b"PK\x01\x02", data.index(b"PK\x01\x02") + 4)  # the second entry, big.bin
    struct.pack_into("<I", data, central + 24, 1000)  # central directory: uncompressed size
    path.write_bytes(bytes(data))
    _refused(path, out / "raw", match=r"member 'big\.bin': yields more than its declared 1000 bytes")


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "tar.xz"])
def test_genuine_archive_extracts_exactly(tmp_path, out, kind):
    src = _sourcesnapshot(tmp_path / "src")
    archive = _pack(src, tmp_path / f"ds.{kind}")
    fingerprint = _fingerprint(archive)
    dest = safe_extract(archive, out / "raw")
    assert dest == out / "raw" and os.listdir(out) == ["raw"]
    assert snapshot(dest) == snapshot(src)
    assert (dest / "Task" / "latest.nii.gz").read_bytes() == (src / "Task/imagesTr/case_000.nii.gz").read_bytes()
    assert _fingerprint(archive) == fingerprint


def test_interrupted_extraction_leaves_nothing(tmp_path, out, monkeypatch):
    archive = _pack(_sourcesnapshot(tmp_path / "src"), tmp_path / "ds.tar.gz")

    def interrupt(*args):  # the files are written by now; the links come last
        raise KeyboardInterrupt

    monkeypatch.setattr(archive_module.os, "symlink", interrupt)
    with pytest.raises(KeyboardInterrupt):
        safe_extract(archive, out / "raw")
    assert not os.listdir(out)


def test_existing_destination_is_refused(tmp_path, out):
    archive = _pack(_sourcesnapshot(tmp_path / "src"), tmp_path / "ds.zip")
    (out / "raw").mkdir()
    (out / "raw" / "keep.txt").write_text("mine")
    with pytest.raises(IngestError, match="extraction target already exists") as info:
        safe_extract(archive, out / "raw")
    assert info.value.path == str(out / "raw")
    assert os.listdir(out) == ["raw"] and os.listdir(out / "raw") == ["keep.txt"]


def _tar(path: Path, *members: tuple[str, bytes | str | None, bytes]) -> Path:
    """A tar of (name, data or link target, type) members."""
    with tarfile.open(path, "w") as tf:
        for name, payload, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            else:
                info.linkname = payload or ""
                tf.addfile(info)
    return path


def test_hard_link_is_extracted_as_a_copy(tmp_path, out):
    archive = _tar(tmp_path / "h.tar", ("d/a.txt", b"hello", tarfile.REGTYPE), ("d/b.txt", "d/a.txt", tarfile.LNKTYPE))
    dest = safe_extract(archive, out / "raw")
    assert (dest / "d" / "b.txt").read_bytes() == b"hello" and not (dest / "d" / "b.txt").is_symlink()
    assert os.stat(dest / "d" / "a.txt").st_ino != os.stat(dest / "d" / "b.txt").st_ino


@pytest.mark.parametrize("members, problem", [
    ([("d/b.txt", "d/missing.txt", tarfile.LNKTYPE)], "does not name an earlier regular file"),
    ([("fifo", None, tarfile.FIFOTYPE)], "is a device/fifo, not a file"),
    ([("a", "sub", tarfile.SYMTYPE), ("a/evil.txt", b"x", tarfile.REGTYPE)], "lies under the symlink 'a'"),
    ([("p/q", "..", tarfile.SYMTYPE), ("b", "p/q", tarfile.SYMTYPE), ("l", "b/..", tarfile.SYMTYPE)],
     "symlink 'l' -> 'b/..' points outside the destination"),
], ids=["hard-link-to-nothing", "fifo", "file-under-symlink", "symlink-chain-escape"])
def test_bad_tar_members_are_refused(tmp_path, out, members, problem):
    _refused(_tar(tmp_path / "bad.tar", *members), out / "raw", match=problem)


def test_limits_from_params():
    assert ArchiveLimits.from_params(None) == ArchiveLimits.from_params({}) == ArchiveLimits()
    assert ArchiveLimits() == ArchiveLimits(64 << 30, 200.0, 1_000_000)
    params = {"archive_max_bytes": 1.0e11, "archive_max_ratio": 50, "archive_max_members": 10, "name": "x"}
    limits = ArchiveLimits.from_params(params)
    assert limits == ArchiveLimits(max_total_bytes=100_000_000_000, max_ratio=50.0, max_members=10)
    assert ARCHIVE_LIMIT_KEYS == ("archive_max_bytes", "archive_max_ratio", "archive_max_members")


@pytest.mark.parametrize("key", ARCHIVE_LIMIT_KEYS)
@pytest.mark.parametrize("value", [0, -5, "big", True, None, float("nan"), float("inf")])
def test_limits_from_params_refuses_bad_values(key, value):
    with pytest.raises(ConfigError, match=rf"dataset\.{key} must be a positive"):
        ArchiveLimits.from_params({key: value})


@pytest.mark.parametrize("key", ["archive_max_bytes", "archive_max_members"])
def test_byte_and_member_limits_are_whole_numbers(key):
    with pytest.raises(ConfigError, match=rf"dataset\.{key} must be a positive whole number, got 1\.5"):
        ArchiveLimits.from_params({key: 1.5})
