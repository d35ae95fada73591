"""The policy server of robot_deploy.py (--robot server): openpi's websocket policy protocol, so openpi's
`WebsocketClientPolicy` connects as it is. The robot-side state (observation history, noise, watchdog, safe
action) is robot_deploy.Controller's, one per connection; this file is the network side.

On connect one binary frame, the msgpack metadata dict; then lockstep: msgpack {"observation/state": [Do] or
[To, Do] array, "reset": bool, "seed": int} -> {"actions": [T, Da], "server_timing", "policy_timing", ...}; a bad
request gets its reason as a text frame and close code 1011. Every connection is a session of its own.
Nothing a client sends can crash the server: requests are parsed with size limits and type checks, and a
token (`Authorization: Api-Key <token>`, compared in constant time) guards any non-loopback address.
Protocol, key mapping, tokens, sessions, safety and measured latencies: docs/robot_deploy.md.
Shapes: To observation steps, Do observation dim, T chunk length, Da action dim.
"""

import asyncio
import hashlib
import hmac
import ipaddress
import itertools
import logging
import math
import os
import signal
import time

import msgpack
import numpy as np

import common

TOKEN_ENV = "DRIFT_POLICY_TOKEN"
log = logging.getLogger("robot_deploy.server")


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


# ----------------------------------------------------------------------------------------------
# The wire format: openpi's msgpack-numpy, parsed with limits
# ----------------------------------------------------------------------------------------------
STATE_KEYS = ("observation/state", "state")  # the flat state vector [Do] (or its history [To, Do])
UNPACK_LIMITS = dict(max_str_len=1 << 16, max_array_len=1 << 16, max_map_len=1 << 10, max_ext_len=0)


class RequestError(ValueError):
    """The client's mistake: its text goes back to the client, then the connection closes (1011)."""


def unpack_numpy(obj):
    """msgpack object_hook for openpi's msgpack-numpy maps; only numeric dtypes, and shapes that match the data."""
    if b"__ndarray__" in obj:
        dtype, shape, data = obj.get(b"dtype"), obj.get(b"shape"), obj.get(b"data")
        if not (isinstance(dtype, str) and len(dtype) <= 8 and isinstance(data, bytes) and isinstance(shape, list)
                and len(shape) <= 8 and all(type(n) is int and n >= 0 for n in shape)):
            raise RequestError("a malformed __ndarray__ map (dtype str, shape list of ints, data bytes)")
        dtype = np.dtype(dtype)
        if dtype.kind not in "biuf" or math.prod(shape) * dtype.itemsize != len(data):
            raise RequestError(f"an __ndarray__ of dtype {dtype.str} shape {shape} with {len(data)} bytes of data")
        return np.frombuffer(data, dtype).reshape(shape)
    if b"__npgeneric__" in obj:
        dtype, value = obj.get(b"dtype"), obj.get(b"data")
        if not (isinstance(dtype, str) and len(dtype) <= 8 and np.dtype(dtype).kind in "biuf"
                and isinstance(value, (bool, int, float))):
            raise RequestError("a malformed __npgeneric__ map")
        return value
    return obj


def pack_numpy(obj):
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": list(obj.shape)}
    raise TypeError(f"cannot pack {type(obj).__name__}")


def parse_request(msg, obs_dim, n_obs_steps):
    """A request frame -> (obs [Do] or [To, Do] float32, reset, seed or None); RequestError with the reason."""
    if not isinstance(msg, bytes):
        raise RequestError("expected a binary frame of msgpack, got a text frame")
    try:
        req = msgpack.unpackb(msg, object_hook=unpack_numpy, **UNPACK_LIMITS)
    except RequestError:
        raise
    except Exception as e:  # its type only: the message may quote client bytes
        raise RequestError(f"not a msgpack-numpy message ({type(e).__name__})") from None
    keys = [k for k in STATE_KEYS if isinstance(req, dict) and k in req]
    if len(keys) != 1:
        got = sorted(str(k)[:40] for k in req)[:8] if isinstance(req, dict) else type(req).__name__
        raise RequestError(f"expected a map with the state vector under one of {list(STATE_KEYS)}, got {got}")
    x = req[keys[0]]
    if isinstance(x, list) and len(x) in (obs_dim, n_obs_steps) and all(type(v) is not list or len(v) == obs_dim
                                                                       for v in x):
        x = np.asarray(x)  # a plain list of numbers (or of To rows): at most To * Do of them
    if not (isinstance(x, np.ndarray) and x.dtype.kind in "iuf" and x.shape in ((obs_dim,), (n_obs_steps, obs_dim))):
        what = f"dtype {x.dtype.str} shape {list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
        raise RequestError(f"{keys[0]!r} must be a number array of shape [{obs_dim}] or [{n_obs_steps}, {obs_dim}], "
                           f"not {what}")
    with np.errstate(over="ignore"):
        obs = x.astype(np.float32)
    if not np.isfinite(obs).all():
        raise RequestError(f"{keys[0]!r} has non-finite values (in float32) at indices "
                           f"{np.flatnonzero(~np.isfinite(obs))[:8].tolist()}")
    reset, seed = req.get("reset", False), req.get("seed")
    if not isinstance(reset, bool):
        raise RequestError("'reset' must be true or false")
    if seed is not None and not (type(seed) is int and 0 <= seed < 1 << 64):
        raise RequestError("'seed' must be an integer in [0, 2**64)")
    return obs, reset, seed


