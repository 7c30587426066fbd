"""Copy byte ranges file to file without passing them through this process's memory.

``copy_ranges(dst_fd, at, ranges)`` writes ``ranges`` (``(src_fd, offset, length)``; a ``None``
source means zeros) one after the other at offset ``at`` of ``dst_fd``. It uses
``os.copy_file_range``: the kernel copies page cache to page cache (or the file system clones
blocks), which measured here ~0.45 s for 1.79 GB against ~1.4 s for reading the same tensors
into memory and writing them back. Where the kernel refuses (another file system type, an old
kernel, a special file), it falls back to positioned reads and writes through one bounded
buffer. What it leaves out: durability (the caller fsyncs) and any notion of tensors.
"""
from __future__ import annotations

import errno
import os
from typing import Iterable, Optional

CHUNK = 64 << 20  # bytes per fallback read/write and per zero-fill write
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM}


class ShortSourceError(OSError):
    """The source ended before the range did (the file changed or is truncated)."""


def copy_ranges(dst_fd: int, at: int, ranges: Iterable[tuple[Optional[int], int, int]]) -> int:
    """Write the ranges back to back at ``at``; returns the number of bytes written."""
    start = at
    for src_fd, offset, length in ranges:
        if src_fd is None:
            _zeros(dst_fd, at, length)
        else:
            _copy(src_fd, offset, dst_fd, at, length)
        at += length
    return at - start


def _copy(src_fd: int, offset: int, dst_fd: int, at: int, length: int) -> None:
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src_fd, dst_fd, length - done, offset + done, at + done)
        except OSError as err:
            if err.errno not in _NO_KERNEL_COPY:
                raise
            _copy_through_buffer(src_fd, offset + done, dst_fd, at + done, length - done)
            return
        if n == 0:
            raise ShortSourceError(errno.EIO, f"source ended {length - done} bytes early (offset {offset + done})")
        done += n


def _copy_through_buffer(src_fd: int, offset: int, dst_fd: int, at: int, length: int) -> None:
    buf = memoryview(bytearray(min(CHUNK, length)))
    done = 0
    while done < length:
        n = os.preadv(src_fd, [buf[: min(len(buf), length - done)]], offset + done)
        if n == 0:
            raise ShortSourceError(errno.EIO, f"source ended {length - done} bytes early (offset {offset + done})")
        _pwrite_all(dst_fd, buf[:n], at + done)
        done += n


def _zeros(dst_fd: int, at: int, length: int) -> None:
    zero = memoryview(bytes(min(CHUNK, length)))
    done = 0
    while done < length:
        n = min(len(zero), length - done)
        _pwrite_all(dst_fd, zero[:n], at + done)
        done += n


def _pwrite_all(fd: int, data: memoryview, at: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, at)
        data, at = data[n:], at + n


class Writeback:
    """Start writing each finished tensor to disk while the next one is copied
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``: no waiting, durability still comes from the final
    fsync), so the disk is busy from the first byte instead of from the kernel's dirty threshold
    on, and the final fsync waits for the tail only. Measured on 7.5 GB of Qwen3-MoE shapes, 5
    interleaved runs each on a shared machine: hf2mcore median 7.7 s wall vs 8.1 s without. Used
    by hf2mcore's ``.distcp`` writer and by ``StreamingSafetensors`` (mcore2hf). A no-op where libc
    has no ``sync_file_range`` (not Linux)."""

    _call = None

    def __init__(self, path):
        self._fd, self._done = os.open(path, os.O_RDONLY), os.path.getsize(path)
        if Writeback._call is None:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            fn = getattr(libc, "sync_file_range", None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            Writeback._call = fn or False

    def upto(self, end: int) -> None:
        if Writeback._call and end > self._done:  # a hint: its result is not needed (fsync follows)
            Writeback._call(self._fd, self._done, end - self._done, 2)  # 2: SYNC_FILE_RANGE_WRITE
            self._done = end

    def __enter__(self):
        return self

    def close(self) -> None:
        os.close(self._fd)

    def __exit__(self, *exc):
        self.close()
        return False
