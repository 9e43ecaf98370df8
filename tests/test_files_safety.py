"""A loaded file never crashes the process, malformed input is a FormatError at
bounded cost, writes are durable and atomic and honour the umask (issue 7,
sections 2-4 for the file layer)."""

import json
import os
import signal
import stat
import struct
import subprocess
import sys

import numpy as np
import pbcodec
import pytest
from pbcodec import files
from pbcodec import reference as ref

LINUX = sys.platform.startswith("linux")


def write_sample(p, n=64):
    rng = np.random.default_rng(0)
    t = pbcodec.compress(rng.standard_normal((n, 128)).astype(np.float32), salient=0.2)
    pbcodec.save_file({"w": t, "b": rng.standard_normal(4096).astype(np.float32)}, p)
    return t


# -- section 2: no SIGBUS ------------------------------------------------------------
TOUCH_AFTER_TRUNCATE = """
import os, sys, numpy as np, pbcodec
p, mmap = sys.argv[1], sys.argv[2] == "1"
got = pbcodec.load_file(p, mmap=mmap)
os.truncate(p, 0)  # another process truncates (or rewrites) the file
total = float(np.sum(got["b"])) + float(np.sum(got["w"].decompress()))
print("survived", total)
"""


@pytest.mark.skipif(not LINUX, reason="SIGBUS semantics of truncated mappings are Linux's")
def test_truncation_after_load_cannot_crash_the_default_loader(tmp_path):
    p = tmp_path / "m.safetensors"
    write_sample(p)
    r = subprocess.run([sys.executable, "-c", TOUCH_AFTER_TRUNCATE, str(p), "0"], capture_output=True, timeout=120)
    assert r.returncode == 0 and b"survived" in r.stdout, r.stderr
    # The documented hazard of the opt-in: with mmap=True the same access is fatal.
    write_sample(p)
    r = subprocess.run([sys.executable, "-c", TOUCH_AFTER_TRUNCATE, str(p), "1"], capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGBUS


def test_truncation_while_loading_is_a_format_error(tmp_path, monkeypatch):
    p = tmp_path / "m.safetensors"
    write_sample(p)
    size = p.stat().st_size
    real = files._read_data

    def cut_then_read(f, start, length, path):
        os.truncate(p, size - 1000)  # shrinks after the header was validated
        return real(f, start, length, path)

    monkeypatch.setattr(files, "_read_data", cut_then_read)
    with pytest.raises(pbcodec.FormatError, match="truncated while loading"):
        pbcodec.load_file(p)

    write_sample(p)

    def grow_then_read(f, start, length, path):
        with open(p, "ab") as g:
            g.write(b"\0" * 8)
        return real(f, start, length, path)

    monkeypatch.setattr(files, "_read_data", grow_then_read)
    with pytest.raises(pbcodec.FormatError, match="changed size"):
        pbcodec.load_file(p)


STRESS = """
import os, sys, threading, pbcodec
p = sys.argv[1]
good = open(p, "rb").read()
stop = False
def vandal():
    i = 0
    while not stop:
        i += 1
        with open(p, "r+b") as f:  # in place, like a writer that does not rename
            f.truncate((i * 7919) % len(good))
            f.seek(0)
            f.write(good)
threading.Thread(target=vandal, daemon=True).start()
outcomes = {"ok": 0, "FormatError": 0}
for _ in range(300):
    try:
        got = pbcodec.load_file(p)
        got["w"].decompress()
        outcomes["ok"] += 1
    except pbcodec.FormatError:
        outcomes["FormatError"] += 1
stop = True
print(outcomes)
"""


@pytest.mark.skipif(not LINUX, reason="SIGBUS semantics of truncated mappings are Linux's")
def test_truncation_during_load_stress_never_kills_the_process(tmp_path):
    p = tmp_path / "m.safetensors"
    write_sample(p, n=16)
    r = subprocess.run([sys.executable, "-c", STRESS, str(p)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr  # any other exception type or a signal fails here
    assert "FormatError" in r.stdout


# -- section 3: malformed input is a FormatError ----------------------------------------
def header_file(p, header):
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    p.write_bytes(struct.pack("<Q", len(hb)) + hb)


@pytest.mark.parametrize(
    "header",
    [
        b"[" * 100_000,
        b'{"x":' * 100_000,
        b'{"x":{"dtype":' + b"[" * 100_000,
        {"x": {"dtype": [], "shape": [1], "data_offsets": [0, 1]}},
        {"x": {"dtype": "U8", "shape": [0, 2**63], "data_offsets": [0, 0]}},
        {"x": {"dtype": "U8", "shape": [0, 2**64 - 1], "data_offsets": [0, 0]}},
        {"x": {"dtype": "U8", "shape": [0, 2**64], "data_offsets": [0, 0]}},
        {"x": {"dtype": "F32", "shape": [0, 2**61], "data_offsets": [0, 0]}},
        {"x": {"dtype": "U8", "shape": [1] * 33, "data_offsets": [0, 1]}},
        {"x": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}},
        {"x": {"dtype": "U8", "shape": [1.0], "data_offsets": [0, 1]}},
        {"x": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}},
        {"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}},
        {"x": {"dtype": "U8", "shape": [1], "data_offsets": [1, 0]}},
        {"x": {"dtype": "U8", "shape": [1], "data_offsets": None}},
        {"x": {"dtype": "U8", "shape": {}, "data_offsets": [0, 1]}},
        {"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "extra": 0}},
        {"x": None},
        {"x": []},
        {"__metadata__": []},
        {"__metadata__": {"a": {"b": "c"}}},
        {"__metadata__": {"pbcodec": "[]"}},
        {"__metadata__": {"pbcodec": '{"w": []}'}},
        {"__metadata__": {"pbcodec": '{"w": {"codec": "pbcodec.pb", "shape": [[1]]}}'}},
        {"__metadata__": {"pbcodec": '{"w": {"codec": "pbcodec.pb", "version": 1, "shape": [1, 8]}}'}},
        b'{"x":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"x":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}',
        b"\xff\xfe{}",
        b"",
        b"{}   x",
    ],
)
def test_malformed_headers_raise_format_error(tmp_path, header):
    p = tmp_path / "h.safetensors"
    header_file(p, header)
    with pytest.raises(pbcodec.FormatError):
        pbcodec.load_file(p)
    with pytest.raises(pbcodec.FormatError):
        ref.load_file(p)


def _pb_blob(m, n, g=1):
    rle = struct.pack("<4sHBBBBHI", b"PBRL", 1, 4, 8, 2, 4, 0, 0) + struct.pack("<QQQQ", m, n, 0, 0)
    rle += ref.crc32c(rle).to_bytes(4, "little")
    body = struct.pack("<4sHBBQQQQ", b"PBTN", 1, 1, 16, m, n, g, len(rle)) + rle
    return body + ref.crc32c(body).to_bytes(4, "little"), rle


def test_huge_declared_shapes_are_format_errors():
    blob, _ = _pb_blob(0, 2**63)
    assert len(blob) == 96
    for parse in (pbcodec.PBTensor.from_bytes, ref.PBTensor.from_bytes):
        with pytest.raises(pbcodec.FormatError, match="too large"):
            parse(blob)
    for dims in [(0, 2**64 - 1), (0, 2**63), (2**32, 2**31, 0)]:
        rle = struct.pack("<4sHBBBBHI", b"PBRL", 1, 4, 8, len(dims), 4, 0, 0)
        rle += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<QQ", 0, 0)
        rle += ref.crc32c(rle).to_bytes(4, "little")
        for parse in (pbcodec.RLE.from_bytes, ref.RLE.from_bytes):
            with pytest.raises(pbcodec.FormatError, match="too large"):
                parse(rle)
    # The largest shapes that are allowed still parse and decode (no elements).
    ok, _ = _pb_blob(0, 2**60 - 1)
    t = pbcodec.PBTensor.from_bytes(ok)
    assert t.shape == (0, 2**60 - 1) and ref.PBTensor.from_bytes(ok).to_bytes() == ok
    # A hand-built RLE object with an impossible shape: FormatError from rle_decode too.
    r = pbcodec.RLE((0, 2**64 - 1), 4, 8, np.zeros(0, np.uint8), np.zeros(0, np.int8), [0], [0])
    with pytest.raises(pbcodec.FormatError):
        pbcodec.rle_decode(r)


BOMBS = {
    "empty objects": lambda k: "{" + ",".join(f'"a{i}":{{}}' for i in range(k // 8)) + "}",
    "nested arrays": lambda k: "[" * k,
    "unknown fields": lambda k: '{"x":{' + ",".join(f'"k{i}":0' for i in range(k // 9)) + "}}",
    "long shape": lambda k: '{"x":{"dtype":"U8","shape":[' + "0," * (k // 2) + '0],"data_offsets":[0,0]}}',
    "deep descriptions": lambda k: json.dumps({"__metadata__": {"pbcodec": '{"w":{"codec":' + "[" * (k - 40)}}),
}
PEAK = """
import sys, pbcodec
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current size
before = hwm()
try:
    pbcodec.load_file(sys.argv[1])
except pbcodec.FormatError:
    pass
print(hwm() - before)
"""


@pytest.mark.skipif(not LINUX or not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak RSS")
@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_malformed_headers_cost_about_their_size(tmp_path, bomb):
    """A header of 8 MiB of empty objects, nested arrays, unknown fields... is rejected
    at its first wrong value: the peak memory grows by the header's own bytes (read,
    then held as the metadata string that is itself parsed: at most three copies), not
    by the 26x a general JSON parse cost."""
    p = tmp_path / "bomb.safetensors"
    header_file(p, BOMBS[bomb](8 << 20).encode())
    r = subprocess.run([sys.executable, "-c", PEAK, str(p)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    size = p.stat().st_size
    assert int(r.stdout) <= 3 * size + (4 << 20), f"peak grew by {int(r.stdout) / size:.1f}x the header"


# -- section 4: durable, atomic writes honouring the umask ---------------------------
def test_new_files_honour_the_umask_and_replaced_files_keep_their_mode(tmp_path):
    p = tmp_path / "m.safetensors"
    old = os.umask(0o022)
    try:
        pbcodec.save_file({"a": np.zeros(3)}, p)
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        p.chmod(0o640)
        pbcodec.save_file({"a": np.ones(3)}, p)  # replacing keeps the mode, as writing into it would
        assert stat.S_IMODE(p.stat().st_mode) == 0o640
        os.umask(0o077)
        q = tmp_path / "private.safetensors"
        pbcodec.save_file({"a": np.zeros(3)}, q)
        assert stat.S_IMODE(q.stat().st_mode) == 0o600
        os.umask(0o002)
        q.unlink()
        pbcodec.save_file({"a": np.zeros(3)}, q)
        assert stat.S_IMODE(q.stat().st_mode) == 0o664
    finally:
        os.umask(old)


def test_writes_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(("fsync", kind))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("rename", os.path.basename(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    pbcodec.save_file({"a": np.zeros(3)}, tmp_path / "m.safetensors")
    assert events == [("fsync", "file"), ("rename", "m.safetensors"), ("fsync", "dir")]


KILLED_WRITER = """
import os, signal, sys, numpy as np, pbcodec
os.replace = lambda a, b: os.kill(os.getpid(), signal.SIGKILL)  # killed just before the rename
pbcodec.save_file({"a": np.zeros(1000)}, sys.argv[1])
"""


@pytest.mark.skipif(not LINUX, reason="uses SIGKILL and /proc pids")
def test_a_killed_save_leaves_a_temporary_that_the_next_save_removes(tmp_path):
    p = tmp_path / "m.safetensors"
    r = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(p)], timeout=120)
    assert r.returncode == -signal.SIGKILL
    left = [n for n in os.listdir(tmp_path) if n.startswith(".pbcodec-")]
    assert len(left) == 1 and not p.exists()
    # A temporary of a live process (this one) is not touched.
    mine = files.temp_path(tmp_path)
    open(mine, "wb").close()
    pbcodec.save_file({"a": np.zeros(3)}, p)
    assert sorted(os.listdir(tmp_path)) == sorted(["m.safetensors", os.path.basename(mine)])
    os.unlink(mine)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    p = tmp_path / "m.safetensors"
    p.write_bytes(b"previous")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        pbcodec.save_file({"a": np.zeros(3)}, p)
    assert p.read_bytes() == b"previous" and os.listdir(tmp_path) == ["m.safetensors"]


def test_load_metadata_reads_only_the_header(tmp_path, monkeypatch):
    p = tmp_path / "m.safetensors"
    pbcodec.save_file({"a": np.zeros(3)}, p, metadata={"k": "v"})

    def no_data(*a):
        raise AssertionError("data read")

    monkeypatch.setattr(files, "_read_data", no_data)
    assert pbcodec.load_metadata(p) == {"k": "v"}


LOAD_PEAK = """
import sys, numpy as np, pbcodec
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
before = hwm()
got = pbcodec.load_file(sys.argv[1])
assert got["w"].decompress().shape == (64, 128) and got["big"].flags.writeable
print(hwm() - before)
"""


@pytest.mark.skipif(not LINUX or not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak RSS")
def test_default_load_peaks_at_about_the_file_size(tmp_path):
    p = tmp_path / "big.safetensors"
    t = pbcodec.compress(np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32))
    pbcodec.save_file({"w": t, "big": np.ones(16 << 20, np.float32)}, p)  # 64 MiB
    r = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(p)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    size = p.stat().st_size
    assert int(r.stdout) <= 1.1 * size + (8 << 20), f"peak grew by {int(r.stdout) / size:.2f}x the file"