# ----------------------------------------------------------------------------------------------
# The server: one session per connection
# ----------------------------------------------------------------------------------------------
def checkpoint_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def server_metadata(policy, ckpt, args, safe):
    """The first frame of every connection (plain msgpack types only)."""
    return {"server": "robot_deploy", "env_id": ckpt["env_id"], "algorithm": ckpt["policy_module"],
            "policy": type(policy).__name__, "obs_dim": policy.obs_dim, "action_dim": policy.action_dim,
            "n_obs_steps": policy.n_obs_steps, "horizon": policy.horizon, "n_action_steps": policy.n_action_steps,
            "chunk_length": policy.horizon - policy.n_obs_steps + 1, "noise_shape": list(policy.noise_shape),
            "control_hz": args.hz, "state_keys": list(STATE_KEYS), "max_action": args.max_action,
            "safe_action": safe.tolist(), "hold_dims": list(args.hold_dims), "backend": args.backend,
            "checkpoint": os.path.basename(args.checkpoint), "checkpoint_sha256": checkpoint_sha256(args.checkpoint)}


class PolicyServer:
    """The websocket server. Requests are answered on the event loop's thread, one at a time (the network call
    under the watchdog blocks it for at most --inference-timeout-ms), so a session never sees another's state.
    new_session() -> a fresh robot_deploy.Controller for each connection (all of them share one inference worker)."""

    def __init__(self, policy, new_session, args, metadata, token, stats):
        self.policy, self.new_session, self.args, self.stats = policy, new_session, args, stats
        self.metadata = msgpack.packb(metadata)
        self.auth = None if token is None else f"Api-Key {token}".encode()
        self.sessions, self.ids, self.failures, self.stop = set(), itertools.count(1), 0, None

    def process_request(self, connection, request):
        """Before the websocket handshake: GET /healthz, the token (constant-time compare), the session cap."""
        if request.path.split("?")[0] == "/healthz":
            return connection.respond(200, "OK\n")
        given = request.headers.get_all("Authorization")
        if self.auth is not None and not (len(given) == 1 and hmac.compare_digest(given[0].encode(), self.auth)):
            return connection.respond(401, "a valid 'Authorization: Api-Key <token>' header is required\n")
        if len(self.sessions) >= self.args.max_sessions:
            return connection.respond(503, f"{len(self.sessions)} sessions already (--max-sessions)\n")
        return None

    def answer(self, session, msg, t_obs, prev_total_ms):
        """One request -> (reply or None, the reason to close the session or None). Never raises."""
        try:
            obs, reset, seed = parse_request(msg, self.policy.obs_dim, self.policy.n_obs_steps)
        except RequestError as e:
            return None, f"bad request: {e}"
        except Exception as e:  # a numpy or msgpack error the checks above did not foresee
            return None, f"bad request ({type(e).__name__})"
        try:
            if reset:
                session.reset()
            if seed is not None:
                session.rng = np.random.default_rng(seed)
            session.observe(obs)
            t0 = time.perf_counter()
            chunk, status = session.plan(t_obs)
            infer_ms = (time.perf_counter() - t0) * 1e3
            if status == "ok":
                session.last = chunk[min(session.ta, len(chunk)) - 1]  # the last action a receding client executes
            self.failures += status == "failed"
            reply = msgpack.packb({"actions": chunk, "inferred": status == "ok", "status": status,
                                   "server_timing": {"infer_ms": infer_ms, "prev_total_ms": prev_total_ms},
                                   "policy_timing": {"infer_ms": infer_ms}}, default=pack_numpy)
        except Exception:
            log.exception("internal error while answering a request")  # the traceback stays in the server's log
            return None, "internal server error (see the server's log)"
        self.stats.add(time.perf_counter() - t_obs, status == "ok", status != "ok")
        if self.args.max_ticks and self.stats.seen >= self.args.max_ticks:
            self.stop.set()
        stop = session.should_stop() and f"stopping: inference failed {session.consecutive_failures} times in a row"
        return reply, stop or None

    async def handle(self, ws):
        from websockets.exceptions import ConnectionClosed

        sid, session = next(self.ids), self.new_session()
        self.sessions.add(sid)
        log.info(f"session {sid}: {ws.remote_address} connected")
        reason, prev_total_ms = "client closed", 0.0
        try:
            await ws.send(self.metadata)
            async for msg in ws:
                t_obs = time.perf_counter()
                reply, error = self.answer(session, msg, t_obs, prev_total_ms)
                if reply is not None:
                    await ws.send(reply)
                if error is not None:
                    reason = error
                    if reply is None:
                        await ws.send(error)  # a text frame: openpi's client raises it as a RuntimeError
                    await ws.close(1011, error[:120])
                    break
                prev_total_ms = (time.perf_counter() - t_obs) * 1e3
                await asyncio.sleep(0)  # one request, then the other sessions' turn: a flood cannot starve them
        except ConnectionClosed as e:
            reason = f"connection closed ({e.rcvd.code if e.rcvd else 'no close frame'})"
        finally:
            self.sessions.discard(sid)
            log.info(f"session {sid}: {reason}")

    async def run(self, host, port):
        from websockets.asyncio.server import serve

        self.stop, loop = asyncio.Event(), asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        cap = int(self.args.max_message_mb * 2**20) or None
        try:
            server = await serve(self.handle, host, port, process_request=self.process_request, compression=None,
                                 max_size=cap, logger=logging.getLogger("robot_deploy.websockets"))
        except OSError as e:  # the port is taken, the address is not this machine's, ...
            raise common.UserError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
        async with server:
            print(f"serving on ws://{host}:{server.sockets[0].getsockname()[1]} (Ctrl-C to stop)", flush=True)
            if self.args.busy_poll:  # a ready callback makes each selector poll non-blocking: the loop never sleeps
                while not self.stop.is_set():
                    await asyncio.sleep(0)
            await self.stop.wait()
