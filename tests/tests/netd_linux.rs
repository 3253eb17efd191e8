//! Linux's virtio-net driver on vmm-core, through netd on a tap, end to end, on this host's
//! kvm_pvm: the launcher given QEMU's `-netdev tap,ifname=...,script=no,downscript=no` and
//! `-device virtio-net-pci`, the project's test kernel (`tests/kit/build-pvm-kernel.sh`) with
//! `ip=` (IP_PNP) and `netconsole=`. The kernel cannot run user space here, so the kernel itself is
//! the peer: netconsole sends its log lines as UDP datagrams from 10.0.2.15 to 10.0.2.2:6666, the
//! tap's host side, where this test listens. Every datagram must be a line the serial console
//! printed too (the same console text), and the line of init's start must arrive both ways.
//!
//! Everything runs in a network namespace the test thread makes for itself (`unshare(CLONE_NEWNET)`
//! on that thread only; the launcher and its daemons are born in it), so nothing is sent beyond
//! it. Needs root (CAP_NET_ADMIN for the namespace and the tap) and `ip`; a boot takes ~60-70 s.

use flotilla_tests::machine::TempDir;
use flotilla_tests::process::{binaries, describe, processes_mentioning, wait_timeout, Collector, Reaper};
use flotilla_tests::pvm_kernel;
use flotilla_tests::qmp::{gateway_binary, QmpAddr, RawQmp};
use flotilla_tests::stamped::{NoLine, StampedConsole};
use serde_json::{json, Value};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const TAP: &str = "ftap0";
const HOST_ADDR: &str = "10.0.2.2";
const PORT: u16 = 6666;
const APPEND: &str = "console=ttyS0 root=/dev/vda1 rootwait ignore_loglevel rcupdate.rcu_cpu_stall_timeout=300 \
     ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off netconsole=@10.0.2.15/eth0,6666@10.0.2.2/";
/// Launch to `Run /sbin/init`: ~60-70 s on an idle machine, 160-180 s measured while other boots ran.
const BOOT: Duration = Duration::from_secs(300);
const RUN_INIT: &str = "Run /sbin/init as init process";
const NETCONSOLE_UP: &str = "netconsole: network logging started";
const CONNECT: Duration = Duration::from_secs(30);
/// evbug's line for KEY_POWER (116) pressed: a kernel line the test can make at will
/// (`system_powerdown`; the spinning init does nothing with it).
const POWER_KEY_EVENT: &str = "evbug: Event. Dev: input0, Type: 1, Code: 116, Value: 1";
/// The power button's event through ACPI's SCI, the button driver and evbug.
const EVENT_WAIT: Duration = Duration::from_secs(60);
const EXIT: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// netd, built next to the other binaries (the kit's `binaries()` predates it).
fn netd_binary(flotilla: &Path) -> PathBuf {
    let netd = flotilla.with_file_name("netd");
    if !netd.is_file() {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(workspace)
            .args(["build", "--quiet", "-p", "netd"])
            .status()
            .expect("cargo build -p netd");
        assert!(status.success(), "building netd");
    }
    netd
}

/// Puts this thread (only) into a new network namespace, its loopback up, and with `tap` the
/// tap up at 10.0.2.2/24.
fn private_network(tap: bool) -> Result<(), String> {
    // SAFETY: unshare(2) with a namespace flag changes only the calling thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error()));
    }
    // Commands spawned from this thread are born in the namespace.
    run("ip", &["link", "set", "lo", "up"]);
    if !tap {
        return Ok(());
    }
    run("ip", &["tuntap", "add", "dev", TAP, "mode", "tap"]);
    run("ip", &["addr", "add", &format!("{HOST_ADDR}/24"), "dev", TAP]);
    run("ip", &["link", "set", TAP, "up"]);
    Ok(())
}

/// Datagrams from the guest's netconsole, one line each (as netconsole sends them).
fn listen(sock: UdpSocket) -> mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, _)) = sock.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).trim_end_matches(['\n', '\r']).to_string();
            if tx.send((Instant::now(), text)).is_err() {
                return;
            }
        }
    });
    rx
}

