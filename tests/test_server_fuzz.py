"""robot_deploy.py --robot server under hostile input, on loopback: a bounded fuzz run (it stops by itself, about
a minute), session isolation, and a clean Ctrl-C. The server runs as a subprocess, as a robot would run it."""

import base64
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request

import msgpack
import numpy as np
import pytest
import torch
from openpi_client import msgpack_numpy
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import common
from dbp_bc import DriftPolicy
from tests.conftest import ROOT

ENV_ID = "cube-double-play-singletask-task2-v0"
DO, DA, TO, T = 37, 5, 2, 4  # To = 2: the observation history is part of each session's state


def start_server(ckpt, cwd, *flags, env=None):
    """robot_deploy.py --robot server on a free loopback port; returns (process, port, log path)."""
    log_path = os.path.join(cwd, "server.log")
    cmd = [sys.executable, os.path.join(ROOT, "robot_deploy.py"), "--checkpoint", ckpt, "--robot", "server",
           "--port", "0", "--warmup-ticks", "0", "--inference-timeout-ms", "2000", *flags]
    with open(log_path, "w") as log:  # a file, not a pipe: a pipe nobody reads would block the server
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    deadline = time.time() + 180
    while time.time() < deadline:
        text = open(log_path).read()
        if m := re.search(r"serving on ws://127\.0\.0\.1:(\d+)", text):
            return proc, int(m.group(1)), log_path
        assert proc.poll() is None, text
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the server did not start: {open(log_path).read()}")


def rss_kb(pid):
    return int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{pid}/status").read()).group(1))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d, rng = tmp_path_factory.mktemp("fuzz"), np.random.default_rng(0)
    torch.manual_seed(0)
    kw = dict(obs_dim=DO, action_dim=DA, n_obs_steps=TO, horizon=TO + T - 1, n_action_steps=4, hidden_dims=(32, 32))
    policy = DriftPolicy(**kw)
    policy.set_normalizer(rng.uniform(-1, 2, (100, DO)), rng.uniform(-0.9, 0.9, (100, DA)))
    ckpt = str(d / "dbp.pt")
    common.save_checkpoint(ckpt, dict(policy_module="dbp_bc", policy_kwargs=kw, model=policy.state_dict(),
                                      ema_model=policy.state_dict(), env_id=ENV_ID, args={}, run_name="t", step=0))
    proc, port, log_path = start_server(ckpt, str(d), "--max-sessions", "96")
    yield {"proc": proc, "port": port, "log": log_path, "dir": d}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def ws(port, **kw):
    return connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None, proxy=None, open_timeout=20, legacy=True,
                   **kw)


def good_request(i, n=6):
    """Request i of a fixed well-formed sequence of n: a reset at its start, a seed for the noise on each (a session's
    own generator would go on between repeats), the observation history (To = 2) carried from request to request."""
    obs = np.random.default_rng(1000 + i % n).uniform(-1, 2, DO).astype(np.float32)
    return msgpack_numpy.packb({"observation/state": obs, "reset": i % n == 0, "seed": 7 + i % n})


class GoodSession:
    """A long-lived well-formed client: replays the sequence and keeps every reply's raw bytes."""

    def __init__(self, port):
        self.conn = ws(port)
        self.metadata = msgpack.unpackb(self.conn.recv())
        self.i, self.replies = 0, []

    def step(self):
        self.conn.send(good_request(self.i))
        reply = self.conn.recv(timeout=20)
        assert isinstance(reply, bytes), reply
        self.replies.append((self.i % 6, msgpack_numpy.unpackb(reply)["actions"].tobytes()))
        self.i += 1


def expect_refused(port, frame, count):
    """One malformed message on a new connection: a text reason, then close code 1011. No traceback."""
    with ws(port) as conn:
        conn.recv(timeout=20)  # the metadata
        conn.send(frame)
        reason = conn.recv(timeout=20)
        assert isinstance(reason, str) and reason and "Traceback" not in reason and 'File "' not in reason, reason
        with pytest.raises(ConnectionClosed) as e:
            conn.recv(timeout=20)
        assert e.value.rcvd is not None and e.value.rcvd.code == 1011, e.value
    count[0] += 1


def arr(x):
    return {b"__ndarray__": True, b"data": x.tobytes(), b"dtype": x.dtype.str, b"shape": list(x.shape)}


