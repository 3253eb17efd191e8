#!/usr/bin/env python3
"""Drive the test guest under QEMU and check every line of PROTOCOL.md.

A developer tool (the Rust tests drive the guest on vmm-core): it proves that the guest
discovers QEMU's machine from its firmware tables as it must discover ours.

    python3 tests/guest/qemu-check.py --elf target/.../flotilla-guest.elf [--accel tcg|kvm]
        [--machine q35|pc] [--smp 2] [--only boot,spin,...]

Every wait is bounded; exit status 0 when all checks passed.
"""
import argparse
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time


CMDLINE = "flotilla-check x=1"


class Fail(Exception):
    pass


class Qmp:
    def __init__(self, path, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.events = []
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Fail("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise Fail(f"QMP {name}: {r['error']}")
            return r.get("return")


class Guest:
    """One QEMU process with the guest; serial and QMP over unix sockets."""

    def __init__(self, args, no_reboot, extra=()):
        self.dir = tempfile.mkdtemp(prefix="flotilla-guest-")
        self.serial_path = os.path.join(self.dir, "serial.sock")
        self.qmp_path = os.path.join(self.dir, "qmp.sock")
        accel = ["-accel", "kvm"] if args.accel == "kvm" else ["-accel", "tcg"]
        cmd = [args.qemu, *accel, "-M", args.machine, "-m", str(args.mem), "-smp", str(args.smp),
               "-display", "none", "-nodefaults", "-no-user-config",
               "-serial", f"unix:{self.serial_path},server=on,wait=on",
               "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
               "-kernel", args.elf, "-append", CMDLINE]
        if args.accel == "kvm":
            cmd += ["-cpu", "host"] if args.cpu_host else []
        if no_reboot:
            cmd.append("-no-reboot")
        cmd += list(extra)
        self.log = open(os.path.join(self.dir, "qemu.log"), "w")
        self.started = time.time()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.ser = self._connect(self.serial_path)
        self.qmp = None
        deadline = time.time() + 10
        while self.qmp is None:
            try:
                self.qmp = Qmp(self.qmp_path)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.time() > deadline:
                    raise Fail("no QMP socket")
                time.sleep(0.05)
        self.rx = b""
        self.transcript = []

    def _connect(self, path):
        deadline = time.time() + 10
        while True:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(path)
                return s
            except (FileNotFoundError, ConnectionRefusedError):
                if time.time() > deadline or self.proc.poll() is not None:
                    raise Fail(f"QEMU did not open its serial socket: {self.qemu_log()}")
                time.sleep(0.02)

    def qemu_log(self):
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-2000:]

    def line(self, timeout=5.0):
        """Next guest line (without the newline), or None at timeout."""
        deadline = time.time() + timeout
        while b"\n" not in self.rx:
            left = deadline - time.time()
            if left <= 0:
                return None
            self.ser.settimeout(left)
            try:
                chunk = self.ser.recv(4096)
            except socket.timeout:
                return None
            except OSError:
                chunk = b""
            if not chunk:
                return None
            self.rx += chunk
        raw, self.rx = self.rx.split(b"\n", 1)
        text = raw.decode("latin-1")
        self.transcript.append(text)
        return text

    def expect(self, pattern, timeout=5.0, what=None):
        """Reads lines until one matches the regex (full match); returns the match."""
        deadline = time.time() + timeout
        seen = []
        while True:
            left = deadline - time.time()
            ln = self.line(max(left, 0.0)) if left > 0 else None
            if ln is None:
                raise Fail(f"expected {what or pattern!r}; got {seen[-8:]}")
            seen.append(ln)
            m = re.fullmatch(pattern, ln)
            if m:
                return m

    def send(self, text):
        self.ser.sendall(text.encode() + b"\n")

    def ask(self, text, pattern, timeout=5.0):
        self.send(text)
        return self.expect(pattern, timeout, what=f"{pattern!r} after {text!r}")

    def quiet(self, seconds):
        """Lines received in the next seconds (expected: none)."""
        out = []
        end = time.time() + seconds
        while time.time() < end:
            ln = self.line(end - time.time())
            if ln is not None:
                out.append(ln)
        return out

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def read_boot_report(g, timeout):
    """Parses one boot report up to READY; returns a dict."""
    rep = {"e820": [], "pci": [], "other": []}
    m = g.expect(r"FLOTILLA-GUEST v1 boot=(\d+)", timeout, "boot banner")
    rep["boot"] = int(m.group(1))
    m = g.expect(r"MEM total=(\d+) entries=(\d+)", 5)
    rep["mem_total"], n = int(m.group(1)), int(m.group(2))
    for _ in range(n):
        m = g.expect(r"E820 0x([0-9a-f]+) 0x([0-9a-f]+) (\d+)", 5)
        rep["e820"].append((int(m.group(1), 16), int(m.group(2), 16), int(m.group(3))))
    usable = sum(e - s for s, e, t in rep["e820"] if t == 1)
    if usable != rep["mem_total"]:
        raise Fail(f"MEM total {rep['mem_total']} != sum of type-1 E820 {usable}")
    m = g.expect(r"ACPI rsdp=0x([0-9a-f]+) sci=(\d+) pm1a_evt=0x([0-9a-f]+) pm1a_cnt=0x([0-9a-f]+) "
                 r"gpe0=0x([0-9a-f]+) reset=0x([0-9a-f]+):0x([0-9a-f]+) s5=(\d+)", 5)
    rep["acpi"] = m.groups()
    while True:
        ln = g.line(30)
        if ln is None:
            raise Fail("boot report ended early")
        if ln == "READY":
            rep["ready_s"] = time.time() - g.started
            break
        if m := re.fullmatch(r"CPUS madt=(\d+) online=(\d+)", ln):
            rep["cpus"] = (int(m.group(1)), int(m.group(2)))
        elif m := re.fullmatch(r"PCI ([0-9a-f]{2}):([0-9a-f]{2})\.([0-7]) vendor=([0-9a-f]{4}) "
                               r"device=([0-9a-f]{4}) class=([0-9a-f]{6})", ln):
            rep["pci"].append(m.groups())
        elif m := re.fullmatch(r"ECAM base=0x([0-9a-f]+) match=(yes|no)", ln):
            rep["ecam"] = (int(m.group(1), 16), m.group(2))
        elif m := re.fullmatch(r"TSC khz=(\d+) source=(\w+)", ln):
            rep["tsc"] = (int(m.group(1)), m.group(2))
        else:
            rep["other"].append(ln)
    for key in ("cpus", "ecam"):
        if key not in rep:
            raise Fail(f"boot report without {key}")
    return rep


class Checker:
    def __init__(self, args):
        self.args = args
        self.results = []

    def ok(self, name, detail=""):
        self.results.append((name, True, detail))
        print(f"ok   {name} {detail}", flush=True)

    def bad(self, name, detail):
        self.results.append((name, False, detail))
        print(f"FAIL {name} {detail}", flush=True)

    def boot(self, no_reboot=True, extra=()):
        g = Guest(self.args, no_reboot, extra)
        rep = read_boot_report(g, self.args.boot_timeout)
        return g, rep

    def run(self, name, fn):
        if self.args.only and name not in self.args.only:
            return
        g = None
        try:
            g = fn()
        except Fail as e:
            self.bad(name, str(e))
        except Exception as e:  # noqa: BLE001 - report, go on with the next check
            self.bad(name, f"{type(e).__name__}: {e}")
        finally:
            if isinstance(g, Guest):
                if self.args.verbose:
                    print("\n".join("    | " + ln for ln in g.transcript))
                g.close()

    # --- the checks -------------------------------------------------------------------------

    def check_boot(self):
        g, rep = self.boot()
        t0 = time.time()
        if rep["boot"] != 1:
            raise Fail(f"boot={rep['boot']} on a fresh VM")
        madt, online = rep["cpus"]
        if madt != self.args.smp or online != self.args.smp:
            raise Fail(f"CPUS madt={madt} online={online}, want {self.args.smp}")
        if not rep["pci"]:
            raise Fail("no PCI functions")
        want_ecam = "yes" if self.args.machine.startswith("q35") else "no"
        if rep["ecam"][1] != want_ecam:
            raise Fail(f"ECAM {rep['ecam']}, want match={want_ecam}")
        g.ask("ping", "PONG")
        g.ask("frobnicate 1 2", "ERR unknown frobnicate 1 2")
        g.ask("mark", "MARKED")
        g.ask("cmdline", "CMDLINE " + re.escape(CMDLINE))
        g.ask("vectors", r"VECTORS total=0$")
        g.ask("jump", r"ERR usage jump$")
        g.ask("jump xyz", r"ERR usage jump xyz$")
        g.send("mem")
        g.expect(r"MEM total=%d entries=%d" % (rep["mem_total"], len(rep["e820"])))
        for s, e, t in rep["e820"]:
            g.expect(r"E820 0x%x 0x%x %d" % (s, e, t))
        g.ask("cpus", r"CPUS madt=%d online=%d" % rep["cpus"])
        g.send("pci")
        for p in rep["pci"]:
            g.expect(r"PCI %s:%s\.%s vendor=%s device=%s class=%s" % p)
        g.expect(r"ECAM base=0x%x match=%s" % rep["ecam"])
        self.ok("boot", f"acpi={rep['acpi']} cpus={rep['cpus']} pci={len(rep['pci'])} "
                        f"ecam={rep['ecam']} tsc={rep.get('tsc')} other={rep['other']} "
                        f"READY {rep['ready_s']:.2f}s after exec "
                        f"({time.time() - t0:.1f}s of commands)")
        return g

    def check_spin(self):
        g, _ = self.boot()
        g.send("spin")
        start = None
        last = 0
        end = time.time() + 3.0
        while time.time() < end:
            m = g.expect(r"TICK (\d+)", 2)
            n = int(m.group(1))
            if n != last + 1:
                raise Fail(f"TICK {n} after {last}")
            if start is None:
                start = time.time()
            last = n
        rate = (last - 1) / (time.time() - start)
        g.send("ping")
        # TICKs already in flight may come before PONG, none after.
        g.expect("PONG", 2)
        after = g.quiet(0.5)
        if after:
            raise Fail(f"lines after the spin stopped: {after}")
        if not 7 <= rate <= 13:
            raise Fail(f"{rate:.1f} TICKs/s, want about 10")
        self.ok("spin", f"{rate:.1f} ticks/s")
        return g

    def check_nmi(self):
        g, _ = self.boot()
        zeros = " ".join(f"cpu{i}=0" for i in range(self.args.smp))
        g.ask("nmis", f"NMIS total=0 {zeros}")
        g.qmp.cmd("inject-nmi")
        g.qmp.cmd("inject-nmi")
        time.sleep(0.2)
        twos = " ".join(f"cpu{i}=2" for i in range(self.args.smp))
        g.ask("nmis", f"NMIS total={2 * self.args.smp} {twos}")
        self.ok("nmi", "inject-nmi x2 counted on every CPU")
        return g

    def check_write(self):
        g, _ = self.boot()
        out = os.path.join(g.dir, "mem.bin")
        for vaddr, pattern, length in ((0xffff800000400000, 0xdeadbeef, 4096),
                                       (0x600000, 0x01020304, 10)):
            m = g.ask(f"write {vaddr:x} {pattern:x} {length}", r"WROTE 0x([0-9a-f]+) 0x([0-9a-f]+)")
            if int(m.group(1), 16) != vaddr:
                raise Fail(f"WROTE vaddr {m.group(1)}")
            paddr = int(m.group(2), 16)
            want_paddr = vaddr - 0xffff800000000000 if vaddr >= 0xffff800000000000 else vaddr
            if paddr != want_paddr:
                raise Fail(f"WROTE paddr {paddr:#x}, want {want_paddr:#x}")
            want = (struct.pack("<I", pattern) * (length // 4 + 1))[:length]
            # QMP's val is an int64: a higher-half address goes as its two's complement.
            sval = vaddr - (1 << 64) if vaddr >= 1 << 63 else vaddr
            g.qmp.cmd("memsave", val=sval, size=length, filename=out)
            got = open(out, "rb").read()
            if got != want:
                raise Fail(f"memsave {vaddr:#x}: {got[:16].hex()} != {want[:16].hex()}")
            g.qmp.cmd("pmemsave", val=paddr, size=length, filename=out)
            if open(out, "rb").read() != want:
                raise Fail(f"pmemsave {paddr:#x} differs")
        g.ask("write 0x1000000000 1 4", r"ERR unmapped write 0x1000000000 1 4")
        g.ask("write zz 1 4", r"ERR usage write zz 1 4")
        self.ok("write", "memsave of the higher-half address and pmemsave return the pattern")
        return g

    def check_halt(self):
        g, _ = self.boot(no_reboot=False)
        g.ask("halt", "HALTING")
        g.send("ping")
        if g.quiet(1.0):
            raise Fail("halted guest answered")
        g.qmp.cmd("inject-nmi")      # counted, and the BSP goes back to hlt
        if g.quiet(0.5):
            raise Fail("halted guest printed after an NMI")
        g.qmp.cmd("system_reset")
        m = g.expect(r"FLOTILLA-GUEST v1 boot=(\d+)", self.args.boot_timeout)
        if m.group(1) != "2":
            raise Fail(f"boot={m.group(1)} after system_reset")
        g.expect("READY", 30)
        self.ok("halt", "silent until system_reset, then boot=2")
        return g

    def check_resets(self):
        g, _ = self.boot(no_reboot=False)
        boot = 1
        for cmd, answer in (("reset", "RESETTING"), ("kbdreset", "RESETTING"),
                            ("triplefault", "TRIPLEFAULT")):
            g.ask(cmd, answer)
            m = g.expect(r"FLOTILLA-GUEST v1 boot=(\d+)", self.args.boot_timeout, f"reboot after {cmd}")
            boot += 1
            if int(m.group(1)) != boot:
                raise Fail(f"boot={m.group(1)} after {cmd}, want {boot}")
            g.expect("READY", 30)
            g.ask("ping", "PONG")
        self.ok("resets", f"reset, kbdreset, triplefault each rebooted (boot={boot})")
        return g

    def check_exception(self):
        g, _ = self.boot()
        g.ask("ud2", "UD2")
        m = g.expect(r"EXCEPTION 6 rip=0x([0-9a-f]+)", 5)
        g.expect(r"FAULT-INFO vec=6 .*", 5)
        g.send("ping")
        if g.quiet(0.5):
            raise Fail("guest answered after an exception")
        self.ok("exception", f"ud2 -> EXCEPTION 6 rip=0x{m.group(1)}, then halted")
        return g

    def check_poweroff(self):
        g, _ = self.boot()
        g.ask("poweroff", "POWEROFF")
        rc = g.wait_exit(10)
        if rc is None:
            raise Fail("QEMU still running 10 s after poweroff")
        self.ok("poweroff", f"QEMU exited ({rc})")
        return g

    def check_powerdown(self):
        g, _ = self.boot()
        g.qmp.cmd("system_powerdown")
        g.expect("POWER-BUTTON", 5)
        g.expect("POWEROFF", 5)
        rc = g.wait_exit(10)
        if rc is None:
            raise Fail("QEMU still running 10 s after POWER-BUTTON")
        self.ok("powerdown", f"system_powerdown -> POWER-BUTTON -> exit ({rc})")
        return g

    def check_powerdown_spin(self):
        g, _ = self.boot()
        g.send("spin")
        g.expect(r"TICK 2", 5)
        g.qmp.cmd("system_powerdown")
        g.expect("POWER-BUTTON", 5)
        g.expect("POWEROFF", 5)
        if g.wait_exit(10) is None:
            raise Fail("QEMU still running after POWER-BUTTON while spinning")
        self.ok("powerdown-spin", "power button handled while spinning")
        return g

    def check_virtio(self):
        """The virtio drivers on QEMU's virtio-blk-pci (raw file, checked on the host) and
        virtio-balloon-pci (QMP target -> BALLOONED, query-balloon)."""
        fd, img = tempfile.mkstemp(prefix="flotilla-vblk-", suffix=".raw")
        os.ftruncate(fd, 16 << 20)
        os.close(fd)
        try:
            g, _ = self.boot(extra=["-drive", f"if=none,id=d0,format=raw,file={img}",
                                    "-device", "virtio-blk-pci,drive=d0,serial=qemu-check",
                                    "-device", "virtio-balloon-pci,id=bal"])
            g.ask("virtio", r"VIRTIO [0-9a-f:.]+ type=(blk|balloon) devid=\d+ bar=0x[0-9a-f]+ msix=\d+")
            g.ask("blk", r"BLK [0-9a-f:.]+ capacity=32768 ro=0 queues=\d+ features=0x[0-9a-f]+ blk_size=512")
            g.ask("blkwrite 8 16 c0de0000", r"BLKWROTE 8 16 status=0")
            g.ask("blkcheck 8 16 c0de0000", r"BLKCHECK 8 16 status=0 ok")
            g.ask("blkflush", r"BLKFLUSH status=0")
            g.ask("blkid", r"BLKID status=0 id=qemu-check")
            with open(img, "rb") as f:
                f.seek(8 * 512)
                data = f.read(16 * 512)
            want = b"".join(struct.pack("<I", 0xc0de0000 ^ s) * 128 for s in range(8, 24))
            if data != want:
                raise Fail("the guest's blkwrite is not in the image")
            g.ask("balloon", r"BALLOON [0-9a-f:.]+ num_pages=0 actual=0 features=0x[0-9a-f]+")
            target = (self.args.mem - 32) << 20
            g.qmp.cmd("balloon", value=target)
            g.expect(r"BALLOONED actual=8192", 10)
            actual = g.qmp.cmd("query-balloon")["actual"]
            if actual != target:
                raise Fail(f"query-balloon actual={actual}, want {target}")
            self.ok("virtio", f"blk + balloon (balloon actual {actual >> 20} MiB)")
            return g
        finally:
            os.unlink(img)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elf", required=True)
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--accel", default="tcg", choices=["tcg", "kvm"])
    ap.add_argument("--cpu-host", action="store_true", help="with kvm: -cpu host")
    ap.add_argument("--machine", default="q35")
    ap.add_argument("--smp", type=int, default=2)
    ap.add_argument("--mem", type=int, default=256)
    ap.add_argument("--boot-timeout", type=float, default=30.0)
    ap.add_argument("--only", type=lambda s: s.split(","), default=None)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    c = Checker(args)
    for name in ("boot", "spin", "nmi", "write", "halt", "exception", "resets", "poweroff", "powerdown",
                 "powerdown-spin", "virtio"):
        c.run(name, getattr(c, "check_" + name.replace("-", "_")))
    failed = [r for r in c.results if not r[1]]
    print(f"{len(c.results) - len(failed)}/{len(c.results)} checks passed "
          f"({args.accel}, {args.machine}, smp={args.smp})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
