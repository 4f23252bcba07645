"""Atomic, verified checkpoint files: ``save`` a dict of arrays and metadata, ``load`` it back.

A checkpoint is one file::

    magic    16 bytes   b"GPUMPIAD-CKPT\\x00\\x00\\x00"
    version   4 bytes   format version, little-endian uint32 (this module writes 1)
    length    8 bytes   length of the body, little-endian uint64
    sha256   32 bytes   SHA-256 of version + length + body
    body                uint64 header length, JSON header, then the raw array bytes

The JSON header holds the metadata and, per array, its dtype, shape and offset. :func:`save`
writes a temporary file in the target's folder, fsyncs it, renames it over the target and fsyncs
the folder, so a crash leaves either the old checkpoint or the new one, never a mix.
:func:`load` checks the magic, length, checksum and version before it decodes anything.

With ``comm=``, both are collective: the root alone touches the file and every rank sees the
same outcome (the payload, or the same :class:`CheckpointError`). The file's write (with its
fsync) and read are ``checkpoint.write`` / ``checkpoint.read`` spans of
:data:`~gpumpiad.trace.STAGING` (host I/O) time.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile

import numpy

from . import control, trace
from .backend import is_device_array, to_numpy

FORMAT_VERSION = 1
MAGIC = b"GPUMPIAD-CKPT\x00\x00\x00"
_PREFIX = struct.Struct("<16sIQ32s")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt, of another format version or foreign."""


def save(path, payload, *, comm=None, root=0):
    """Write ``payload`` to ``path`` atomically, with a format version and a SHA-256 checksum.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint file. Its folder must exist.
    payload : dict
        ``str`` keys. NumPy (or CuPy) arrays are stored bit for bit and come back as NumPy
        arrays; any other value must be JSON-able and comes back as JSON decodes it (tuples
        as lists). Python floats, NaN and infinities round-trip exactly.
    comm : gpumpiad.Comm, optional
        When given, the call is collective: only ``root`` writes (its own ``payload``; the
        others' is ignored), and every rank raises if the write failed.
    root : int
        The writing rank when ``comm`` is given.

    Raises
    ------
    CheckpointError
        When the payload cannot be encoded or the file cannot be written; the old file at
        ``path``, if any, is left intact.

    Notes
    -----
    The temporary file is ``.<name>.<random>.tmp`` next to ``path`` (a rename is atomic only
    within one file system); it is removed on failure.

    Examples
    --------
    >>> import os, tempfile, numpy as np
    >>> from gpumpiad import checkpoint
    >>> path = os.path.join(tempfile.mkdtemp(), "state.ckpt")
    >>> checkpoint.save(path, {"x": np.arange(3.0), "it": 7})
    >>> state = checkpoint.load(path)
    >>> state["x"].tolist(), state["it"]
    ([0.0, 1.0, 2.0], 7)
    """
    path, comm = _check_path(path, comm, root, "save")
    if comm is None:
        _prefixed(_save, path, payload)
        return
    error = None
    if comm.rank == root:
        try:
            _save(os.fspath(path), payload)
        except CheckpointError as exc:
            error = str(exc)
    error = control.bcast(comm, error, root, "checkpoint.save")
    if error is not None:
        raise CheckpointError(f"rank {root}: {error}")


def load(path, *, comm=None, root=0):
    """Read a checkpoint written by :func:`save`, refusing anything not intact.

    Parameters
    ----------
    path : str or os.PathLike
    comm : gpumpiad.Comm, optional
        When given, the call is collective: ``root`` reads and broadcasts the payload, so the
        file need only be visible to the root.
    root : int

    Returns
    -------
    dict
        The payload: arrays as NumPy arrays, the rest as JSON decoded it.

    Raises
    ------
    CheckpointError
        Naming ``path`` and what is wrong: missing, not a gpumpiad checkpoint, truncated,
        checksum mismatch (corrupt), or a format version this gpumpiad does not read. Nothing
        is returned from a file that fails any check.

    Examples
    --------
    >>> import os, tempfile
    >>> from gpumpiad import checkpoint
    >>> path = os.path.join(tempfile.mkdtemp(), "junk.ckpt")
    >>> _ = open(path, "wb").write(b"hello")
    >>> checkpoint.load(path)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    gpumpiad.checkpoint.CheckpointError: ...junk.ckpt: not a gpumpiad checkpoint (foreign file...)
    """
    path, comm = _check_path(path, comm, root, "load")
    if comm is None:
        return _prefixed(_load, path)
    result = None
    if comm.rank == root:
        try:
            result = ("ok", _load(os.fspath(path)))
        except CheckpointError as exc:
            result = ("error", str(exc))
    status, value = control.bcast(comm, result, root, "checkpoint.load")
    if status == "error":
        raise CheckpointError(f"rank {root}: {value}")
    return value


def _check_path(path, comm, root, name):
    """Validate ``path`` and ``root`` (given alike on every rank): ``(path as str, Comm)``."""
    from .comm import resolve, world
    rank = world().rank
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"rank {rank}: checkpoint.{name}'s path must be a str or os.PathLike, "
                        f"got {type(path).__name__}")
    if comm is not None:
        comm = resolve(comm)
        if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < comm.size:
            raise ValueError(f"rank {rank}: checkpoint.{name}'s root must be an int in "
                             f"[0, {comm.size}), got {root!r}")
    return os.fspath(path), comm