def malformed_messages(rng, n):
    """n malformed requests (bytes or str frames) of many kinds."""
    good = rng.uniform(-1, 2, DO).astype(np.float32)
    pick = lambda options: options[int(rng.integers(len(options)))]

    def bad_shape():
        shape = tuple(int(n) for n in rng.integers(0, 40, rng.integers(1, 4)))
        return shape if shape not in ((DO,), (TO, DO)) else (DO + 1,)

    kinds = [
        lambda: msgpack.packb({"observation/state": arr(rng.standard_normal(bad_shape()).astype(np.float32))}),
        lambda: msgpack.packb({"state": arr(np.where(rng.random(DO) < 0.2, pick([np.nan, np.inf, -np.inf]),
                                                     good).astype(np.float32))} | {"x": 1}),  # NaN, inf
        lambda: msgpack.packb({"state": arr(np.full(DO, 1e39))}),  # finite in float64, inf in float32
        lambda: msgpack.packb({"state": arr(np.zeros(DO, pick(["?", "c8", ">c16", "U3", "M8[s]", "V4", "S2"])))}),
        lambda: msgpack.packb({"state": {b"__ndarray__": True, b"data": good.tobytes()[:int(rng.integers(0, 148))],
                                         b"dtype": "<f4", b"shape": [DO]}}),  # data shorter than the shape
        lambda: msgpack.packb({"state": {b"__ndarray__": True, b"data": b"", b"shape": [0],
                                         b"dtype": pick(["O", "|O", "xx", "<f4" * 4, 3])}}),
        lambda: msgpack.packb({"state": {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "<f4",
                                         b"shape": pick([[-2], [2**62, 2**62], "2", [2.0], None])}}),
        lambda: msgpack.packb({"state": {b"__npgeneric__": True, b"data": 1.0, b"dtype": "O"}}),
        lambda: msgpack.packb({"state": pick(["text", None, 3.5, True, {"a": 1}, b"\0" * 148])}),
        lambda: msgpack.packb({"state": [str(v) for v in good]}),  # a list of strings
        lambda: msgpack.packb({"state": good.tolist(), "observation/state": good.tolist()}),  # both keys
        lambda: msgpack.packb({"state": good.tolist(), "reset": pick(["yes", 1, 0.0, None])}),
        lambda: msgpack.packb({"state": good.tolist(), "seed": pick([-1, 1.5, "3", True, [1]])}),
        lambda: msgpack.packb({"obs": good.tolist()}),  # the old key
        lambda: msgpack.packb(pick([[1, 2, 3], 7, "state", None, b"raw"])),  # not a map
        lambda: msgpack.packb({"state": good.tolist()})[: int(rng.integers(1, 40))],  # truncated msgpack
        lambda: msgpack.packb({"state": good.tolist()}) + b"\x00",  # trailing bytes
        lambda: rng.bytes(int(rng.integers(1, 300))),  # not msgpack
        lambda: b"\x91" * 3000 + b"\xc0",  # nested 3000 deep
        lambda: b"\xdd\xff\xff\xff\xff",  # an array header claiming 4 billion items
        lambda: msgpack.packb({1: 2}),  # a non-string key
        lambda: msgpack.packb({"state": msgpack.ExtType(5, b"x" * 10)}),
        lambda: json.dumps({"state": good.tolist()}),  # a text frame
        lambda: "",  # an empty text frame
        lambda: b"",  # an empty binary frame
    ]
    return [kinds[i % len(kinds)]() for i in rng.permutation(n)]