/// Reads console lines (kept in `lines`) until one contains `needle`.
fn wait_serial(
    con: &mut StampedConsole,
    lines: &mut Vec<String>,
    needle: &str,
    timeout: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match con.next(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) => {
                lines.push(l.text.clone());
                if l.text.contains(needle) {
                    return Ok(l.text);
                }
            }
            Err(NoLine::Timeout) => return Err(format!("no console line with {needle:?} within {timeout:?}")),
            Err(NoLine::Closed) => return Err("the console closed".into()),
        }
    }
}


/// One at a time: a boot is a core's worth of emulation for minutes.
static ONE_BOOT_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A booted machine whose kernel logs to the listener through netd.
struct NetBoot {
    con: StampedConsole,
    serial_lines: Vec<String>,
    stderr: Option<Collector>,
    reaper: Option<Reaper>,
    datagrams: mpsc::Receiver<(Instant, String)>,
    /// Each datagram with the instant it reached the host.
    received: Vec<(Instant, String)>,
    qmp_path: PathBuf,
    _dir: TempDir,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl NetBoot {
    /// Boots the kernel with `netdev` (its `-netdev` argument; the NIC is `nic0` on `net0`) and
    /// the netconsole target `target` (`IP/` or `IP/MAC`) until init, checks that netconsole's
    /// lines reached `listener`: every datagram a console line, every line after netconsole
    /// started a datagram, init's line both ways.
    fn start(tag: &str, netdev: &str, listener: UdpSocket) -> NetBoot {
        let turn = ONE_BOOT_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let kernel = pvm_kernel::kernel().unwrap_or_else(|e| panic!("the kvm_pvm test kernel: {e}"));
        let dir = TempDir::new(tag);
        let disk = dir.path("root.raw");
        pvm_kernel::root_disk(&disk, 64 * MIB, tag).unwrap_or_else(|e| panic!("root disk: {e}"));
        let datagrams = listen(listener);
        let b = binaries();
        let netd = netd_binary(&b.flotilla);
        let serial = dir.path("serial.sock");
        let qmp_path = dir.path("qmp.sock");
        let started = Instant::now();
        let mut child = Command::new(&b.flotilla)
            .env("FLOTILLA_VMM_CORE", &b.vmm_core)
            .env("FLOTILLA_QMP_GATEWAY", gateway_binary())
            .env("FLOTILLA_BLOCKD", &b.blockd)
            .env("FLOTILLA_NETD", &netd)
            .env("XDG_RUNTIME_DIR", &dir.0)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .args(["-m", "256", "-display", "none", "-kernel"])
            .arg(&kernel.vmlinux)
            .args(["-append", APPEND])
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=raw", disk.display()))
            .args(["-netdev", netdev])
            .args(["-device", "virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:12:34:56"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .arg("-serial")
            .arg(format!("unix:{},server=on,wait=on", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning flotilla");
        let stderr = Some(Collector::new(child.stderr.take().expect("stderr")));
        let reaper = Some(Reaper::new(child, &dir.0.display().to_string()));
        let con = StampedConsole::connect(&serial, CONNECT).unwrap_or_else(|e| panic!("serial console: {e}"));
        let mut m = NetBoot {
            con,
            serial_lines: Vec::new(),
            stderr,
            reaper,
            datagrams,
            received: Vec::new(),
            qmp_path,
            _dir: dir,
            _turn: turn,
        };
        if let Err(e) = m.wait_serial(RUN_INIT, BOOT) {
            m.fail(e);
        }
        let boot = started.elapsed();
        if !m.serial_lines.iter().any(|l| l.contains(NETCONSOLE_UP)) {
            m.fail(format!("the kernel never said {NETCONSOLE_UP:?}"));
        }
        // The init line must come over the network too; collect until it does (bounded).
        let init_line = m.serial_lines.last().cloned().unwrap_or_default();
        if let Err(e) = m.wait_datagram(&init_line, Duration::from_secs(30)) {
            m.fail(e);
        }
        // Every datagram is a line the serial console printed (netconsole gets the same text).
        let strangers: Vec<&String> = m
            .received
            .iter()
            .map(|(_, d)| d)
            .filter(|d| !m.serial_lines.iter().any(|s| s.trim_end() == d.trim_end()))
            .collect();
        assert!(strangers.is_empty(), "datagrams that are no console line: {strangers:?}");
        // netconsole starts after the driver and IP_PNP: everything after its start came both ways.
        let start = m.serial_lines.iter().position(|l| l.contains(NETCONSOLE_UP)).expect("checked above");
        let missing: Vec<&String> = m.serial_lines[start + 1..]
            .iter()
            .filter(|s| !m.received.iter().any(|(_, d)| d.trim_end() == s.trim_end()))
            .collect();
        assert!(
            missing.is_empty(),
            "console lines after netconsole started that never came over the network: {missing:?}"
        );
        eprintln!(
            "{tag}: init after {boot:.1?}; {} datagrams over netd, {} console lines after netconsole started",
            m.received.len(),
            m.serial_lines.len() - start - 1
        );
        m
    }

    /// Reads console lines (kept) until one contains `needle`.
    fn wait_serial(&mut self, needle: &str, timeout: Duration) -> Result<String, String> {
        wait_serial(&mut self.con, &mut self.serial_lines, needle, timeout)
    }

    /// Collects datagrams until one is `line`; its arrival.
    fn wait_datagram(&mut self, line: &str, timeout: Duration) -> Result<Instant, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = self.arrival(line) {
                return Ok(t);
            }
            match self.datagrams.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(d) => self.received.push(d),
                Err(_) => {
                    return Err(format!(
                        "{line:?} never came over the network within {timeout:?}; {} datagrams came",
                        self.received.len()
                    ))
                }
            }
        }
    }

    fn arrival(&self, line: &str) -> Option<Instant> {
        self.received.iter().find(|(_, d)| d.trim_end() == line.trim_end()).map(|(t, _)| *t)
    }

    fn qmp(&self) -> RawQmp {
        let mut q = RawQmp::connect(&QmpAddr::Unix(self.qmp_path.clone()), CONNECT);
        q.negotiate();
        q
    }

    /// Kills the machine and fails with the console's tail and flotilla's stderr.
    fn fail(&mut self, why: String) -> ! {
        drop(self.reaper.take());
        let err = self.stderr.take().map(|mut c| c.take()).unwrap_or_default();
        let from = self.serial_lines.len().saturating_sub(60);
        panic!(
            "{why}\n--- console tail ---\n{}\n--- flotilla's stderr ---\n{err}",
            self.serial_lines[from..].join("\n")
        );
    }

    /// `quit`: flotilla exits 0 and leaves nothing running.
    fn quit(mut self, q: &mut RawQmp) {
        assert_eq!(q.execute("quit", Value::Null), json!({"return": {}}), "quit");
        let status = wait_timeout(self.reaper.as_mut().expect("running").child(), EXIT);
        let Some(status) = status else { panic!("flotilla still runs {EXIT:?} after quit") };
        let marker = self.reaper.take().map(|r| r.marker.clone()).unwrap_or_default();
        let err = self.stderr.take().map(|mut c| c.take()).unwrap_or_default();
        assert_eq!(status.code(), Some(0), "flotilla ended with {}; stderr:\n{err}", describe(status));
        assert!(!err.contains("panicked"), "a process panicked:\n{err}");
        let left = processes_mentioning(&marker);
        assert!(left.is_empty(), "left running after quit: {left:?}");
    }
}

fn need_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("needs root: a network namespace and a tap (run the suite as root, as CI does)");
    }
}

