"""Safe extraction of zip and tar archives.

Every member of an archive is checked *before* anything is written: an absolute path, a ``..`` component, a
drive letter, a symbolic or hard link, or a device/FIFO member makes the whole archive refused. None of the
published archives contains any of these, so one that does is damaged or tampered with, and extracting the
rest of it would be trusting it anyway. A second, independent guard then writes each member: tar members go
through ``tarfile``'s ``data`` extraction filter, and zip members (``zipfile`` has no such filter) are streamed to
paths built here and checked to lie under the target. Either way a checker bug cannot write outside it. macOS
AppleDouble files (``._name``, ``__MACOSX/``) carry Finder metadata, not data, and are skipped.
"""

from __future__ import annotations

import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from data_download.errors import FetchError


@dataclass(frozen=True)
class Member:
    name: str  # the name as stored, with "/" separators
    size: int
    kind: str  # "file" | "dir" | "symlink" | "hardlink" | "other"
    target: str = ""  # link target, for the message


def is_appledouble(name: str) -> bool:
    """macOS resource-fork sidecars: ``._foo`` next to ``foo``, and everything under ``__MACOSX/``."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return bool(parts) and (parts[-1].startswith("._") or "__MACOSX" in parts)


def _zip_members(path: Path) -> list[Member]:
    out = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):  # zipfile would write the target text as a file; we refuse instead
                out.append(Member(info.filename, info.file_size, "symlink", zf.read(info).decode(errors="replace")))
            elif info.is_dir():
                out.append(Member(info.filename, 0, "dir"))
            elif mode and not (stat.S_ISREG(mode) or stat.S_IFMT(mode) == 0):
                out.append(Member(info.filename, info.file_size, "other"))
            else:
                out.append(Member(info.filename, info.file_size, "file"))
    return out


def _tar_members(path: Path) -> list[Member]:
    out = []
    with tarfile.open(path, "r:*") as tf:
        for ti in tf.getmembers():
            if ti.issym():
                out.append(Member(ti.name, 0, "symlink", ti.linkname))
            elif ti.islnk():
                out.append(Member(ti.name, 0, "hardlink", ti.linkname))
            elif ti.isdir():
                out.append(Member(ti.name, 0, "dir"))
            elif ti.isfile():
                out.append(Member(ti.name, ti.size, "file"))
            else:
                out.append(Member(ti.name, 0, "other"))
    return out


def archive_kind(path: str | Path) -> str:
    path = Path(path)
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    raise FetchError(f"{path}: neither a zip nor a tar archive; it is damaged or not the expected download: "
                     "delete it and fetch again")


def list_members(path: str | Path) -> list[Member]:
    """Every member of a zip or tar archive (compressed tars included)."""
    path = Path(path)
    try:
        return _zip_members(path) if archive_kind(path) == "zip" else _tar_members(path)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise FetchError(f"{path}: unreadable archive ({type(e).__name__}: {e}); delete it and fetch again") from None


def unsafe_reason(member: Member) -> str | None:
    """Why ``member`` must not be extracted, or ``None`` if it is an ordinary file or folder inside the target."""
    name = member.name.replace("\\", "/")
    if member.kind in ("symlink", "hardlink"):
        return f"is a {member.kind} (to {member.target!r}); the published archives contain no links"
    if member.kind == "other":
        return "is a device, FIFO or other special file"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "has an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "climbs out of the target with '..'"
    if "\x00" in name:
        return "has a NUL byte in its name"
    return None


def check_members(archive: str | Path, members: list[Member]) -> None:
    """Refuse the whole archive if any member is unsafe (see the module docstring for why all of it)."""
    for m in members:
        reason = unsafe_reason(m)
        if reason:
            raise FetchError(f"{archive}: refused to extract: member {m.name!r} {reason}; the archive is damaged "
                             "or tampered with: delete it and download it again from the source in sources.py")


def _target(dest: Path, name: str) -> Path:
    rel = PurePosixPath(name.replace("\\", "/"))
    out = dest.joinpath(*[p for p in rel.parts if p not in ("", ".")])
    # belt and braces: unsafe_reason already refused anything that could resolve outside dest
    if dest.resolve() not in out.resolve().parents:
        raise FetchError(f"refused to extract {name!r}: it resolves outside {dest}")
    return out


def safe_extract(archive: str | Path, dest: str | Path, include: Callable[[str], bool] | None = None,
                 progress: bool | None = None, members: list[Member] | None = None) -> list[Path]:
    """Extract the regular files of ``archive`` for which ``include(name)`` is true into ``dest``.

    Returns the written paths. AppleDouble files are always skipped. Folders are created as needed;
    permissions, owners and timestamps from the archive are not applied (data, not an installation).
    ``members`` (from ``list_members``) saves a second pass over a large archive.
    """
    archive, dest = Path(archive), Path(dest)
    members = list_members(archive) if members is None else members
    check_members(archive, members)
    chosen = [m for m in members
              if m.kind == "file" and not is_appledouble(m.name) and (include is None or include(m.name))]
    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    total = sum(m.size for m in chosen)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"extract {archive.name}", leave=False,
               disable=None if progress is None else not progress)
    try:
        if archive_kind(archive) == "zip":
            with zipfile.ZipFile(archive) as zf:
                for m in chosen:
                    written.append(_copy_stream(zf.open(m.name), _target(dest, m.name), bar))
        else:
            wanted = {m.name for m in chosen}
            with tarfile.open(archive, "r:*") as tf:
                # one sequential pass, member by member (not extractall, which would list the whole archive
                # first): a compressed tar cannot seek back cheaply
                for ti in tf:
                    if ti.name in wanted and ti.isfile():
                        target = _target(dest, ti.name)
                        tf.extract(ti, dest, set_attrs=False, filter="data")  # data, not an installation
                        written.append(target)
                        bar.update(ti.size)
    except tarfile.FilterError as e:
        raise FetchError(f"{archive}: refused to extract: {e}; the archive is damaged or tampered with: delete it "
                         "and download it again from the source in sources.py") from None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
        raise FetchError(f"{archive}: damaged archive while extracting ({type(e).__name__}: {e}); delete it and "
                         "fetch again") from None
    finally:
        bar.close()
    return written


def _copy_stream(src, target: Path, bar: tqdm) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with src, open(target, "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
            bar.update(len(chunk))
    return target


def selected_size(members: list[Member], include: Callable[[str], bool] | None = None) -> int:
    """Uncompressed bytes that ``safe_extract`` with the same ``include`` would write (for the disk check)."""
    return sum(m.size for m in members
               if m.kind == "file" and not is_appledouble(m.name) and (include is None or include(m.name)))