def _prefixed(fn, *args):
    """``fn(*args)``, its CheckpointError naming this rank."""
    from .comm import world
    try:
        return fn(*args)
    except CheckpointError as exc:
        raise CheckpointError(f"rank {world().rank}: {exc}") from None


def exists(path, *, comm=None, root=0):
    """Whether a file is at ``path`` (decided by ``root`` and broadcast when ``comm`` is given).

    Examples
    --------
    >>> import gpumpiad
    >>> gpumpiad.checkpoint.exists("no/such/file.ckpt", comm=gpumpiad.Comm())
    False
    """
    if comm is None:
        return os.path.exists(path)
    return control.bcast(comm, os.path.exists(path) if comm.rank == root else None, root,
                         "checkpoint.exists")


def encode(payload, version=FORMAT_VERSION):
    """The bytes :func:`save` writes for ``payload`` (``version`` is for tests of old files).

    Examples
    --------
    >>> import numpy as np
    >>> from gpumpiad.checkpoint import decode, encode
    >>> decode(encode({"x": np.arange(3), "it": 2}))["x"].tolist()
    [0, 1, 2]
    """
    if not isinstance(payload, dict):
        raise CheckpointError(f"the payload must be a dict, got {type(payload).__name__}")
    meta, arrays, blobs, offset = {}, {}, [], 0
    for key, value in payload.items():
        if not isinstance(key, str):
            raise CheckpointError(f"payload keys must be str, got {key!r}")
        if isinstance(value, numpy.ndarray) or is_device_array(value):
            value = to_numpy(value)
            if not value.flags.c_contiguous:  # (ascontiguousarray would make a 0-d array 1-d)
                value = numpy.ascontiguousarray(value)
            if value.dtype.hasobject:
                raise CheckpointError(f"payload[{key!r}]: object arrays cannot be stored")
            arrays[key] = {"dtype": value.dtype.str, "shape": list(value.shape),
                           "offset": offset, "nbytes": value.nbytes}
            blobs.append(value.tobytes())
            offset += value.nbytes
        else:
            meta[key] = value
    try:
        header = json.dumps({"meta": meta, "arrays": arrays}).encode()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"payload metadata is not JSON-able: {exc}") from None
    body = struct.pack("<Q", len(header)) + header + b"".join(blobs)
    head = struct.pack("<IQ", version, len(body))
    return _PREFIX.pack(MAGIC, version, len(body), hashlib.sha256(head + body).digest()) + body


def decode(data, path="<bytes>"):
    """The payload in ``data`` (the bytes of a checkpoint file); raises :class:`CheckpointError`.

    Examples
    --------
    >>> from gpumpiad.checkpoint import decode, encode
    >>> data = encode({"it": 2})
    >>> decode(data)["it"]
    2
    >>> decode(data[:-1])
    Traceback (most recent call last):
    ...
    gpumpiad.checkpoint.CheckpointError: <bytes>: ...
    """
    if len(data) < len(MAGIC) and MAGIC.startswith(bytes(data)):
        raise CheckpointError(f"{path}: truncated: {len(data)} bytes, shorter than the "
                              f"{_PREFIX.size}-byte prefix")
    if data[:len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{path}: not a gpumpiad checkpoint (foreign file: the first "
                              f"bytes are {bytes(data[:16])!r}, expected {MAGIC!r})")
    if len(data) < _PREFIX.size:
        raise CheckpointError(f"{path}: truncated: {len(data)} bytes, shorter than the "
                              f"{_PREFIX.size}-byte prefix")
    _, version, length, digest = _PREFIX.unpack_from(data)
    body = data[_PREFIX.size:]
    if len(body) != length:
        what = "truncated" if len(body) < length else "corrupt (trailing bytes)"
        raise CheckpointError(f"{path}: {what}: the body has {len(body)} bytes, the prefix "
                              f"says {length}")
    if hashlib.sha256(struct.pack("<IQ", version, length) + body).digest() != digest:
        raise CheckpointError(f"{path}: corrupt: SHA-256 checksum mismatch")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: wrong format version {version}; this gpumpiad reads "
                              f"version {FORMAT_VERSION}")
    try:
        (hlen,) = struct.unpack_from("<Q", body)
        header = json.loads(bytes(body[8:8 + hlen]).decode())
        blob = body[8 + hlen:]
        payload = dict(header["meta"])
        for key, spec in header["arrays"].items():
            raw = blob[spec["offset"]:spec["offset"] + spec["nbytes"]]
            payload[key] = numpy.frombuffer(raw, dtype=numpy.dtype(spec["dtype"])).reshape(
                spec["shape"]).copy()
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        # The checksum matched, so the writer itself produced this: still refuse it whole.
        raise CheckpointError(f"{path}: corrupt: undecodable content ({exc})") from None
    return payload


def _save(path, payload):
    data = encode(payload)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                                   suffix=".tmp")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot create a temporary file in {folder}: {exc}") \
            from None
    try:
        with trace.span("checkpoint.write", trace.STAGING, len(data)), \
                os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise CheckpointError(f"{path}: write failed, the previous file is intact: {exc}") \
                from exc
        raise
    _fsync_folder(folder)


def _fsync_folder(folder):
    # Makes the rename itself durable; some file systems refuse to open a folder, which only
    # weakens durability against power loss, not atomicity.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _load(path):
    try:
        with trace.span("checkpoint.read", trace.STAGING), open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from None
    return decode(data, path)


__all__ = ["CheckpointError", "FORMAT_VERSION", "decode", "encode", "exists", "load", "save"]
