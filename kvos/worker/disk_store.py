"""The disk tier's files: one KV block per file, named by its digest, checked on every read.

    DIR/kvos.lock              flock'd by the engine that owns DIR (a second engine gets DiskTierInUseError)
    DIR/<digest hex>.kv        header (magic, JSON: layout, shape, dtype, block size, key, CRC-32) + payload
    DIR/<digest hex>.kv.tmp-*  a write in progress; renamed into place when complete, removed at open

A file's name is its block's digest (`kvos.memory.block_hash`), which is
rooted in the model's identity, dtype, block size and KV layout version, so
a directory outlives the engine: the next start lists the files and finds
them by digest again. The header repeats all of that, plus a CRC-32 of the
payload; a read checks the file's size, the header (against this engine's
shape and the key asked for) and the checksum, and refuses the block
otherwise (`CorruptBlockError`): the caller recomputes, it never attends to
bad KV.

Writes are atomic: a temporary file, then `os.replace`. A process killed
mid-write leaves a temporary file (removed at the next open) and loses only
that block; the tier has no index file to tear, since the directory listing
is the index. The data is not fsync'd: a write costs a copy into the page
cache, not a disk flush in the step. A power cut can therefore leave a
renamed file whose data never reached the disk; its size or checksum then
fails and the block is discarded, like any corrupted block.

The payload is every layer's K and V for the block's tokens:
`[num_layers, 2, block_size, num_kv_heads, head_dim]` in the model's dtype.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from kvos.core.plan import LoadFromDisk, SaveToDisk
from kvos.errors import DiskTierInUseError
from kvos.memory.block_hash import LAYOUT_VERSION
from kvos.memory.shape import KVShape

logger = logging.getLogger(__name__)

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]

MAGIC = b"KVOSBLK\0"
FILE_VERSION = 1
_NAME = re.compile(r"^([0-9a-f]{64})\.kv$")
_TMP = re.compile(r"^[0-9a-f]{64}\.kv\.tmp-")


class CorruptBlockError(Exception):
    """A disk block failed a check (size, header or checksum); `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class OpenedDir:
    """What the store found when it opened its directory."""

    present: list[bytes]
    """Keys of the blocks on disk, least recently written first (within the capacity)."""
    num_torn: int
    """Block files removed because their size was wrong (cut short, or another shape's)."""
    num_excess: int
    """The oldest block files removed because the tier is now smaller than what was on disk."""


class DiskKVStore:
    """Reads and writes one directory of KV block files for one model's KV shape and block size."""

    def __init__(self, path: str, capacity_bytes: int, block_size: int, shape: KVShape) -> None:
        self.path = Path(path)
        self.block_size = block_size
        self.shape = shape
        self._payload_shape = (shape.num_layers, 2, block_size, shape.num_kv_heads, shape.head_dim)
        element = torch.empty((), dtype=shape.dtype).element_size()
        self.payload_bytes = shape.num_layers * 2 * block_size * shape.num_kv_heads * shape.head_dim * element
        self.file_bytes = len(self._header(bytes(32), 0)) + self.payload_bytes
        self.num_blocks = capacity_bytes // self.file_bytes
        if self.num_blocks < 1:
            raise ValueError(f"kv_disk_bytes of {capacity_bytes} is below one block file ({self.file_bytes} bytes)")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.path / "kvos.lock", "a+")  # noqa: SIM115 - held until close()
        except OSError as exc:
            raise ValueError(f"cannot open the disk KV tier at {self.path}: {exc}") from exc
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock.close()
            raise DiskTierInUseError(
                f"the disk KV tier at {self.path} is in use by another kvos engine (it holds "
                f"{self.path / 'kvos.lock'}); give each engine its own kv_disk_path"
            ) from exc
        self.opened = self._open_dir()

    def _header(self, key: bytes, crc: int) -> bytes:
        meta = {
            "version": FILE_VERSION,
            "layout": LAYOUT_VERSION,
            "key": key.hex(),
            "shape": list(self._payload_shape),
            "dtype": str(self.shape.dtype),
            "crc32": f"{crc:08x}",
        }
        text = json.dumps(meta, sort_keys=True).encode()
        return MAGIC + struct.pack("<I", len(text)) + text

    def _file(self, key: bytes) -> Path:
        return self.path / f"{key.hex()}.kv"

    def _open_dir(self) -> OpenedDir:
        """List the blocks on disk (oldest first); remove temporaries, wrong-sized files and the excess."""
        found: list[tuple[int, bytes]] = []
        discarded = 0
        for entry in os.scandir(self.path):
            if _TMP.match(entry.name):
                os.unlink(entry.path)  # a write that never completed
                continue
            match = _NAME.match(entry.name)
            if match is None:
                continue
            stat = entry.stat()
            if stat.st_size != self.file_bytes:
                os.unlink(entry.path)
                discarded += 1
                continue
            found.append((stat.st_mtime_ns, bytes.fromhex(match.group(1))))
        found.sort()
        excess = max(len(found) - self.num_blocks, 0)
        for _, key in found[:excess]:
            self._file(key).unlink(missing_ok=True)
        if discarded:
            logger.warning("disk KV tier at %s: removed %d torn or foreign block files", self.path, discarded)
        return OpenedDir([key for _, key in found[excess:]], discarded, excess)

    # -- operations a plan asks for ----------------------------------------------------

    def drop(self, key: bytes) -> None:
        self._file(key).unlink(missing_ok=True)

    def save(self, caches: dict[str, KVCaches], op: SaveToDisk) -> None:
        """Write the block's KV to its file, atomically (temporary file, then rename). Raises OSError."""
        rows = slice(op.block_id * self.block_size, (op.block_id + 1) * self.block_size)
        block = torch.stack([torch.stack((k[rows], v[rows])) for k, v in caches[op.tier]])
        payload = block.cpu().contiguous().view(torch.uint8).numpy().tobytes()
        final = self._file(op.key)
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(self._header(op.key, zlib.crc32(payload)))
                f.write(payload)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load(self, caches: dict[str, KVCaches], op: LoadFromDisk) -> None:
        """Check the block's file and copy its KV into the target block; CorruptBlockError or
        FileNotFoundError when it cannot be used (nothing is copied then)."""
        data = self._file(op.key).read_bytes()
        if len(data) != self.file_bytes:
            raise CorruptBlockError(f"size {len(data)} != {self.file_bytes}")
        header = self._header(op.key, 0)
        if data[: len(MAGIC)] != MAGIC:
            raise CorruptBlockError("bad magic")
        (length,) = struct.unpack_from("<I", data, len(MAGIC))
        start = len(MAGIC) + 4
        if start + length != len(header):
            raise CorruptBlockError("bad header length")
        try:
            meta = json.loads(data[start : start + length])
        except ValueError as exc:
            raise CorruptBlockError("unreadable header") from exc
        expected = json.loads(header[start:])
        crc = meta.pop("crc32", None) if isinstance(meta, dict) else None
        expected.pop("crc32")
        if meta != expected:
            raise CorruptBlockError("header does not match this engine or key")
        payload = data[len(header) :]
        if crc != f"{zlib.crc32(payload):08x}":
            raise CorruptBlockError("checksum mismatch")
        flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        block = flat.view(self.shape.dtype).view(self._payload_shape)
        rows = slice(op.block_id * self.block_size, (op.block_id + 1) * self.block_size)
        for (k, v), layer in zip(caches[op.tier], block):
            k[rows].copy_(layer[0])
            v[rows].copy_(layer[1])

    def close(self) -> None:
        """Release the directory's lock (safe to call twice)."""
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
