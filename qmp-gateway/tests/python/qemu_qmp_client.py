#!/usr/bin/env python3
"""Drives qmp-gateway with the real qemu.qmp library (QMPClient and the legacy sync API).

Usage: qemu_qmp_client.py UNIX_SOCKET TCP_PORT SCRATCH_DIR
Exits 0 when every check passed; any failure raises (non-zero exit, traceback on stderr).
Every wait is bounded by asyncio.wait_for / socket timeouts.
"""

import asyncio
import os
import sys

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

T = 10  # seconds, for any single wait


async def check_async(path: str, port: int, scratch: str) -> None:
    qmp = QMPClient("flotilla-test")
    await asyncio.wait_for(qmp.connect(path), T)
    version = qmp.greeting.QMP.version
    assert version["qemu"] == {"major": 1, "minor": 1, "micro": 0}, version
    assert version["package"].startswith("flotilla-"), version
    assert list(qmp.greeting.QMP.capabilities) == [], qmp.greeting

    status = await asyncio.wait_for(qmp.execute("query-status"), T)
    assert status == {"running": True, "singlestep": False, "status": "running"}, status
    assert await asyncio.wait_for(qmp.execute("query-name"), T) == {"name": "mock-vm"}

    # Events: STOP arrives (before the reply, which the library does not show, but it arrives).
    with qmp.listener() as listener:
        assert await asyncio.wait_for(qmp.execute("stop"), T) == {}
        event = await asyncio.wait_for(listener.get(), T)
        assert event["event"] == "STOP", event
        assert set(event["timestamp"]) == {"seconds", "microseconds"}, event
        await asyncio.wait_for(qmp.execute("cont"), T)
        event = await asyncio.wait_for(listener.get(), T)
        assert event["event"] == "RESUME", event

    # A QMP error from the daemon, and one from the schema check.
    try:
        await asyncio.wait_for(qmp.execute("memsave", {"val": 0, "size": 4096, "filename": "/tmp/x"}), T)
        raise AssertionError("memsave of address 0 succeeded")
    except ExecuteError as e:
        assert e.error_class == "GenericError", e.error_class
        assert "Invalid addr" in e.error.error.desc, e.error.error.desc
    try:
        await asyncio.wait_for(qmp.execute("balloon"), T)
        raise AssertionError("balloon without value succeeded")
    except ExecuteError as e:
        assert e.error_class == "MissingParameter", e.error_class

    out = os.path.join(scratch, "py-memsave.bin")
    await asyncio.wait_for(qmp.execute("memsave", {"val": 4096, "size": 128, "filename": out}), T)
    assert os.path.getsize(out) == 128

    hmp = await asyncio.wait_for(qmp.execute("human-monitor-command", {"command-line": "info status"}), T)
    assert hmp == "VM status: running\r\n", repr(hmp)
    cmds = await asyncio.wait_for(qmp.execute("query-commands"), T)
    names = {c["name"] for c in cmds}
    assert {"query-status", "qmp_capabilities", "human-monitor-command"} <= names, names

    # Many commands in flight at once (the library pipelines them).
    results = await asyncio.wait_for(
        asyncio.gather(*(qmp.execute("query-kvm") for _ in range(50))), T)
    assert all(r == {"enabled": True, "present": True} for r in results)
    await asyncio.wait_for(qmp.disconnect(), T)

    # The TCP listener, with a second client at the same time as a unix one.
    tcp = QMPClient("flotilla-tcp")
    unix = QMPClient("flotilla-unix")
    await asyncio.wait_for(tcp.connect(("127.0.0.1", port)), T)
    await asyncio.wait_for(unix.connect(path), T)
    with tcp.listener() as listener:
        await asyncio.wait_for(unix.execute("system_reset"), T)
        event = await asyncio.wait_for(listener.get(), T)
        assert event["event"] == "RESET", event
        assert event["data"] == {"guest": False, "reason": "host-qmp-system-reset"}, event
    await asyncio.wait_for(tcp.disconnect(), T)
    await asyncio.wait_for(unix.disconnect(), T)


def check_legacy(path: str) -> None:
    mon = QEMUMonitorProtocol(path)
    greeting = mon.connect(negotiate=True)
    assert greeting["QMP"]["version"]["qemu"]["major"] == 1, greeting
    mon.settimeout(T)
    assert mon.cmd_raw("query-kvm") == {"return": {"enabled": True, "present": True}}
    assert mon.cmd("query-name") == {"name": "mock-vm"}
    reply = mon.cmd_raw("no-such-command")
    assert reply["error"]["class"] == "CommandNotFound", reply
    mon.close()


def main() -> None:
    path, port, scratch = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    asyncio.run(asyncio.wait_for(check_async(path, port, scratch), 60))
    check_legacy(path)
    print("qemu.qmp: all checks passed")


if __name__ == "__main__":
    main()
