"""Integrity of checkpoint files on disk: safetensors structure checks and the llmint8 seal.

Two layers of protection, both run before a single weight reaches the model:

* **Structure** (every checkpoint, sealed or not): each file must be a well-formed safetensors file (header length
  within the file, a JSON header, known dtypes, ``shape`` matching the byte range, byte ranges that tile the data
  section exactly). Pickle (``torch.save``) files are refused, never unpickled.
* **Seal** (checkpoints written by hf_int8's ``save_pretrained``): the ``__metadata__`` of each safetensors file
  holds ``hf_int8.seal``, a JSON record of the save it belongs to (a random ``save_id`` and the names of all weight
  files of that save) and of every tensor in the file (dtype, shape and the CRC-32 of its bytes). On load, every
  file must carry a seal of the same save, the set of files must be exactly the sealed set, and every tensor must
  match its record: a flipped byte, a renamed or missing tensor, a stale shard from another save or a half-copied
  folder is refused with an error naming the file and the tensor.

CRC-32 detects accidental damage (disk, transfer, interrupted copies), not deliberate tampering.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ..nn import Int8Linear
from .format import SCALE_NAME, WEIGHT_NAME, is_weight_file, layer_problems

SEAL_KEY = "hf_int8.seal"
SEAL_VERSION = 1
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
HEADER_ALIGN = 8  # safetensors pads the header with spaces so the data section starts 8-byte aligned

# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
}
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


class CheckpointError(ValueError):
    """A checkpoint file is damaged, incomplete or not what it claims to be. The message names the file."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: ``begin``/``end`` are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class SafetensorsHeader:
    path: str
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and check the structure of a safetensors file; raise :class:`CheckpointError` naming what is wrong."""
    path = os.fspath(path)
    raw, size = _read_raw_header(path)
    data_start = 8 + len(raw)
    table, metadata = _parse_table(path, raw)
    tensors = {name: _tensor_entry(path, name, info, data_start) for name, info in table.items()}
    _check_tiling(path, tensors, data_start, size)
    return SafetensorsHeader(path, tensors, metadata, data_start, size)


def _read_raw_header(path: str) -> tuple[bytes, int]:
    """``(JSON header bytes, file size)``; pickle archives and truncated files are refused here."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if head.startswith(_PICKLE_MAGIC):
                raise CheckpointError(
                    f"{path} is a pickle/zip archive (torch.save output), not safetensors: llmint8 checkpoints are "
                    "safetensors only and pickle files are never loaded"
                )
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated: {size} bytes, not even a safetensors header length")
            n = struct.unpack("<Q", head)[0]
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path} is not a valid safetensors file (truncated?): its header claims {n} bytes but the file "
                    f"holds {size}"
                )
            return f.read(n), size
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint file {path}: {exc}") from exc


def _parse_table(path: str, raw: bytes) -> tuple[dict, dict[str, str]]:
    """``(tensor table, __metadata__)`` of the JSON header (duplicate keys and non-string metadata refused)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} has a damaged safetensors header (not valid JSON: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a damaged safetensors header: expected a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path} has a damaged safetensors header: __metadata__ must map strings to strings")
    return header, dict(metadata)


def _tensor_entry(path: str, name: str, info: object, data_start: int) -> TensorEntry:
    """One checked header entry: known dtype, valid shape and offsets, a byte range that fits dtype and shape."""
    what = f"tensor {name!r} in {path}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{what} has a damaged header entry: {info!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise CheckpointError(f"{what} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{what} has an invalid shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise CheckpointError(f"{what} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8 or end < begin or end - begin != bits // 8:
        raise CheckpointError(
            f"{what}: dtype {dtype} and shape {shape} need {bits / 8:g} bytes but data_offsets {offsets} span "
            f"{end - begin}"
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_tiling(path: str, tensors: dict[str, TensorEntry], data_start: int, size: int) -> None:
    """The tensors must tile the data section exactly: no gap, no overlap, nothing missing at the end."""
    position = data_start
    for entry in sorted(tensors.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            problem = "overlaps the previous tensor" if entry.begin < position else "leaves a gap before it"
            raise CheckpointError(f"tensor {entry.name!r} in {path} {problem} (damaged data_offsets)")
        position = entry.end
    if position != size:
        raise CheckpointError(
            f"{path} is truncated or has trailing bytes: its tensors need a data section of {position - data_start} "
            f"bytes, the file has {size - data_start}"
        )


# ---------------------------------------------------------------------------------------------------------------
# The seal
# ---------------------------------------------------------------------------------------------------------------
def _crc32s(path: str, entries: Iterable[TensorEntry]) -> dict[str, int]:
    """CRC-32 of each tensor's bytes, read through a memory map (no copy)."""
    entries = list(entries)
    out = {e.name: 0 for e in entries if e.begin == e.end}
    if len(out) == len(entries):
        return out
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            for e in entries:
                if e.end > e.begin:
                    out[e.name] = zlib.crc32(view[e.begin : e.end])
        finally:
            view.release()
    return out