#[test]
fn linux_netconsole_through_netd_on_a_tap() {
    need_root();
    private_network(true).unwrap_or_else(|e| panic!("{e}"));
    let listener = UdpSocket::bind((HOST_ADDR, PORT)).expect("binding the netconsole listener");
    let mut m =
        NetBoot::start("netd-linux-tap", &format!("tap,id=net0,ifname={TAP},script=no,downscript=no"), listener);
    let mut q = m.qmp();

    // QMP: the NIC in query-pci with its qdev id, info network, set_link through netd.
    let pci = q.ok("query-pci", json!({}));
    let nic = pci[0]["devices"].as_array().expect("devices").iter().find(|d| d["qdev_id"] == "nic0").cloned();
    let nic = nic.unwrap_or_else(|| panic!("no nic0 in query-pci: {pci}"));
    assert_eq!(nic["class_info"], json!({"class": 512, "desc": "Ethernet controller"}));
    assert_eq!(nic["id"]["device"], json!(0x1041));
    let info = q.ok("human-monitor-command", json!({"command-line": "info network"}));
    assert_eq!(
        info,
        json!(format!(
            "nic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\r\n \\ net0: index=0,type=tap,ifname={TAP},script=no,downscript=no\r\n"
        ))
    );
    assert_eq!(q.ok("set_link", json!({"name": "nic0", "up": false})), json!({}));
    assert_eq!(q.ok("set_link", json!({"name": "net0", "up": true})), json!({}));
    let r = q.execute("set_link", json!({"name": "nosuch", "up": true}));
    assert_eq!(r["error"]["class"], "DeviceNotFound", "{r}");

    // set_link off reaches the guest and stops delivery: a kernel line made while the link is
    // down does not reach the host before set_link up is even sent (with the link up it comes
    // within milliseconds of its console copy; Linux's driver stops its transmit queues at the
    // config interrupt, so netconsole holds it and sends it once the link is back), and a line
    // made after set_link up does arrive. The later line's arrival bounds the wait.
    assert_eq!(q.ok("set_link", json!({"name": "nic0", "up": false})), json!({}));
    assert_eq!(q.ok("system_powerdown", json!({})), json!({}));
    let while_down = m.wait_serial(POWER_KEY_EVENT, EVENT_WAIT).unwrap_or_else(|e| m.fail(e));
    let up_sent = Instant::now();
    assert_eq!(q.ok("set_link", json!({"name": "net0", "up": true})), json!({}));
    assert_eq!(q.ok("system_powerdown", json!({})), json!({}));
    let while_up = m.wait_serial(POWER_KEY_EVENT, EVENT_WAIT).unwrap_or_else(|e| m.fail(e));
    assert_ne!(while_down, while_up, "two presses, two time stamps");
    if let Err(e) = m.wait_datagram(&while_up, Duration::from_secs(30)) {
        m.fail(format!("after set_link up: {e}"));
    }
    match m.arrival(&while_down) {
        Some(t) => {
            assert!(
                t > up_sent,
                "a line made while the link was down reached the host before set_link up: {while_down:?}"
            );
            eprintln!(
                "netd_linux: the line held while the link was down arrived {:.1?} after set_link up",
                t - up_sent
            );
        }
        None => eprintln!("netd_linux: the line made while the link was down was not delivered"),
    }

    m.quit(&mut q);
}

