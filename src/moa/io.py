"""Atomic file and directory writes: a crash or a failed write never leaves a half-written file.

Every writer goes to a temporary sibling first, fsyncs, then renames over the target, so the
old content stays intact until the new one is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file

from moa.errors import MoAError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _umask_mode() -> int:
    return 0o666 & ~_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, _umask_mode())  # mkstemp makes 0600 files; use the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Save tensors as safetensors, atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, _umask_mode())
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, _umask_mode())  # save_file may recreate the file as 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise MoAError(f"missing file: {path}")
    return load_file(str(path))


def fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `target` in one rename.

    On any error the temporary directory is removed and `target` is left as it was. When
    `target` exists it is first moved aside and deleted only after the new one is in place.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, _umask_mode() | 0o111 & ~_umask())  # mkdtemp makes 0700 dirs
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            if not overwrite:
                raise MoAError(f"{target} already exists")
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_out_dir(out: str | os.PathLike, *, overwrite: bool, protect: Iterable = (), resumable: bool = False,
                  flag: str = "--out") -> Path:
    """The one output-directory policy of every command that writes a directory.

    OUT may be absent or empty; one that holds files needs `overwrite` (or, for a training run,
    --resume: `resumable`); OUT must never be, or contain, one of `protect` (inputs the command
    still reads while it writes, which replacing OUT would destroy). A file is never an OUT.
    """
    out = Path(out)
    if out.is_file():
        raise MoAError(f"{flag} {out} is a file, expected a directory")
    target = out.resolve()
    for p in protect:
        if p is None:
            continue
        p = Path(p).resolve()
        if p == target or target in p.parents:
            raise MoAError(f"{flag} {out} would replace {p}, which this command reads; choose another directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        how = "--resume to continue its run or --overwrite to replace it" if resumable else "--overwrite to replace it"
        raise MoAError(f"{flag} {out} already holds files; pass {how}")
    return out