def _seal_record(header: SafetensorsHeader, save_id: str, files: list[str]) -> dict:
    crcs = _crc32s(header.path, header.tensors.values())
    return {
        "version": SEAL_VERSION,
        "save_id": save_id,
        "file": os.path.basename(header.path),
        "files": sorted(files),
        "tensors": {name: [e.dtype, list(e.shape), crcs[name]] for name, e in sorted(header.tensors.items())},
    }


def _write_with_metadata(header: SafetensorsHeader, metadata: dict[str, str]) -> None:
    """Rewrite ``header.path`` with new ``__metadata__`` (same tensors, same bytes), atomically and durably."""
    table: dict = {"__metadata__": metadata}
    for name, e in sorted(header.tensors.items(), key=lambda kv: kv[1].begin):
        table[name] = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "data_offsets": [e.begin - header.data_start, e.end - header.data_start],
        }
    raw = json.dumps(table, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % HEADER_ALIGN)
    staging = header.path + ".hf_int8-sealing"
    with open(header.path, "rb") as src, open(staging, "wb") as dst:
        dst.write(struct.pack("<Q", len(raw)))
        dst.write(raw)
        src.seek(header.data_start)
        remaining = header.file_size - header.data_start
        while remaining:
            chunk = src.read(min(remaining, 16 * 1024 * 1024))
            if not chunk:
                raise CheckpointError(f"{header.path} shrank while it was being sealed")
            dst.write(chunk)
            remaining -= len(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(staging, header.path)


def seal_folder(folder: str | os.PathLike) -> str:
    """Seal every ``model*.safetensors`` file of ``folder`` as one save; return the new ``save_id``.

    Used by :func:`hf_int8.checkpoint.staging.write_folder` on its staging folder; also usable on any folder of
    safetensors weights (e.g. one written by another tool) to give it the same protection on load.
    """
    folder = os.fspath(folder)
    files = sorted(
        f
        for f in os.listdir(folder)
        if is_weight_file(f, shards_only=True) and os.path.isfile(os.path.join(folder, f))
    )
    if not files:
        raise CheckpointError(f"{folder} holds no model*.safetensors file to seal")
    save_id = uuid.uuid4().hex
    for name in files:
        header = read_header(os.path.join(folder, name))
        metadata = dict(header.metadata)
        metadata[SEAL_KEY] = json.dumps(_seal_record(header, save_id, files), separators=(",", ":"))
        _write_with_metadata(header, metadata)
    return save_id


@dataclass
class CheckpointSummary:
    """What :func:`check_checkpoint_files` found: the headers, and whether the files were sealed."""

    headers: list[SafetensorsHeader]
    sealed: bool
    save_id: str | None

    def tensor_index(self) -> dict[str, tuple[str, TensorEntry]]:
        """``{tensor name: (file path, entry)}`` over all files."""
        return {name: (h.path, e) for h in self.headers for name, e in h.tensors.items()}


def _parse_seal(header: SafetensorsHeader) -> dict | None:
    text = header.metadata.get(SEAL_KEY)
    if text is None:
        return None
    try:
        seal = json.loads(text)
        ok = (
            isinstance(seal, dict)
            and seal.get("version") == SEAL_VERSION
            and isinstance(seal.get("save_id"), str)
            and isinstance(seal.get("file"), str)
            and isinstance(seal.get("files"), list)
            and all(isinstance(f, str) for f in seal["files"])
            and isinstance(seal.get("tensors"), dict)
        )
    except ValueError:
        ok = False
    if not ok:
        raise CheckpointError(f"{header.path} carries a damaged hf_int8 seal ({SEAL_KEY} in its safetensors metadata)")
    return seal


def check_checkpoint_files(paths: Iterable[str | os.PathLike], verify_data: bool = True) -> CheckpointSummary:
    """Check the structure of every file and, when sealed, that they form one complete, undamaged save.

    Raises :class:`CheckpointError` naming the file (and the tensor) at the first problem. Files that are not
    safetensors (``.bin``, ``.pt``, ...) are refused: only safetensors checkpoints are checked and accepted.
    """
    files: list[str] = [os.fspath(p) for p in paths]
    for path in files:
        if not path.endswith(".safetensors"):
            raise CheckpointError(
                f"{path} is not a safetensors file: llmint8 checkpoints are safetensors only and pickle files "
                "(.bin/.pt) are never loaded"
            )
    headers = [read_header(p) for p in files]
    found = [_parse_seal(h) for h in headers]
    seals = [s for s in found if s is not None]
    if not seals:
        return CheckpointSummary(headers, sealed=False, save_id=None)
    if len(seals) != len(headers):
        unsealed = [h.path for h, s in zip(headers, found, strict=True) if s is None]
        raise CheckpointError(
            f"checkpoint mixes sealed and unsealed files: {unsealed} carry no hf_int8 seal (files from another save?)"
        )
    first = seals[0]
    names = sorted(os.path.basename(p) for p in files)
    for header, seal in zip(headers, seals, strict=True):
        base = os.path.basename(header.path)
        if seal["save_id"] != first["save_id"]:
            raise CheckpointError(
                f"{header.path} belongs to another save than {headers[0].path} (stale or mixed-in shard): save ids "
                f"{seal['save_id']} and {first['save_id']}"
            )
        if seal["file"] != base:
            raise CheckpointError(f"{header.path} was saved as {seal['file']!r} (renamed or swapped shard)")
        if sorted(seal["files"]) != names:
            missing = sorted(set(seal["files"]) - set(names))
            extra = sorted(set(names) - set(seal["files"]))
            raise CheckpointError(
                f"{header.path} was saved with the files {sorted(seal['files'])}, but the checkpoint has {names} "
                f"(missing {missing}, unexpected {extra}): incomplete or mixed checkpoint"
            )
        recorded = seal["tensors"]
        for name in header.tensors.keys() - recorded.keys():
            raise CheckpointError(f"tensor {name!r} in {header.path} is not in its seal (renamed or added tensor)")
        for name in recorded.keys() - header.tensors.keys():
            raise CheckpointError(f"tensor {name!r} is missing from {header.path} (its seal lists it)")
        crcs = _crc32s(header.path, header.tensors.values()) if verify_data else {}
        for name, entry in header.tensors.items():
            record = recorded[name]
            if not (isinstance(record, list) and len(record) == 3):
                raise CheckpointError(f"{header.path} carries a damaged seal entry for tensor {name!r}")
            dtype, shape, crc = record
            if dtype != entry.dtype or shape != list(entry.shape):
                raise CheckpointError(
                    f"tensor {name!r} in {header.path} is {entry.dtype} {list(entry.shape)} but was saved as "
                    f"{dtype} {shape} (damaged header)"
                )
            if verify_data and crcs[name] != crc:
                raise CheckpointError(
                    f"tensor {name!r} in {header.path} is damaged: its bytes do not match the checksum written when "
                    "it was saved"
                )
    return CheckpointSummary(headers, sealed=True, save_id=first["save_id"])


# ---------------------------------------------------------------------------------------------------------------
# Checks of a checkpoint against the model it is about to be loaded into
# ---------------------------------------------------------------------------------------------------------------
def _resolve_module(model: nn.Module, prefix: str) -> nn.Module | None:
    """The submodule a checkpoint key prefix names, allowing for a base-model prefix added or removed."""
    base = getattr(model, "base_model_prefix", "") or ""
    candidates = [prefix]
    if base and prefix.startswith(base + "."):
        candidates.append(prefix[len(base) + 1 :])
    elif base:
        candidates.append(f"{base}.{prefix}" if prefix else base)
    for candidate in candidates:
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def check_llmint8_layout(
    summary: CheckpointSummary,
    model: nn.Module,
    *,
    tied_keys: dict[str, str] | None = None,
    ignore_missing: Iterable[str] = (),
) -> None:
    """Refuse a pre-quantized checkpoint whose tensors do not fit the int8 layers of ``model`` (before loading).

    Every int8 layer needs its tensors, by the rules of :func:`hf_int8.checkpoint.format.layer_problems` (checked on
    the header entries); an int8 tensor or a scale for a layer kept in floating point means the checkpoint and the
    config disagree (``skip_modules`` edited?); and every other tensor of the model must be there, except those tied
    to one that is (``tied_keys``: target -> source) or matched by a regex of ``ignore_missing``. All problems are
    reported at once, naming file and tensor.
    """
    index = summary.tensor_index()
    problems: list[str] = []
    layers: dict[str, dict[str, TensorEntry]] = {}
    modules: dict[str, Int8Linear] = {}
    for name, (path, entry) in sorted(index.items()):
        prefix, _, leaf = name.rpartition(".")
        module = _resolve_module(model, prefix)
        if module is None:
            continue  # unexpected keys are transformers' business (it reports them)
        if not isinstance(module, Int8Linear):
            if leaf == SCALE_NAME or (leaf == WEIGHT_NAME and entry.dtype in ("I8", "U8")):
                problems.append(
                    f"{name} in {os.path.basename(path)} is an llmint8 "
                    f"{'scale' if leaf == SCALE_NAME else 'int8 weight'}, but {prefix} is kept in floating point by "
                    "this config (skip_modules edited?)"
                )
            continue
        layers.setdefault(prefix, {})[leaf] = entry
        modules[prefix] = module
    for prefix, entries in layers.items():  # a layer with no key at all is reported after loading
        missing = [leaf for leaf in (WEIGHT_NAME, SCALE_NAME) if leaf not in entries]
        problems.extend(
            f"{prefix}.{leaf} is missing from the checkpoint (its other tensors are there)" for leaf in missing
        )
        if not missing:
            module = modules[prefix]
            found = layer_problems(
                prefix, entries[WEIGHT_NAME], entries[SCALE_NAME], module.out_features, module.in_features
            )
            path = os.path.basename(index[f"{prefix}.{WEIGHT_NAME}"][0])
            problems.extend(f"{problem} (in {path})" for problem in found)
    problems.extend(_missing_keys(model, index.keys(), tied_keys or {}, list(ignore_missing)))
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        files = sorted({os.path.basename(h.path) for h in summary.headers})
        raise CheckpointError(
            f"llmint8 checkpoint {files} does not fit the model, {len(problems)} problem(s):\n  {shown}{more}"
        )


def _missing_keys(model: nn.Module, present_keys: Iterable[str], tied: dict[str, str], ignore: list[str]) -> list[str]:
    """Model tensors a complete checkpoint must hold but these files lack (tied and ignorable keys excepted).

    transformers would initialize such tensors randomly with only a warning: for a saved llmint8 model that is an
    incomplete checkpoint, never a valid one.
    """
    base = getattr(model, "base_model_prefix", "") or ""
    present = set()
    for key in present_keys:
        present.add(key)
        if base and key.startswith(base + "."):
            present.add(key[len(base) + 1 :])
        elif base:
            present.add(f"{base}.{key}")
    pattern = re.compile("|".join(f"({p})" for p in ignore)) if ignore else None
    missing = []
    for key in model.state_dict().keys():
        if key in present or (pattern is not None and pattern.search(key)):
            continue
        source = tied.get(key)
        if source is not None and source in present:
            continue
        if any(target in present for target, src in tied.items() if src == key):
            continue
        missing.append(f"{key} is missing from the checkpoint (incomplete or damaged checkpoint)")
    return missing
