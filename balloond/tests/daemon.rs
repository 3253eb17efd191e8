//! The balloond program end to end: started as the launcher starts it (`--config-json`,
//! `--dbus-address`, `--instance`, `--ready-fd`) on a private dbus-daemon, driven over its
//! socket by a vhost-user frontend written here (as vmm-core's will be) with guest RAM in a
//! memfd, and over D-Bus as the gateway does. What it proves: readiness, feature and
//! protocol negotiation, GET/SET_CONFIG, CONFIG_CHANGE_MSG after `balloon`, BALLOON_CHANGE
//! after the driver's SET_CONFIG, inflated pages leaving the memfd (st_blocks), a hostile PFN
//! list refused with the queue still serving, stats reaching query-balloon and the stats
//! buffer returned periodically, a reconnecting frontend finding the device state, SIGTERM.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_schema::dbus_server::zbus;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, FrontendReqHandler, VhostUserFrontend, VhostUserFrontendReqHandlerMut};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const WAIT: Duration = Duration::from_secs(10);
const MIB: u64 = 1 << 20;
const MEM: u64 = 16 * MIB;
const PAGE: u64 = 4096;
const QSIZE: u16 = 16;
const INFLATE: usize = 0;
const STATS: usize = 2;
const LIST: u64 = MIB;
const STATS_BUF: u64 = MIB + 0x1_0000;
/// The pages the test guest balloons: [8 MiB, 10 MiB).
const BALLOONED: u64 = 8 * MIB;
const N_PAGES: u64 = 512;

fn ring_base(q: usize) -> GuestAddress {
    GuestAddress(0x1_0000 * (q as u64 + 1))
}

