"""Tests of gpumpiad.checkpoint: round trip, refusal of damaged or foreign files, atomicity, and
the collective (root reads/writes) variants."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from pytest_mpi import parallel_assert

import gpumpiad
from gpumpiad import checkpoint
from gpumpiad.checkpoint import CheckpointError


def _payload():
    return {
        "x": np.linspace(0.0, 1.0, 7),
        "m": np.arange(12, dtype=np.int32).reshape(3, 4),
        "z": np.array([1 + 2j, -3.5j], dtype=np.complex64),
        "flags": np.array([True, False]),
        "scalar": np.array(2.5),
        "empty": np.zeros((0, 3)),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "it": 7,
        "f": 0.1,
        "special": [math.inf, -math.inf],
        "name": "L-BFGS-B",
        "nested": {"a": [1, 2, {"b": None}]},
    }


def _check_equal(got, want):
    assert set(got) == set(want)
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            assert got[key].dtype == value.dtype, key
            assert got[key].shape == value.shape, key
            np.testing.assert_array_equal(got[key], value)
        else:
            assert got[key] == json.loads(json.dumps(value)), key


def test_round_trip(tmp_path):
    path = tmp_path / "state.ckpt"
    checkpoint.save(path, _payload())
    _check_equal(checkpoint.load(path), _payload())
    assert checkpoint.load(str(path))["f"] == 0.1


def test_nan_and_bit_exact_floats(tmp_path):
    path = tmp_path / "state.ckpt"
    x = np.array([np.nan, 1 / 3, np.nextafter(1.0, 2.0), -0.0, 5e-324])
    checkpoint.save(path, {"x": x, "nan": math.nan})
    got = checkpoint.load(path)
    assert got["x"].tobytes() == x.tobytes()
    assert math.isnan(got["nan"])


def test_overwrite_replaces(tmp_path):
    path = tmp_path / "state.ckpt"
    checkpoint.save(path, {"it": 1})
    checkpoint.save(path, {"it": 2})
    assert checkpoint.load(path) == {"it": 2}
    assert os.listdir(tmp_path) == ["state.ckpt"]


@pytest.mark.parametrize("keep", [0, 5, 16, 40, 63, -1])
def test_truncated(tmp_path, keep):
    path = tmp_path / "state.ckpt"
    checkpoint.save(path, _payload())
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(CheckpointError, match="truncated") as info:
        checkpoint.load(path)
    assert str(path) in str(info.value)


def test_every_flipped_byte_is_refused(tmp_path):
    path = tmp_path / "state.ckpt"
    checkpoint.save(path, {"x": np.arange(3.0), "it": 3})
    data = path.read_bytes()
    for i in range(len(data)):
        damaged = bytearray(data)
        damaged[i] ^= 0x10
        path.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError) as info:
            checkpoint.load(path)
        message = str(info.value)
        assert str(path) in message
        if i >= 60:  # past the prefix: the body
            assert "checksum" in message and "corrupt" in message


def test_trailing_bytes(tmp_path):
    path = tmp_path / "state.ckpt"
    checkpoint.save(path, {"it": 3})
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(path)


def test_wrong_version(tmp_path):
    path = tmp_path / "state.ckpt"
    path.write_bytes(checkpoint.encode({"it": 3}, version=checkpoint.FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError, match=r"wrong format version 2; this gpumpiad reads "
                                              r"version 1"):
        checkpoint.load(path)


@pytest.mark.parametrize("content", [b"hello world, not a checkpoint at all",
                                     b"\x93NUMPY\x01\x00v\x00{'descr': '<f8'"])
def test_foreign_file(tmp_path, content):
    path = tmp_path / "other.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a gpumpiad checkpoint"):
        checkpoint.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        checkpoint.load(tmp_path / "absent.ckpt")


def test_crash_before_rename_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.ckpt"
    checkpoint.save(path, {"it": 1, "x": np.ones(3)})

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(CheckpointError, match="previous file is intact"):
        checkpoint.save(path, {"it": 2, "x": np.zeros(3)})
    monkeypatch.undo()
    state = checkpoint.load(path)
    assert state["it"] == 1 and state["x"].tolist() == [1.0, 1.0, 1.0]
    assert os.listdir(tmp_path) == ["state.ckpt"]  # the temporary file is gone


def test_interrupt_during_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.ckpt"
    checkpoint.save(path, {"it": 1})

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"it": 2})
    monkeypatch.undo()
    assert checkpoint.load(path) == {"it": 1}
    assert os.listdir(tmp_path) == ["state.ckpt"]


def test_bad_payloads(tmp_path):
    path = tmp_path / "state.ckpt"
    with pytest.raises(CheckpointError, match="not JSON-able"):
        checkpoint.save(path, {"f": object()})
    with pytest.raises(CheckpointError, match="object arrays"):
        checkpoint.save(path, {"a": np.array([None, 1], dtype=object)})
    with pytest.raises(CheckpointError, match="keys must be str"):
        checkpoint.save(path, {1: 2})
    with pytest.raises(CheckpointError, match="must be a dict"):
        checkpoint.save(path, [1, 2])
    assert not path.exists()


@pytest.mark.parallel(nprocs=[1, 2, 3])
def test_collective_save_and_load(tmp_path):
    comm = gpumpiad.Comm()
    folder = comm.mpi.bcast(str(tmp_path) if comm.rank == 0 else None)
    path = os.path.join(folder, "shared.ckpt")
    # only the root's payload is written
    checkpoint.save(path, {"rank": comm.rank, "x": np.full(2, float(comm.rank))}, comm=comm)
    state = checkpoint.load(path, comm=comm)
    parallel_assert(state["rank"] == 0 and state["x"].tolist() == [0.0, 0.0])
    parallel_assert(checkpoint.exists(path, comm=comm))

    if comm.rank == 0:
        with open(path, "r+b") as f:
            f.seek(70)
            f.write(b"\xff")
    comm.mpi.Barrier()
    raised = None
    try:
        checkpoint.load(path, comm=comm)
    except CheckpointError as exc:
        raised = str(exc)
    parallel_assert(raised is not None and "checksum" in raised and "shared.ckpt" in raised,
                    f"rank {comm.rank}: {raised!r}")
