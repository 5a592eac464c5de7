"""Atomic, sealed ``save_pretrained`` for llmint8 models.

transformers writes a checkpoint in place: ``config.json`` first, then each shard, then the index. A save that is
killed halfway leaves a folder mixing the new config with old or missing weights, which can load as a wrong model
(a stale ``model.safetensors`` next to new shards is even preferred by the loader). hf_int8 installs this instead
on every llmint8 model:

1. the target folder, when it exists, must be writable (checked by creating a file in it, so it works as root);
2. everything is written into a staging folder next to the target (same parent, so same file system): the files of
   the target that are not weights are copied in first (README, tokenizer, ...), then transformers' save runs there,
   then every ``model*.safetensors`` file is sealed (see :mod:`hf_int8.integrity`) and everything is fsync'ed;
3. the staging folder replaces the target in one atomic step (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two
   renames, between which the target is briefly missing, never half-written); the old folder is then deleted.

Killed at any point, the target is either the complete old checkpoint or the complete new one; a leftover hidden
``.<name>.hf_int8-*`` sibling may remain and can be deleted. Weight files of the old checkpoint
(``model*.safetensors``, ``pytorch_model*.bin`` and their indexes) are replaced, never kept next to the new ones;
every other file and folder in the target is kept.

When the parent folder is not writable (the target is a mount point, say), the staging folder is created inside the
target instead and the files are moved in one by one: stale weights first, ``config.json`` next, weights, the index
last. A kill during those moves leaves a folder that fails to load with a clear error (missing or unsealed shards),
and the complete new save in the staging folder.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import shutil
import sys
import tempfile
import types
import uuid
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .integrity import seal_folder
from .nn import Int8Linear

STAGING_MARK = ".hf_int8-"
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model)([.\-].*)?\.(safetensors|bin)(\.index\.json)?$")
_PRECOPY_MAX_BYTES = 16 * 1024 * 1024
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def is_checkpoint_weight_file(name: str) -> bool:
    """Weight files (and their index) of a Transformers checkpoint, which a new save replaces."""
    return _WEIGHT_FILE.match(name) is not None


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
        if is_checkpoint_weight_file(name) or name.startswith(STAGING_MARK) or os.path.lexists(dst):
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


def atomic_save(write: Callable[[str], Any], save_directory: str | os.PathLike) -> Any:
    """Run ``write(folder)`` on a staging folder and make the result appear at ``save_directory`` atomically."""
    target = os.path.realpath(os.fspath(save_directory))
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
                exc.errno or errno.EACCES, f"cannot save into {target}: {parent} is not writable ({exc.strerror})",
                target,
            ) from exc
        return _save_in_place(write, target)
    try:
        if exists:
            _carry_over(target, staging, precopy=True)
        result = write(staging)
        seal_folder(staging)
        if exists:
            _carry_over(target, staging, precopy=False)
        _fsync_tree(staging)
        if exists:
            _swap_in(staging, target)
        else:
            try:
                os.rename(staging, target)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                _swap_in(staging, target)  # another save created the folder meanwhile: replace it the same way
            _fsync_path(parent)
    except BaseException:
        if os.path.isdir(staging) and os.path.realpath(staging) != target:
            shutil.rmtree(staging, ignore_errors=True)
        raise
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


def _save_in_place(write: Callable[[str], Any], target: str) -> Any:
    """Fallback when the parent is not writable: stage inside ``target`` and move files in a safe order."""
    staging = tempfile.mkdtemp(prefix=f"{STAGING_MARK}staging-", dir=target)
    try:
        _carry_over(target, staging, precopy=True)
        result = write(staging)
        seal_folder(staging)
        _fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for stale in os.listdir(target):
        if is_checkpoint_weight_file(stale) and os.path.isfile(os.path.join(target, stale)):
            os.remove(os.path.join(target, stale))

    def order(entry: str) -> tuple[int, str]:
        if entry == "config.json":
            return 0, entry
        if is_checkpoint_weight_file(entry):
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


def check_int8_layers(model: nn.Module) -> None:
    """Raise ``ValueError`` before anything is written if an Int8Linear of ``model`` could not be loaded back.

    Checks what the loader checks about each layer's tensors, short of reading every int8 code: the weight is int8
    ``[out, in]``, the scale float32 ``[out]``, finite and not negative. Casts of an llmint8 model are refused (see
    :mod:`hf_int8.nn.casts`), but a tensor replaced by hand (``layer.weight.data = w.half()``) would otherwise be
    saved, sealed, into a checkpoint that hf_int8 refuses to load.
    """
    problems = []
    for name, module in model.named_modules():
        if not isinstance(module, Int8Linear):
            continue
        codes, scale = module.weight, module.weight_scale
        if codes.dtype != torch.int8:
            problems.append(f"{name}.weight is {codes.dtype!r}, not torch.int8")
        shape = (module.out_features, module.in_features)
        if tuple(codes.shape) != shape:
            problems.append(f"{name}.weight has shape {tuple(codes.shape)}, not {shape}")
        if scale.dtype != torch.float32:
            problems.append(f"{name}.weight_scale is {scale.dtype!r}, not torch.float32")
        if tuple(scale.shape) != (module.out_features,):
            problems.append(f"{name}.weight_scale has shape {tuple(scale.shape)}, not ({module.out_features},)")
        elif scale.device.type != "meta" and scale.is_floating_point():  # meta: offloaded, the values are elsewhere
            bad = (~torch.isfinite(scale) | (scale < 0)).sum().item()
            if bad:
                problems.append(f"{name}.weight_scale holds {bad} NaN, infinite or negative scales")
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ValueError(
            f"refusing to save: {len(problems)} problem(s) in the Int8Linear layers, the checkpoint would not load "
            f"back (were their tensors replaced after loading?); nothing was written:\n  {shown}"
        )


_INNER = "_hf_int8_inner_save_pretrained"
_PUSH_KWARGS = ("commit_message", "commit_description", "create_pr", "private", "revision", "token")


def _atomic_save_pretrained(self: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    """``save_pretrained`` that never leaves a half-written checkpoint behind (see :mod:`hf_int8.saving`)."""
    inner = self.__dict__.get(_INNER) or functools.partial(type(self).save_pretrained, self)
    distributed = (
        args
        or kwargs.get("is_main_process", True) is False
        or kwargs.get("distributed_checkpoint", False)
        or getattr(self, "_hf_peft_config_loaded", False)
    )
    if not getattr(self, "_hf_peft_config_loaded", False):  # an adapter-only save writes no int8 layer
        check_int8_layers(self)
    if distributed:  # multi-process or adapter-only saves: transformers' own protocol, unchanged
        return inner(save_directory, *args, **kwargs)
    push = kwargs.pop("push_to_hub", False)
    result = atomic_save(lambda folder: inner(folder, **kwargs), save_directory)
    if push:
        repo_id = kwargs.get("repo_id") or os.path.basename(os.path.realpath(os.fspath(save_directory)))
        push_kwargs = {k: kwargs[k] for k in _PUSH_KWARGS if k in kwargs}
        if "max_shard_size" in kwargs:
            push_kwargs["max_shard_size"] = kwargs["max_shard_size"]
        self.push_to_hub(repo_id, **push_kwargs)
    return result


def install(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` atomic and sealed, wrapping whatever ``save_pretrained`` it has now."""
    current = model.__dict__.get("save_pretrained")
    if getattr(current, "__func__", None) is _atomic_save_pretrained:
        return
    if current is not None:
        model.__dict__[_INNER] = current
    model.save_pretrained = types.MethodType(_atomic_save_pretrained, model)


def uninstall(model: nn.Module) -> None:
    """Undo :func:`install` (the model's previous ``save_pretrained`` comes back)."""
    current = model.__dict__.get("save_pretrained")
    if getattr(current, "__func__", None) is _atomic_save_pretrained:
        del model.__dict__["save_pretrained"]
        inner = model.__dict__.pop(_INNER, None)
        if inner is not None:
            model.save_pretrained = inner