/// A tap that does not exist, and no right to make one (a user namespace's root has no
/// CAP_NET_ADMIN over the host's network): the launcher names the tap, says what to do, exits 1
/// before anything starts, and leaves nothing running.
#[test]
fn a_missing_tap_without_the_right_to_make_it_fails_at_once_naming_it() {
    let has_unshare = Command::new("unshare").arg("--help").output().is_ok_and(|o| o.status.success());
    assert!(has_unshare, "needs unshare(1) (util-linux)");
    let dir = TempDir::new("netd-notap");
    let b = binaries();
    let netd = netd_binary(&b.flotilla);
    let tap = "fnotap9";
    let started = Instant::now();
    let mut child = Command::new("unshare")
        .args(["--user", "--map-root-user", "--"])
        .arg(&b.flotilla)
        .env("FLOTILLA_VMM_CORE", &b.vmm_core)
        .env("FLOTILLA_NETD", &netd)
        .env("XDG_RUNTIME_DIR", &dir.0)
        .args(["-display", "none", "-netdev", &format!("tap,id=n0,ifname={tap},script=no,downscript=no")])
        .args(["-device", "virtio-net-pci,netdev=n0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning flotilla");
    let mut err = Collector::new(child.stderr.take().expect("stderr"));
    let status = wait_timeout(&mut child, EXIT).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("flotilla still runs {EXIT:?} after a tap it cannot have")
    });
    let err = err.take();
    assert_eq!(status.code(), Some(1), "{}; stderr:\n{err}", describe(status));
    assert!(
        err.contains(&format!("-netdev tap,id=n0,ifname={tap},script=no,downscript=no: could not"))
            && err.contains(&format!("the tap '{tap}' does not exist and this user may not create it"))
            && err.contains(&format!("ip tuntap add dev {tap} mode tap")),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "failed at once, not after starting daemons");
    assert!(!Path::new("/sys/class/net").join(tap).exists(), "no tap was made");
    assert!(processes_mentioning(&dir.0.display().to_string()).is_empty(), "nothing left running");
    let runtime_entries = std::fs::read_dir(&dir.0).map(|d| d.count()).unwrap_or(0);
    assert_eq!(runtime_entries, 0, "no runtime directory was made in {}", dir.0.display());
}

