//! blockd and balloond end on SIGTERM whatever happened to their stdout and stderr: a pipe whose
//! reader is gone, or one nobody reads that is full while a daemon thread is blocked writing a
//! log line to it (the `run-vm | tee log`, Ctrl-C hang: the signal thread waited for ever on
//! std's stderr lock, or died in tracing's `eprintln!`, and only SIGKILL ended blockd). Each
//! must exit 0 within a bound, and blockd must have flushed: a qcow2 image written through it
//! (vmm-core's vhost-user frontend under KVM, the test playing the guest driver) is clean for
//! `qemu-img check` and reads back, through `qemu-io`, what was written.

use flotilla_tests::machine::TempDir;
use flotilla_tests::process::{binaries, signal, wait_timeout, Reaper};
use flotilla_tests::vhost_frontend::{blk_request, machine_with_vhost_user, start_queue0, Driver, Queue, VIRTIO_BLK_T_OUT};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vm_config::VirtioKind;
use vm_memory::{Bytes, GuestAddress};
use vmm_core::Vm;

const WAIT: Duration = Duration::from_secs(10);
/// How long a daemon may take from SIGTERM to its end (flush included).
const EXIT_BOUND: Duration = Duration::from_secs(3);
const SLOT: u8 = 3;
const RINGS: u64 = 32 << 20;
const REQS: u64 = 33 << 20;
/// Requests written through blockd: 64 KiB each, byte `0x40 + i`, at 1 MiB steps (so each
/// lands in fresh qcow2 clusters and L2 entries).
const WRITES: u64 = 8;
const LEN: usize = 64 * 1024;

/// What the daemon's stdout and stderr are.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Output {
    /// A pipe whose read end is closed once the daemon is ready.
    Closed,
    /// A pipe nobody reads, filled to the brim once the daemon is ready.
    Full,
}

/// A daemon started with stdout and stderr on one pipe the test holds.
struct Daemon {
    reaper: Reaper,
    /// The read end (kept unread while `Full`; dropped for `Closed`).
    read: Option<OwnedFd>,
    /// A write end of the pipe, to fill it.
    write: OwnedFd,
}

