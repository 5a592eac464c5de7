"""Write a folder so that it is never seen half-written: every writer of checkpoint folders goes through here.

transformers writes a checkpoint in place: ``config.json`` first, then each shard, then the index. A save that is
killed halfway leaves a folder mixing the new config with old or missing weights, which can load as a wrong model
(a stale ``model.safetensors`` next to new shards is even preferred by the loader). :func:`write_folder` instead:

1. checks that the target folder, when it exists, is writable (by creating a file in it, so it works as root);
2. has everything written into a staging folder next to the target (same parent, so same file system). With
   ``keep_files`` (what ``save_pretrained`` does) the files of the target that are not weights are copied in first
   (README, tokenizer, ...) and whatever the writer did not rewrite is linked in afterwards; without it the new
   folder replaces the old one entirely (converters, the CLI). With ``seal`` every ``model*.safetensors`` file is
   then sealed (see :mod:`hf_int8.checkpoint.integrity`); everything is fsync'ed;
3. replaces the target by the staging folder in one atomic step (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere
   two renames, between which the target is briefly missing, never half-written); the old folder is then deleted.

Killed at any point, the target is either the complete old folder or the complete new one; a leftover hidden
``.<name>.hf_int8-*`` sibling may remain and can be deleted. With ``keep_files``, weight files of the old checkpoint
(``model*.safetensors``, ``pytorch_model*.bin`` and their indexes) are replaced, never kept next to the new ones;
every other file and folder in the target is kept.

When the parent folder is not writable (the target is a mount point, say), the staging folder is created inside the
target instead and the files are moved in one by one: stale entries first, ``config.json`` next, weights, the index
last. A kill during those moves leaves a folder that fails to load with a clear error (missing or unsealed shards),
and the complete new folder in the staging folder.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from typing import TypeVar

from .format import CONFIG_NAME, is_weight_file
from .integrity import seal_folder

T = TypeVar("T")
STAGING_MARK = ".hf_int8-"
_PRECOPY_MAX_BYTES = 16 * 1024 * 1024
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; nothing more can be done there
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(os.path.join(folder, name))
        _fsync_path(folder)


def _probe_writable(folder: str) -> None:
    """Raise ``PermissionError`` unless a file can be created in ``folder`` (permission bits alone lie to root)."""
    probe = os.path.join(folder, f"{STAGING_MARK}write-probe-{uuid.uuid4().hex[:8]}")
    try:
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise PermissionError(
            exc.errno or errno.EACCES,
            f"cannot save into {folder}: the folder is not writable ({exc.strerror or exc}); nothing was changed",
            folder,
        ) from exc


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); ``False`` where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot replace {b}: {os.strerror(err)}", b)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: str, new: str, precopy: bool) -> None:
    """Bring the entries of ``old`` that are not weights into ``new`` without overwriting what ``new`` has.

    ``precopy``: before the save runs, copy small files (the save may rewrite some in place, e.g. README.md, so they
    must not share storage with the old folder). Afterwards, hard-link (or copy) whatever the save did not write.
    """
    for name in os.listdir(old):
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if is_weight_file(name) or name.startswith(STAGING_MARK) or os.path.lexists(dst):
            continue
        if os.path.islink(src):
            if not precopy:
                os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            if not precopy:
                shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        elif precopy:
            if os.path.getsize(src) <= _PRECOPY_MAX_BYTES:
                shutil.copy2(src, dst)
        else:
            _link_or_copy(src, dst)


def write_folder(
    target: str | os.PathLike, write: Callable[[str], T], *, keep_files: bool = True, seal: bool = False
) -> T:
    """Run ``write(folder)`` on a staging folder and make the result appear at ``target`` atomically; return what
    ``write`` returned.

    ``keep_files``: carry the target's entries that are not weight files over into the new folder (the writer's
    files win); otherwise the new folder replaces the old one entirely. ``seal``: seal the ``model*.safetensors``
    files the writer wrote as one save. Nothing at ``target`` changes if ``write`` (or sealing) raises.
    """
    target = os.path.realpath(os.fspath(target))
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(errno.ENOTDIR, f"cannot save into {target}: it is a file, not a folder", target)
    exists = os.path.isdir(target)
    parent, name = os.path.split(target)
    if exists:
        _probe_writable(target)
    elif not os.path.isdir(parent):
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise type(exc)(
                exc.errno, f"cannot create the folder {parent} to save into: {exc.strerror}", parent
            ) from exc
    try:
        staging = tempfile.mkdtemp(prefix=f".{name}{STAGING_MARK}staging-", dir=parent)
    except OSError as exc:
        if not exists:
            raise PermissionError(
                exc.errno or errno.EACCES,
                f"cannot save into {target}: {parent} is not writable ({exc.strerror})",
                target,
            ) from exc
        return _write_in_place(write, target, keep_files, seal)
    carry = exists and keep_files
    try:
        result = _fill(staging, write, seal, carry_from=target if carry else None)
        if exists:
            _swap_in(staging, target)
        else:
            try:
                os.rename(staging, target)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                _swap_in(staging, target)  # another writer created the folder meanwhile: replace it the same way
            _fsync_path(parent)
    except BaseException:
        if os.path.isdir(staging) and os.path.realpath(staging) != target:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _fill(staging: str, write: Callable[[str], T], seal: bool, carry_from: str | None) -> T:
    """Write the complete new folder into ``staging``: carried-over files, the writer's, the seal; fsync'ed."""
    if carry_from is not None:
        _carry_over(carry_from, staging, precopy=True)
    result = write(staging)
    if seal:
        seal_folder(staging)
    if carry_from is not None:
        _carry_over(carry_from, staging, precopy=False)
    _fsync_tree(staging)
    return result


def _swap_in(staging: str, target: str) -> None:
    """Replace the folder ``target`` by ``staging`` in one step where possible, then delete the old one."""
    parent, name = os.path.split(target)
    if _exchange(staging, target):
        retired = staging  # the exchange put the old folder at the staging path
    else:
        retired = os.path.join(parent, f".{name}{STAGING_MARK}retired-{uuid.uuid4().hex[:8]}")
        os.rename(target, retired)
        os.rename(staging, target)
    _fsync_path(parent)
    shutil.rmtree(retired, ignore_errors=True)


def _write_in_place(write: Callable[[str], T], target: str, keep_files: bool, seal: bool) -> T:
    """Fallback when the parent is not writable: stage inside ``target`` and move entries in a safe order."""
    staging = tempfile.mkdtemp(prefix=f"{STAGING_MARK}staging-", dir=target)
    try:
        if keep_files:  # small files only: whatever is not copied stays in place, the moves below never touch it
            _carry_over(target, staging, precopy=True)
        result = write(staging)
        if seal:
            seal_folder(staging)
        _fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for stale in os.listdir(target):
        path = os.path.join(target, stale)
        if stale.startswith(STAGING_MARK) or not (is_weight_file(stale) or not keep_files):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)

    def order(entry: str) -> tuple[int, str]:
        if entry == CONFIG_NAME:
            return 0, entry
        if is_weight_file(entry):
            return (2 if entry.endswith(".index.json") else 1), entry
        return 3, entry

    for entry in sorted(os.listdir(staging), key=order):
        src, dst = os.path.join(staging, entry), os.path.join(target, entry)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        os.replace(src, dst)
    _fsync_path(target)
    shutil.rmtree(staging, ignore_errors=True)
    return result
