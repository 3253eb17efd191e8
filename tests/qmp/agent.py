#!/usr/bin/env python3
"""A QMP agent for Flotilla's end-to-end tests: the real `qemu.qmp` library, driven line by line.

The Rust test (tests/tests/qmp_e2e.rs, through flotilla_tests::pyqmp) writes one JSON request
per line on stdin and reads exactly one JSON answer per line on stdout, so that it can interleave
QMP commands sent by the library with what the test guest prints on its serial console.

Clients are `QMPClient`s named by the test; each records every message it receives, in order,
with the wall-clock time of arrival (the library's `_cb_inbound` hook), so the test can check
that an event came before the reply of the command that caused it.

Requests (`client` names a QMPClient; every wait is bounded by `timeout`, default 10 s):
  {"op": "connect", "client": C, "address": PATH | [HOST, PORT], "negotiate": true,
   "retry_for": SECONDS}   -> {"greeting": {...}, "attempts": N, "took": SECONDS}
  {"op": "execute", "client": C, "cmd": NAME, "args": {...}}
      -> {"return": V | "error": {class, desc, data}, "events_before": [...], "t_reply": T}
  {"op": "gather", "calls": [{"client": C, "cmd": NAME, "args": {...}}, ...]}
      -> {"results": [{"return": V} | {"error": ...}, ...]}   (all in flight at once)
  {"op": "events", "client": C, "want": [NAME, ...], "timeout": S}
      -> {"events": [...], "listener_total": N, "inbound_total": N}
         the events received since the last report (execute's events_before or this), after
         waiting (bounded) until each name in `want` is among them; the totals count every
         event the library's default listener (`QMPClient.events`) and the connection got
  {"op": "disconnect", "client": C} -> {"ok": true[, "note": "EOFError: ..." when the server
                                        had closed the connection already, e.g. after quit]}
  {"op": "quit"} -> ends the agent
Any failure other than a QMP error answers {"exception": "Type: message"}.
"""

import asyncio
import json
import sys
import time
import traceback

try:
    from qemu.qmp import ExecuteError, QMPClient
except ImportError as e:  # the Rust side checks first; this is the backstop
    print(json.dumps({"exception": f"ImportError: {e} (pip install qemu.qmp, or run scripts/setup-host)"}),
          flush=True)
    sys.exit(2)


class RecordingClient(QMPClient):
    """A QMPClient that remembers every inbound message with its arrival time."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.inbound = []  # [(time, message dict)]
        self.cursor = 0  # inbound messages before this index were reported already

    def _cb_inbound(self, msg):
        msg = super()._cb_inbound(msg)
        self.inbound.append((time.time(), dict(msg)))
        return msg


clients = {}


def plain(obj):
    """Messages and models as plain JSON values."""
    return json.loads(json.dumps(obj, default=lambda o: dict(o)))


def address_of(a):
    return tuple(a) if isinstance(a, list) else a


async def op_connect(req):
    name = req["client"]
    old = clients.pop(name, None)
    if old is not None:
        try:
            await asyncio.wait_for(old.disconnect(), 5)
        except Exception:  # the old connection may have died already
            pass
    started = time.monotonic()
    deadline = started + float(req.get("retry_for", 0))
    attempts = 0
    while True:
        attempts += 1
        c = RecordingClient(name)
        c.negotiate = bool(req.get("negotiate", True))
        try:
            await asyncio.wait_for(c.connect(address_of(req["address"])), req.get("timeout", 10))
            break
        except Exception:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.05)
    clients[name] = c
    return {"greeting": plain(c.greeting._raw) if c.greeting else None, "attempts": attempts,
            "took": time.monotonic() - started}


def reply_index(c, start):
    """The first reply (not an event) received at or after `start`: with one command in flight
    on the client, the reply to it."""
    for i in range(start, len(c.inbound)):
        if "event" not in c.inbound[i][1]:
            return i
    return None


async def run_execute(c, cmd, args, timeout):
    """QMPClient.execute; the reply as a dict, and where it is among the inbound messages."""
    start = len(c.inbound)
    try:
        ret = await asyncio.wait_for(c.execute(cmd, args), timeout)
        out = {"return": plain(ret)}
    except ExecuteError as e:
        out = {"error": plain(e.error.error._raw)}
    idx = reply_index(c, start)
    if idx is not None:
        out["t_reply"] = c.inbound[idx][0]
        out["_idx"] = idx
    return out


async def op_execute(req):
    c = clients[req["client"]]
    out = await run_execute(c, req["cmd"], req.get("args"), req.get("timeout", 10))
    idx = out.pop("_idx", None)
    if idx is not None:
        before = [m for _, m in c.inbound[c.cursor:idx] if "event" in m]
        out["events_before"] = before
        c.cursor = idx + 1
    return out


async def op_gather(req):
    calls = req["calls"]
    outs = await asyncio.gather(
        *(run_execute(clients[k["client"]], k["cmd"], k.get("args"), req.get("timeout", 10)) for k in calls))
    for o in outs:
        o.pop("_idx", None)
    return {"results": outs}


async def op_events(req):
    c = clients[req["client"]]
    want = list(req.get("want", []))
    deadline = time.monotonic() + float(req.get("timeout", 10))

    def pending():
        return [m for _, m in c.inbound[c.cursor:] if "event" in m]

    while any(w not in [e["event"] for e in pending()] for w in want) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    got = pending()
    c.cursor = len(c.inbound)
    # The library's own default listener must have seen every event the connection received.
    c.events.clear()
    return {"events": got, "listener_total": len(c.events.history),
            "inbound_total": sum(1 for _, m in c.inbound if "event" in m)}


async def op_disconnect(req):
    c = clients.pop(req["client"], None)
    if c is None:
        return {"ok": True}
    try:
        await asyncio.wait_for(c.disconnect(), req.get("timeout", 10))
        return {"ok": True}
    except Exception as e:  # e.g. EOFError when the server closed first (after quit)
        return {"ok": True, "note": f"{type(e).__name__}: {e}"}


OPS = {"connect": op_connect, "execute": op_execute, "gather": op_gather, "events": op_events,
       "disconnect": op_disconnect}


async def main():
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        req = json.loads(line)
        if req.get("op") == "quit":
            break
        try:
            out = await OPS[req["op"]](req)
        except Exception as e:
            out = {"exception": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    for c in list(clients.values()):
        try:
            await asyncio.wait_for(c.disconnect(), 2)
        except Exception:
            pass


if __name__ == "__main__":
    asyncio.run(main())