fn scratch() -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let d = std::env::temp_dir().join(format!("balloond-test-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A private bus: `dbus-daemon --config-file=<generated> --print-address --nofork`.
struct Bus {
    child: Child,
    address: String,
}

impl Bus {
    fn start(dir: &Path) -> Bus {
        let config = dir.join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
                dir.join("bus.sock").display()
            ),
        )
        .unwrap();
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--print-address", "--nofork"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon (package dbus) must be installed");
        let mut out = child.stdout.take().unwrap();
        let line = read_line_within(move || {
            let mut s = String::new();
            let mut b = [0u8; 1];
            while out.read(&mut b).map(|n| n == 1).unwrap_or(false) && b[0] != b'\n' {
                s.push(b[0] as char);
            }
            s
        });
        assert!(line.starts_with("unix:"), "dbus-daemon address {line:?}");
        Bus { child, address: line }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_line_within(f: impl FnOnce() -> String + Send + 'static) -> String {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(WAIT).expect("no line in time")
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// balloond as the launcher starts it; returns once it wrote `ready`.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, bus: &Bus, socket: &Path) -> Daemon {
        let cfg = vm_config::BalloondConfig {
            id: "balloon0".into(),
            socket: socket.into(),
            mem_bytes: MEM,
            state_file: None,
        }.to_json();
        let mut fds = [0i32; 2];
        // SAFETY: pipe(2) writes two descriptors into the array. No CLOEXEC: the write end
        // must reach the child.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let log = dir.join("balloond.log");
        let child = Command::new(env!("CARGO_BIN_EXE_balloond"))
            .args(["--config-json", &cfg, "--dbus-address", &bus.address, "--instance", "vm-test"])
            .args(["--ready-fd", &fds[1].to_string(), "--stats-interval-ms", "50"])
            .env("BALLOOND_LOG", "debug")
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // SAFETY: both descriptors came from pipe() above and are owned here alone.
        let (mut r, w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        drop(w);
        let got = read_line_within(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        });
        assert_eq!(got, "ready\n", "balloond log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        Daemon { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Records CONFIG_CHANGE_MSGs from the backend.
struct ConfigChanges(Sender<()>);

impl VhostUserFrontendReqHandlerMut for ConfigChanges {
    fn handle_config_change(&mut self) -> std::io::Result<u64> {
        let _ = self.0.send(());
        Ok(0)
    }
}

/// A vhost-user frontend as vmm-core's: guest RAM in a memfd, three rings, the
/// backend-request channel served on a thread.
struct TestFrontend {
    fe: Frontend,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    config_changes: Receiver<()>,
}

fn memfd_guest() -> (GuestMemoryMmap, File) {
    // SAFETY: memfd_create with a NUL-terminated name; the new descriptor is owned below.
    let fd = unsafe { libc::memfd_create(c"balloond-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: just created, owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM).unwrap();
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        MEM as usize,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    (mem, file)
}

impl TestFrontend {
    fn connect(socket: &Path, mem: &GuestMemoryMmap, mocks: &[MockSplitQueue<'_, GuestMemoryMmap>]) -> TestFrontend {
        let mut fe = Frontend::connect(socket, 3).unwrap();
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        for bit in [0, 1, 2, 32] {
            assert_ne!(offered & (1 << bit), 0, "feature bit {bit} offered ({offered:#x})");
        }
        assert_ne!(offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        let pf = fe.get_protocol_features().unwrap();
        let want = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ;
        assert!(pf.contains(want), "protocol features {pf:?}");
        fe.set_protocol_features(want).unwrap();
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        fe.set_features(offered).unwrap();
        assert_eq!(fe.get_queue_num().unwrap(), 3);

        let (tx, config_changes) = mpsc::channel();
        let mut handler = FrontendReqHandler::new(Arc::new(Mutex::new(ConfigChanges(tx)))).unwrap();
        handler.set_reply_ack_flag(true);
        fe.set_backend_request_fd(&handler.get_tx_raw_fd()).unwrap();
        std::thread::spawn(move || while handler.handle_request().is_ok() {});

        let region = mem.find_region(GuestAddress(0)).unwrap();
        fe.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()]).unwrap();
        let host = |a: GuestAddress| mem.get_host_address(a).unwrap() as u64;
        let (mut kicks, mut calls) = (Vec::new(), Vec::new());
        for (q, mock) in mocks.iter().enumerate() {
            let kick = EventFd::new(EFD_NONBLOCK).unwrap();
            let call = EventFd::new(EFD_NONBLOCK).unwrap();
            fe.set_vring_num(q, QSIZE).unwrap();
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: QSIZE,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: host(mock.desc_table_addr()),
                    used_ring_addr: host(mock.used_addr()),
                    avail_ring_addr: host(mock.avail_addr()),
                    log_addr: None,
                },
            )
            .unwrap();
            // The ring's position: where the mock driver is now (0 on first connect).
            let base = mock.used().idx().load();
            fe.set_vring_base(q, base).unwrap();
            fe.set_vring_call(q, &call).unwrap();
            fe.set_vring_kick(q, &kick).unwrap();
            fe.set_vring_enable(q, true).unwrap();
            kicks.push(kick);
            calls.push(call);
        }
        TestFrontend { fe, kicks, calls, config_changes }
    }

    fn config(&mut self) -> (u32, u32) {
        let (_, c) = self.fe.get_config(0, 8, VhostUserConfigFlags::empty(), &[0u8; 8]).unwrap();
        (u32::from_le_bytes(c[0..4].try_into().unwrap()), u32::from_le_bytes(c[4..8].try_into().unwrap()))
    }

    fn write_actual(&mut self, pages: u32) {
        self.fe.set_config(4, VhostUserConfigFlags::WRITABLE, &pages.to_le_bytes()).unwrap();
    }

    /// Kicks queue `q` and waits (bounded) until its used index reaches `want`.
    fn kick_and_wait_used(&self, mock: &MockSplitQueue<'_, GuestMemoryMmap>, q: usize, want: u16) {
        self.kicks[q].write(1).unwrap();
        self.wait_used(mock, q, want);
    }

    fn wait_used(&self, mock: &MockSplitQueue<'_, GuestMemoryMmap>, q: usize, want: u16) {
        let end = Instant::now() + WAIT;
        while mock.used().idx().load() != want {
            let mut pfd = libc::pollfd { fd: self.calls[q].as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd, count one.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            let _ = self.calls[q].read();
            assert!(Instant::now() < end, "queue {q}: used index {} never reached {want}", mock.used().idx().load());
        }
    }
}

fn offer(mock: &MockSplitQueue<'_, GuestMemoryMmap>, slot: u16, addr: u64, len: u32) {
    let d = RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0));
    mock.add_desc_chains(&[d], slot).unwrap();
}

fn pfn_list(mem: &GuestMemoryMmap, pfns: &[u32]) -> u32 {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(LIST)).unwrap();
    bytes.len() as u32
}

fn allocated(f: &File) -> u64 {
    f.metadata().unwrap().blocks() * 512
}

/// The gateway's side: calls and the QmpEvent signals.
struct Gateway {
    rt: tokio::runtime::Runtime,
    conn: zbus::Connection,
    events: zbus::MessageStream,
}

const BUS_NAME: &str = "org.flotilla.vm_test.Balloon";
const PATH: &str = "/org/flotilla/Balloon";
const IFACE: &str = "org.flotilla.Balloon1";

impl Gateway {
    fn connect(address: &str) -> Gateway {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (conn, events) = rt.block_on(async {
            let conn = zbus::connection::Builder::address(address).build().await.unwrap();
            let rule = zbus::MatchRule::builder()
                .msg_type(zbus::message::Type::Signal)
                .interface("org.flotilla.Events1")
                .member("QmpEvent")
                .build()
                .unwrap();
            let events =
                zbus::MessageStream::for_match_rule(rule, &conn, std::num::NonZeroUsize::new(64)).await.unwrap();
            (conn, events)
        });
        Gateway { rt, conn, events }
    }

    fn query_balloon(&self) -> serde_json::Value {
        let reply =
            self.rt.block_on(self.conn.call_method(Some(BUS_NAME), PATH, Some(IFACE), "QueryBalloon", &())).unwrap();
        let text: String = reply.body().deserialize().unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn balloon(&self, value: i64) -> Result<(), String> {
        match self.rt.block_on(self.conn.call_method(Some(BUS_NAME), PATH, Some(IFACE), "Balloon", &(value,))) {
            Ok(_) => Ok(()),
            Err(zbus::Error::MethodError(name, msg, _)) => Err(format!("{name}: {}", msg.unwrap_or_default())),
            Err(e) => panic!("Balloon: {e}"),
        }
    }

    /// The next QmpEvent: (event, data).
    fn next_event(&mut self) -> (String, serde_json::Value) {
        use futures_util::StreamExt;
        let msg = self
            .rt
            .block_on(async { tokio::time::timeout(WAIT, self.events.next()).await })
            .expect("no QmpEvent in time")
            .expect("stream ended")
            .unwrap();
        let (event, data, _s, _us): (String, String, i64, i64) = msg.body().deserialize().unwrap();
        (event, serde_json::from_str(&data).unwrap())
    }
}

fn poll_until(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + WAIT;
    while !f() {
        if Instant::now() > end {
            let logs: Vec<_> = std::fs::read_dir(std::env::temp_dir())
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| {
                    e.file_name().to_string_lossy().starts_with(&format!("balloond-test-{}", std::process::id()))
                })
                .map(|e| std::fs::read_to_string(e.path().join("balloond.log")).unwrap_or_default())
                .collect();
            panic!("timed out waiting for {what}; balloond logs:\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn balloond_over_vhost_user_and_dbus() {
    let dir = scratch();
    let bus = Bus::start(&dir);
    let socket = dir.join("balloon.sock");
    let mut daemon = Daemon::start(&dir, &bus, &socket);
    assert!(socket.exists(), "listening before ready");
    let mut gw = Gateway::connect(&bus.address);

    // Exactly the implemented commands are exported (the gateway builds query-commands
    // from this).
    let xml: String = gw
        .rt
        .block_on(gw.conn.call_method(
            Some(BUS_NAME),
            PATH,
            Some("org.freedesktop.DBus.Introspectable"),
            "Introspect",
            &(),
        ))
        .unwrap()
        .body()
        .deserialize()
        .unwrap();
    for want in ["<method name=\"Balloon\">", "<method name=\"QueryBalloon\">", "org.flotilla.Events1"] {
        assert!(xml.contains(want), "{want} missing:\n{xml}");
    }
    assert!(!xml.contains("QomList"), "QOM is not served:\n{xml}");

    // Before any frontend: the device answers, actual = all of RAM.
    assert_eq!(gw.query_balloon(), serde_json::json!({ "actual": MEM }));
    let err = gw.balloon(0).unwrap_err();
    assert!(err.starts_with("org.flotilla.Qmp.Error: "), "{err}");
    let qerr: serde_json::Value = serde_json::from_str(err.trim_start_matches("org.flotilla.Qmp.Error: ")).unwrap();
    assert_eq!(qerr["class"], "InvalidParameterValue");
    assert_eq!(qerr["desc"], "Parameter 'target' expects a size");
    assert!(gw.balloon(-1).is_err());

    let (mem, file) = memfd_guest();
    // Everything the test guest uses is touched first, so later allocations are only ours.
    mem.write_slice(&vec![0x11u8; (BALLOONED + (N_PAGES + 8) * PAGE) as usize], GuestAddress(0)).unwrap();
    let mocks: Vec<_> = (0..3).map(|q| MockSplitQueue::create(&mem, ring_base(q), QSIZE)).collect();
    let mut fe = TestFrontend::connect(&socket, &mem, &mocks);
    assert_eq!(fe.config(), (0, 0));

    // balloon: 3/4 of RAM stays -> 1024 pages asked for, and the frontend is told.
    gw.balloon((MEM / 4 * 3) as i64).unwrap();
    fe.config_changes.recv_timeout(WAIT).expect("CONFIG_CHANGE_MSG after balloon");
    assert_eq!(fe.config(), ((MEM / 4 / PAGE) as u32, 0));

    // The guest inflates 512 pages: they leave the memfd.
    let pfns: Vec<u32> = (0..N_PAGES).map(|i| ((BALLOONED / PAGE) + i) as u32).collect();
    let len = pfn_list(&mem, &pfns);
    let before = allocated(&file);
    offer(&mocks[INFLATE], 0, LIST, len);
    fe.kick_and_wait_used(&mocks[INFLATE], INFLATE, 1);
    let after = allocated(&file);
    assert_eq!(before - after, N_PAGES * PAGE, "memfd allocation {before} -> {after}");

    // It reports them in `actual`: BALLOON_CHANGE with the guest's RAM less the balloon.
    fe.write_actual(N_PAGES as u32);
    let want_actual = MEM - N_PAGES * PAGE;
    assert_eq!(gw.next_event(), ("BALLOON_CHANGE".into(), serde_json::json!({ "actual": want_actual })));
    assert_eq!(gw.query_balloon()["actual"], want_actual);

    // A hostile list (outside RAM, huge): refused, nothing freed, the queue still serves.
    let len = pfn_list(&mem, &[(MEM / PAGE) as u32, u32::MAX]);
    offer(&mocks[INFLATE], 1, LIST, len);
    fe.kick_and_wait_used(&mocks[INFLATE], INFLATE, 2);
    assert_eq!(allocated(&file), after);
    let len = pfn_list(&mem, &[(BALLOONED / PAGE + N_PAGES) as u32]);
    offer(&mocks[INFLATE], 2, LIST, len);
    fe.kick_and_wait_used(&mocks[INFLATE], INFLATE, 3);
    assert_eq!(after - allocated(&file), PAGE);

    // Stats: the guest's buffer reaches query-balloon, and comes back to be refilled.
    let stats: Vec<u8> = [(4u16, 100 * MIB), (5u16, MEM), (2u16, 7)]
        .iter()
        .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
        .collect();
    mem.write_slice(&stats, GuestAddress(STATS_BUF)).unwrap();
    offer(&mocks[STATS], 0, STATS_BUF, stats.len() as u32);
    fe.kicks[STATS].write(1).unwrap();
    poll_until("stats in query-balloon", || gw.query_balloon().get("free_mem").is_some());
    let info = gw.query_balloon();
    assert_eq!((info["free_mem"].as_u64(), info["total_mem"].as_u64()), (Some(100 * MIB), Some(MEM)));
    assert_eq!(info["major_page_faults"], 7);
    assert!(info.get("mem_swapped_in").is_none(), "not reported by the guest: {info}");
    fe.wait_used(&mocks[STATS], STATS, 1);

    // The frontend goes and comes back (as vmm-core after a restart): served again, the
    // target and the guest's `actual` are still there.
    drop(fe);
    let mut fe = TestFrontend::connect(&socket, &mem, &mocks);
    assert_eq!(fe.config(), ((MEM / 4 / PAGE) as u32, N_PAGES as u32));
    let len = pfn_list(&mem, &[(BALLOONED / PAGE + N_PAGES + 1) as u32]);
    offer(&mocks[INFLATE], 3, LIST, len);
    fe.kick_and_wait_used(&mocks[INFLATE], INFLATE, 4);
    assert_eq!(after - allocated(&file), 2 * PAGE);
    // Deflate all: BALLOON_CHANGE back to the whole RAM.
    fe.write_actual(0);
    assert_eq!(gw.next_event(), ("BALLOON_CHANGE".into(), serde_json::json!({ "actual": MEM })));

    let log = daemon.log();
    assert!(log.contains("refused"), "the hostile PFNs are logged:\n{log}");
    // SIGTERM: a clean, quick exit.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGTERM) };
    let st = wait_exit(&mut daemon.child, WAIT).expect("balloond did not exit on SIGTERM");
    assert!(st.success(), "{st:?}");
    drop(gw);
    drop(bus);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn print_capabilities_and_usage_errors() {
    // Other arguments are ignored then, valid or not (the vhost-user spec).
    for args in [&["--print-capabilities"][..], &["--bogus", "--print-capabilities", "--fd"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_balloond")).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let caps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(caps, serde_json::json!({ "type": "balloon" }));
    }
    for args in [
        vec!["--mem-bytes", "4096"],
        vec!["--socket-path", "/nonexistent/x.sock"],
        vec!["--config-json", "{\"id\": 3"],
        vec!["--socket-path", "/tmp/x", "--mem-bytes", "lots"],
        vec!["--dbus-address", "unix:path=/x"],
        vec!["--bogus"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_balloond")).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("balloond:"), "{args:?}: {err}");
    }
}

#[test]
fn standalone_on_an_inherited_listening_socket() {
    let dir = scratch();
    let socket = dir.join("inherited.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let fd = listener.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own: clear FD_CLOEXEC so the child inherits it (the
    // vhost-user spec's --fd convention).
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    let mut child = Command::new(env!("CARGO_BIN_EXE_balloond"))
        .args(["--fd", &fd.to_string(), "--mem-bytes", &MEM.to_string()])
        .stderr(File::create(dir.join("balloond.log")).unwrap())
        .spawn()
        .unwrap();
    drop(listener);
    let (mem, file) = memfd_guest();
    mem.write_slice(&vec![0x11u8; (BALLOONED + (N_PAGES + 8) * PAGE) as usize], GuestAddress(0)).unwrap();
    let mocks: Vec<_> = (0..3).map(|q| MockSplitQueue::create(&mem, ring_base(q), QSIZE)).collect();
    let mut fe = TestFrontend::connect(&socket, &mem, &mocks);
    assert_eq!(fe.config(), (0, 0));
    let len = pfn_list(&mem, &[(BALLOONED / PAGE) as u32, (BALLOONED / PAGE + 1) as u32]);
    let before = allocated(&file);
    offer(&mocks[INFLATE], 0, LIST, len);
    fe.kick_and_wait_used(&mocks[INFLATE], INFLATE, 1);
    assert_eq!(before - allocated(&file), 2 * PAGE);
    drop(fe);
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = wait_exit(&mut child, WAIT).expect("balloond did not exit on SIGTERM");
    assert!(st.success(), "{st:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