/// `-netdev user`: libslirp in the launcher, netd on its frame socket. slirp forwards what the
/// guest sends to its host address (10.0.2.2) to the host's loopback, so netconsole's lines reach
/// 127.0.0.1:6666 in the test's own network namespace.
#[test]
fn linux_netconsole_through_netd_on_user_networking() {
    need_root();
    private_network(false).unwrap_or_else(|e| panic!("{e}"));
    let listener = UdpSocket::bind(("127.0.0.1", PORT)).expect("binding the netconsole listener");
    let m = NetBoot::start("netd-linux-user", "user,id=net0", listener);
    let mut q = m.qmp();
    let info = q.ok("human-monitor-command", json!({"command-line": "info network"}));
    assert_eq!(
        info,
        json!("nic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\r\n \\ net0: index=0,type=user,net=10.0.2.0,restrict=off\r\n")
    );
    m.quit(&mut q);
}

/// The test guest (no network driver of its own) sees the NICs the launcher made: `vectors=`
/// sizes the MSI-X table, a NIC without it gets QEMU's 2 * pairs + 2; both are virtio-net
/// (device id 1) on the slots asked for, and query-pci / info network / set_link agree.
#[test]
fn nics_of_every_spelling_reach_the_machine() {
    use flotilla_tests::qmp::{QmpVm, VmOptions};
    netd_binary(&binaries().flotilla);
    let reply = Duration::from_secs(30);
    let mut vm = QmpVm::start(
        "netd-nics",
        &VmOptions {
            name: "netnics",
            qmp: &[true],
            extra: &[
                "-netdev",
                "user,id=u0,restrict=on",
                "-device",
                "virtio-net-pci,netdev=u0,id=nic0,vectors=6,addr=5",
                "-net",
                "nic,model=virtio,macaddr=52:54:00:00:00:09",
                "-net",
                "user",
            ],
        },
    );
    let mut con = vm.console_ready();
    let fields = |line: &str, key: &str| -> String {
        line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}="))).unwrap_or_default().to_string()
    };
    // Slot order: the -net nic takes the first free slot (1), nic0 the one asked for (5).
    let first = con.command("virtio", "VIRTIO 00:01.0", reply).unwrap_or_else(|e| panic!("{e}"));
    let second = con.expect("VIRTIO 00:05.0", reply).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((fields(&first, "devid"), fields(&first, "msix")), ("1".into(), "4".into()), "{first}");
    assert_eq!((fields(&second, "devid"), fields(&second, "msix")), ("1".into(), "6".into()), "{second}");

    let mut q = vm.raw(0);
    q.negotiate();
    let pci = q.ok("query-pci", json!({}));
    let nics: Vec<(u64, String)> = pci[0]["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter(|d| d["class_info"]["class"] == 512)
        .map(|d| (d["slot"].as_u64().unwrap_or(99), d["qdev_id"].as_str().unwrap_or("?").to_string()))
        .collect();
    assert_eq!(nics, [(1, String::new()), (5, "nic0".to_string())], "{pci}");
    let info = q.ok("human-monitor-command", json!({"command-line": "info network"}));
    assert_eq!(
        info,
        json!(
            "hub 0\r\n \\ hub0port1: user.0: index=0,type=user,net=10.0.2.0,restrict=off\r\n \
             \\ hub0port0: virtio-net-pci.0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:00:00:09\r\n\
             nic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\r\n \
             \\ u0: index=0,type=user,net=10.0.2.0,restrict=on\r\n"
        )
    );
    // set_link by each name set_link knows: the qdev id, the -netdev id, QEMU's -net names.
    for name in ["nic0", "u0", "virtio-net-pci.0", "user.0"] {
        assert_eq!(q.ok("set_link", json!({"name": name, "up": false})), json!({}), "{name}");
    }
    let r = q.execute("set_link", json!({"name": "nosuch", "up": true}));
    assert_eq!(r["error"]["class"], "DeviceNotFound", "{r}");
    let core = vm.vmm_core();
    con.command("poweroff", "POWEROFF", reply).unwrap_or_else(|e| panic!("{e}"));
    vm.assert_exits_0_and_cleaned_up(core);
}