def raw_handshake(port):
    """A websocket connection made by hand (for frames no client library sends). Returns the socket and the bytes
    that came after the server's HTTP headers (its first frames may arrive in the same read)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return s, head.split(b"\r\n\r\n", 1)[1]


def frame(payload, opcode=2, fin=True, mask=True, length=None):
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | opcode])
    m = 0x80 if mask else 0
    head += bytes([m | n]) if n < 126 else (bytes([m | 126]) + struct.pack(">H", n) if n < 65536
                                             else bytes([m | 127]) + struct.pack(">Q", n))
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def server_frames(data):
    """Unmasked server frames -> [(opcode, payload)] (a truncated last frame is dropped)."""
    out = []
    while len(data) >= 2:
        n, i = data[1] & 0x7F, 2
        if n >= 126:
            size = 2 if n == 126 else 8
            n, i = int.from_bytes(data[2:2 + size], "big"), 2 + size
        if len(data) < i + n:
            break
        out.append((data[0] & 0x0F, data[i:i + n]))
        data = data[i + n:]
    return out


def read_until_closed(s, limit_s=20):
    """Drain a raw socket until the server closes it; returns the bytes read."""
    s.settimeout(limit_s)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return out


def raw_garbage(port, rng, count):
    """Random bytes instead of an HTTP request; random, truncated, unmasked and reserved-opcode frames after it."""
    kind = count[0] % 6
    if kind == 0:
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        s.sendall(rng.bytes(int(rng.integers(1, 2000))))
        s.shutdown(socket.SHUT_WR)
    else:
        s, _ = raw_handshake(port)
        payload = msgpack_numpy.packb({"state": np.zeros(DO, np.float32)})
        s.sendall([rng.bytes(int(rng.integers(1, 500))),
                   frame(payload)[: int(rng.integers(1, len(payload)))],  # truncated frame, then EOF
                   frame(payload, mask=False),  # clients must mask
                   frame(payload, opcode=int(rng.choice([3, 4, 5, 11]))),  # reserved opcodes
                   frame(payload[:20], fin=False) + frame(payload[20:], opcode=2)][kind - 1])  # bad continuation
        s.shutdown(socket.SHUT_WR)
    read_until_closed(s)
    s.close()
    count[0] += 1


def test_fuzz_server_survives_malformed_input_with_bounded_memory_and_identical_answers(server):
    port, pid, rng = server["port"], server["proc"].pid, np.random.default_rng(0)
    t_start = time.perf_counter()
    # The reference: the well-formed sequence on a fresh session, before any garbage.
    ref = GoodSession(port)
    for _ in range(6):
        ref.step()
    expected = dict(ref.replies)
    ref.conn.close()
    good, count = GoodSession(port), [0]
    assert good.metadata["obs_dim"] == DO and good.metadata["n_obs_steps"] == TO

    def check_alive():
        good.step()
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=20).read() == b"OK\n"

    # Warm-up round (the allocator's first growth is not a leak), then the baseline RSS.
    for msg in malformed_messages(rng, 100):
        expect_refused(port, msg, count)
    for _ in range(30):
        raw_garbage(port, rng, count)
    check_alive()
    rss0 = rss_kb(pid)
    marks = [("warm-up", t_start)]

    marks.append(("malformed", time.perf_counter()))
    # 1. Malformed messages, each on its own connection; the good session interleaved.
    for i, msg in enumerate(malformed_messages(rng, 2000)):
        expect_refused(port, msg, count)
        if i % 50 == 0:
            check_alive()
    marks.append(("raw", time.perf_counter()))
    # 2. Raw TCP garbage and broken frames.
    for i in range(600):
        raw_garbage(port, rng, count)
        if i % 50 == 0:
            check_alive()
    marks.append(("100MB", time.perf_counter()))
    # A well-formed request split into three frames (a fragmented message) is answered like the whole one.
    s, data = raw_handshake(port)
    payload = good_request(0)
    s.sendall(frame(payload[:10], fin=False) + frame(payload[10:30], opcode=0, fin=False)
              + frame(payload[30:], opcode=0))
    deadline = time.time() + 20
    data_frames = lambda: [f for f in server_frames(data) if f[0] < 8]  # a keepalive ping may come in between
    while len(data_frames()) < 2 and time.time() < deadline:
        data += s.recv(65536)
    s.close()
    reply = data_frames()[1]  # after the metadata frame
    assert reply[0] == 2 and msgpack_numpy.unpackb(reply[1])["actions"].tobytes() == expected[0]
    # 3. A 100 MB message: over the 8 MiB default cap, the connection is closed with 1009 (message too big).
    s, _ = raw_handshake(port)
    try:
        s.sendall(frame(b"", length=100 * 2**20))  # the header; the payload follows
        sent = 0
        while sent < 100 * 2**20:
            sent += s.send(b"\0" * 2**20)
    except (BrokenPipeError, ConnectionResetError):
        pass
    frames = server_frames(read_until_closed(s))
    assert frames[-1][0] == 8 and frames[-1][1][:2] == struct.pack(">H", 1009), frames  # closed: message too big
    s.close()
    count[0] += 1
    check_alive()
    marks.append(("idle/deaf", time.perf_counter()))
    # 4. Idle clients and clients that never read: the server keeps answering the others.
    idle = [ws(port) for _ in range(10)]
    deaf = []
    payload = frame(good_request(1))
    for _ in range(5):
        s, _ = raw_handshake(port)
        s.setblocking(False)
        try:
            for _ in range(20000):  # until the kernel's buffers are full: the server's replies pile up unread
                s.send(payload)
        except BlockingIOError:
            pass
        deaf.append(s)
    for _ in range(5):
        check_alive()
    marks.append(("concurrent", time.perf_counter()))
    # 5. 50 concurrent clients, each sending malformed and well-formed requests.
    errors = []

    def client(k):
        try:
            r = np.random.default_rng(100 + k)
            for msg in malformed_messages(r, 6):
                expect_refused(port, msg, count)
            with ws(port) as conn:
                conn.recv()
                for i in range(6):
                    conn.send(good_request(i))
                    assert msgpack_numpy.unpackb(conn.recv(timeout=30))["actions"].tobytes() == expected[i]
        except Exception as e:  # re-raised below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    for c in idle:
        c.close()
    for s in deaf:
        s.close()
    check_alive()
    time.sleep(0.5)  # closed sessions are freed
    rss1 = rss_kb(pid)
    marks.append(("end", time.perf_counter()))

    assert count[0] >= 1000, count
    assert server["proc"].poll() is None  # alive
    assert all(expected[i] == a for i, a in good.replies), "a well-formed request got a different answer"
    assert len(good.replies) >= 40
    assert rss1 - rss0 <= 5 * 1024, f"RSS grew by {(rss1 - rss0) / 1024:.1f} MB ({rss0} -> {rss1} kB)"
    log = open(server["log"]).read()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    print(f"fuzz: {count[0]} malformed messages, {len(good.replies)} interleaved good requests, RSS {rss0} -> "
          f"{rss1} kB; seconds per phase: " + ", ".join(f"{a} {t1 - t0:.1f}" for (a, t0), (_, t1)
                                                        in zip(marks, marks[1:])))
    good.conn.close()


def test_sessions_do_not_disturb_each_other(server):
    """Session A's answers (history To = 2 and noise draws included) are the same with and without session B
    interleaving other observations, resets and seeds."""
    port = server["port"]
    obs = np.random.default_rng(5).uniform(-1, 2, (8, DO)).astype(np.float32)
    alone = ws(port)
    alone.recv()
    want = []
    for o in obs:
        alone.send(msgpack_numpy.packb({"observation/state": o}))
        want.append(msgpack_numpy.unpackb(alone.recv())["actions"])
    alone.close()
    a, b = ws(port), ws(port)
    a.recv(), b.recv()
    got = []
    for i, o in enumerate(obs):
        b.send(msgpack_numpy.packb({"state": -o, "reset": True, "seed": i}))
        b.recv()
        a.send(msgpack_numpy.packb({"observation/state": o}))
        got.append(msgpack_numpy.unpackb(a.recv())["actions"])
        b.send(msgpack_numpy.packb({"state": o[::-1].copy()}))
        b.recv()
    np.testing.assert_array_equal(np.stack(got), np.stack(want))
    assert np.abs(np.diff(np.stack(want), axis=0)).max() > 0  # the answers do depend on the sequence
    # The full history [To, Do] may be sent instead: the same answer as the session built it itself (the second
    # request: the second draw of the session's noise generator).
    c = ws(port)
    c.recv()
    c.send(msgpack_numpy.packb({"state": -obs[0]}))
    c.recv()
    c.send(msgpack_numpy.packb({"state": obs[:2]}))
    np.testing.assert_array_equal(msgpack_numpy.unpackb(c.recv())["actions"], want[1])
    a.close(), b.close(), c.close()


def test_busy_poll_server_answers_the_same_and_stops(server):
    """--busy-poll (the event loop spins instead of sleeping, for latency): the same answers, and a clean Ctrl-C."""
    d = server["dir"] / "busy"
    d.mkdir()
    proc, port, log_path = start_server(str(server["dir"] / "dbp.pt"), str(d), "--busy-poll")
    try:
        answers = []
        for p in (server["port"], port):
            conn = ws(p)
            conn.recv()
            answers.append([])
            for i in range(6):
                conn.send(good_request(i))
                answers[-1].append(msgpack_numpy.unpackb(conn.recv(timeout=20))["actions"])
            conn.close()
        np.testing.assert_array_equal(np.stack(answers[1]), np.stack(answers[0]))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, open(log_path).read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_server_stops_cleanly_on_ctrl_c(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0, open(server["log"]).read()[-2000:]
    log = open(server["log"]).read()
    assert "observation -> action" in log and "inference failed 0 times" in log
    stats_file = next((server["dir"] / "runs").glob(f"{ENV_ID}__robot_deploy__1__*/deploy_stats.json"))
    stats = json.load(open(stats_file))
    assert stats["ticks"] >= 100 and stats["inference_failures"] == 0 and stats["watchdog_ticks"] == 0