impl Daemon {
    fn start(dir: &TempDir, program: &Path, args: &[String]) -> Daemon {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("output pipe");
        // The ready pipe's write end must reach the child: no CLOEXEC (as spawn_ready does).
        let (ready_r, ready_w) = nix::unistd::pipe().expect("ready pipe");
        let out = write.try_clone().expect("dup");
        let err = write.try_clone().expect("dup");
        let child = Command::new(program)
            .args(args)
            .args(["--ready-fd", &ready_w.as_raw_fd().to_string()])
            .env("BLOCKD_LOG", "info")
            .env("BALLOOND_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", program.display()));
        drop(ready_w);
        let reaper = Reaper::new(child, &dir.0.display().to_string());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(std::fs::File::from(ready_r)), &mut s);
            let _ = tx.send(s);
        });
        let got = rx.recv_timeout(WAIT);
        assert_eq!(got.as_deref().ok(), Some("ready\n"), "{} did not report ready", program.display());
        Daemon { reaper, read: Some(read), write }
    }

    /// Makes the output what `output` says.
    fn spoil(&mut self, output: Output) {
        match output {
            Output::Closed => drop(self.read.take()),
            Output::Full => {
                // A new open file description of the pipe, non-blocking for the test only (the
                // daemon's own descriptors stay blocking).
                let path = format!("/proc/self/fd/{}", self.write.as_raw_fd());
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&path)
                    .expect("pipe again");
                let chunk = [b'.'; 4096];
                let mut filled = 0usize;
                loop {
                    match f.write(&chunk) {
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("filling the pipe: {e}"),
                    }
                }
                // Not even one byte fits now.
                match f.write(b".") {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    other => panic!("the pipe is not full after {filled} bytes: {other:?}"),
                }
            }
        }
    }

    /// SIGTERM; the exit code and how long it took. Fails if it outlives [`WAIT`].
    fn terminate(mut self, what: &str) -> (Option<i32>, Duration) {
        let t0 = Instant::now();
        signal(self.reaper.pid(), libc::SIGTERM);
        let status = wait_timeout(self.reaper.child(), WAIT);
        let took = t0.elapsed();
        let Some(status) = status else {
            let task_states = std::fs::read_dir(format!("/proc/{}/task", self.reaper.pid()))
                .map(|d| {
                    d.flatten()
                        .map(|t| std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            panic!("{what}: still running {WAIT:?} after SIGTERM (threads waiting in {task_states:?})");
        };
        (status.code(), took)
    }
}

fn bring_up(vm: &Vm) -> (Driver, Queue) {
    let d = Driver::probe(vm, SLOT);
    d.enable();
    let q = start_queue0(&d, RINGS);
    (d, q)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// blockd serving a qcow2 image; the test writes [`WRITES`] requests through vmm-core, spoils
/// blockd's output, disconnects (blockd's serving thread logs the disconnect: with a full pipe it
/// blocks there), sends SIGTERM: blockd exits 0 within [`EXIT_BOUND`] and the image is whole.
fn blockd_exits_cleanly(output: Output) {
    let dir = TempDir::new(&format!("backend-exit-blockd-{output:?}"));
    let img = dir.path("disk.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&img).arg("16M"));
    let sock = dir.path("blk.sock");
    let args = vec![
        "--socket-path".to_string(),
        sock.display().to_string(),
        "--drive".into(),
        format!("file={},format=qcow2", img.display()),
    ];
    let mut blockd = Daemon::start(&dir, &binaries().blockd, &args);
    let vm = machine_with_vhost_user(&dir, &sock, VirtioKind::Block, SLOT);
    let (_d, mut q) = bring_up(&vm);
    let statuses: Vec<u64> = (0..WRITES)
        .map(|i| {
            let data = vec![0x40 + i as u8; LEN];
            let (bufs, status) = blk_request(&vm, REQS + i * 0x20000, VIRTIO_BLK_T_OUT, i * 2048, &data);
            q.add(&bufs);
            status
        })
        .collect();
    q.kick();
    q.wait_used(WRITES as u16, WAIT).expect("writes completed");
    for s in statuses {
        let st: u8 = vm.guest_memory().mem.read_obj(GuestAddress(s)).expect("status");
        assert_eq!(st, 0, "VIRTIO_BLK_S_OK");
    }
    blockd.spoil(output);
    drop(vm);
    std::thread::sleep(Duration::from_millis(300));
    let (code, took) = blockd.terminate("blockd");
    assert_eq!(code, Some(0), "blockd's exit status with its output {output:?}");
    assert!(took < EXIT_BOUND, "blockd took {took:?} to exit with its output {output:?}");

    let check = run(Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&img));
    assert!(check.contains("No errors were found"), "qemu-img check:\n{check}");
    for i in 0..WRITES {
        let cmd = format!("read -P {:#x} {} {LEN}", 0x40 + i, i * (1 << 20));
        let out = run(Command::new("qemu-io").args(["-f", "qcow2", "-r", "-c", &cmd]).arg(&img));
        assert!(!out.contains("Pattern verification failed") && out.contains("read 65536/65536"), "{cmd}:\n{out}");
    }
}

/// balloond with no frontend: the test spoils its output, then connects and hangs up (balloond's
/// serving thread logs the connection: with a full pipe it blocks there), sends SIGTERM:
/// balloond exits 0 within [`EXIT_BOUND`].
fn balloond_exits_cleanly(output: Output) {
    let dir = TempDir::new(&format!("backend-exit-balloond-{output:?}"));
    let sock = dir.path("balloon.sock");
    let args = vec!["--socket-path".to_string(), sock.display().to_string(), "--mem-bytes".into(), "134217728".into()];
    let mut balloond = Daemon::start(&dir, &binaries().balloond, &args);
    balloond.spoil(output);
    drop(std::os::unix::net::UnixStream::connect(&sock).expect("connect"));
    std::thread::sleep(Duration::from_millis(300));
    let (code, took) = balloond.terminate("balloond");
    assert_eq!(code, Some(0), "balloond's exit status with its output {output:?}");
    assert!(took < EXIT_BOUND, "balloond took {took:?} to exit with its output {output:?}");
}

#[test]
fn blockd_with_a_full_output_pipe_flushes_and_exits_on_sigterm() {
    blockd_exits_cleanly(Output::Full);
}

#[test]
fn blockd_with_a_closed_output_pipe_flushes_and_exits_on_sigterm() {
    blockd_exits_cleanly(Output::Closed);
}

#[test]
fn balloond_with_a_full_output_pipe_exits_on_sigterm() {
    balloond_exits_cleanly(Output::Full);
}

#[test]
fn balloond_with_a_closed_output_pipe_exits_on_sigterm() {
    balloond_exits_cleanly(Output::Closed);
}