/// `-netdev tap,fd=N`: a tap the caller opened (as libvirt does) is taken over by the launcher
/// and inherited by netd under the same number; the launcher opens nothing itself.
#[test]
fn an_inherited_tap_fd_reaches_netd() {
    use flotilla_tests::qmp::{QmpVm, VmOptions};
    use std::os::fd::AsRawFd;
    need_root();
    private_network(false).unwrap_or_else(|e| panic!("{e}"));
    netd_binary(&binaries().flotilla);
    // TUNSETIFF with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR on a descriptor the child inherits.
    let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").expect("/dev/net/tun");
    let mut req = [0u8; 40];
    req[..4].copy_from_slice(b"ffd0");
    req[16..18].copy_from_slice(&(0x0002u16 | 0x1000 | 0x4000).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes one 40-byte struct ifreq; the descriptor is open.
    assert_eq!(unsafe { libc::ioctl(tun.as_raw_fd(), 0x4004_54ca, req.as_mut_ptr()) }, 0, "TUNSETIFF");
    // SAFETY: clearing FD_CLOEXEC on a descriptor this test owns.
    assert_eq!(unsafe { libc::fcntl(tun.as_raw_fd(), libc::F_SETFD, 0) }, 0);
    let fd = tun.as_raw_fd();
    let netdev = format!("tap,id=n0,fd={fd}");
    let mut vm = QmpVm::start(
        "netd-tapfd",
        &VmOptions {
            name: "nettapfd",
            qmp: &[true],
            extra: &["-netdev", &netdev, "-device", "virtio-net-pci,netdev=n0,id=nic0"],
        },
    );
    let mut con = vm.console_ready();
    let mut q = vm.raw(0);
    q.negotiate();
    let info = q.ok("human-monitor-command", json!({"command-line": "info network"}));
    assert_eq!(
        info,
        json!(format!(
            "nic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\r\n \\ n0: index=0,type=tap,fd={fd}\r\n"
        ))
    );
    let netd = flotilla_tests::process::daemon_child(vm.pid(), "netd", None).expect("a netd child");
    let link = std::fs::read_link(format!("/proc/{netd}/fd/{fd}")).expect("netd holds the descriptor's number");
    assert_eq!(link, Path::new("/dev/net/tun"), "netd's fd {fd}");
    assert_eq!(q.ok("set_link", json!({"name": "n0", "up": false})), json!({}));
    let core = vm.vmm_core();
    let tun_in_core = std::fs::read_link(format!("/proc/{core}/fd/{fd}")).is_ok_and(|l| l == Path::new("/dev/net/tun"));
    assert!(!tun_in_core, "only netd inherits the tap, not vmm-core");
    con.command("poweroff", "POWEROFF", Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    vm.assert_exits_0_and_cleaned_up(core);
    drop(tun);
}

/// The descriptors netd inherits (a launcher-opened tap, a user network's frame socket) of every
/// socket it is restarted with: SIGKILL netd, the launcher starts another with the same fds, and
/// set_link works again through it.
#[test]
fn a_killed_netd_is_restarted_with_the_same_host_sides() {
    use flotilla_tests::process::wait_daemon_child;
    use flotilla_tests::qmp::{QmpVm, VmOptions};
    need_root();
    private_network(true).unwrap_or_else(|e| panic!("{e}"));
    netd_binary(&binaries().flotilla);
    let tap = format!("tap,id=t0,ifname={TAP},script=no,downscript=no");
    let mut vm = QmpVm::start(
        "netd-restart",
        &VmOptions {
            name: "netrestart",
            qmp: &[true],
            extra: &[
                "-netdev",
                &tap,
                "-device",
                "virtio-net-pci,netdev=t0,id=nic0",
                "-netdev",
                "user,id=u0",
                "-device",
                "virtio-net-pci,netdev=u0,id=nic1",
            ],
        },
    );
    let mut con = vm.console_ready();
    let mut q = vm.raw(0);
    q.negotiate();
    let fds = |pid: i32| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let target = std::fs::read_link(e.path()).ok()?.display().to_string();
                        let keep = target == "/dev/net/tun" || target.starts_with("socket:");
                        keep.then(|| (e.file_name().to_string_lossy().into_owned(), target))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    // Inherited under the same numbers: every descriptor its config names (the tap's, the user
    // network's frame socket) is the same open file as before (same tun device, same socket inode).
    let named = |pid: i32| -> Vec<String> {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("netd's command line");
        let args: Vec<String> = cmdline.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let json = args.iter().skip_while(|a| *a != "--config-json").nth(1).expect("--config-json");
        let cfg = vm_config::NetdConfig::from_json(json).expect("netd's config");
        let mut fds = Vec::new();
        for nic in cfg.nics {
            match nic.backend {
                vm_config::NetBackendConfig::Tap { fds: f, .. } => fds.extend(f.iter().map(|n| n.to_string())),
                vm_config::NetBackendConfig::User { socket_fd, .. } => {
                    fds.push(socket_fd.expect("the launcher runs the user network").to_string())
                }
            }
        }
        fds
    };
    let first = wait_daemon_child(vm.pid(), "netd", None, Duration::from_secs(10)).expect("netd");
    let before = fds(first);
    let numbers = named(first);
    assert_eq!(numbers.len(), 2, "a tap and a frame socket: {numbers:?}");
    assert!(before.iter().any(|(_, t)| t == "/dev/net/tun"), "{before:?}");
    // SAFETY: kill(2) of a process this test's launcher started.
    unsafe { libc::kill(first, libc::SIGKILL) };
    let second = wait_daemon_child(vm.pid(), "netd", Some(first), Duration::from_secs(10)).expect("netd restarted");
    let after = fds(second);
    let target = |list: &[(String, String)], n: &str| list.iter().find(|(f, _)| f == n).map(|(_, t)| t.clone());
    assert_eq!(named(second), numbers, "the same config");
    for n in &numbers {
        let was = target(&before, n).unwrap_or_else(|| panic!("fd {n} in the first netd: {before:?}"));
        assert_eq!(target(&after, n), Some(was), "fd {n} after the restart: {after:?}");
    }
    // set_link reaches the new netd (it owns the bus name again once it is up).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = q.execute("set_link", json!({"name": "nic1", "up": false}));
        if r.get("return").is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "set_link never reached the restarted netd: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(q.ok("set_link", json!({"name": "t0", "up": false})), json!({}));
    let core = vm.vmm_core();
    con.command("poweroff", "POWEROFF", Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    vm.assert_exits_0_and_cleaned_up(core);
}
