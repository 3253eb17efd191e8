//! QEMU (`-accel tcg`) booting the Linux guest kit with one vhost-user-blk-pci device whose
//! chardev reconnects (`reconnect=1`: QEMU 7.2 counts in whole seconds, so a restarted backend
//! is reconnected to 1 s after the old one vanished). The serial console is read on a thread
//! that stamps each line with its arrival time, which is what the restart timings are made of.

use crate::linux_kit::kit;
use super::RigError;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(120);
const REPLY: Duration = Duration::from_secs(30);

/// A console line and when it arrived.
pub type Line = (Instant, String);

pub struct Qemu {
    child: Child,
    lines: Receiver<Line>,
    writer: UnixStream,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// The last console lines, for error messages.
    pub recent: std::collections::VecDeque<String>,
}

impl Qemu {
    /// Boots and returns once the guest's shell answers. `smp` vCPUs, `num_queues` queues.
    pub fn boot(dir: &Path, socket: &Path, smp: u32, num_queues: u32) -> Result<Qemu, RigError> {
        let kit = kit().map_err(|detail| RigError::Process { what: "building the Linux guest kit".into(), detail })?;
        let serial = dir.join("serial.sock");
        let _ = std::fs::remove_file(&serial);
        let mut cmd = Command::new("qemu-system-x86_64");
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory: QEMU must
        // not outlive the test or bench (thread) that started it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .args(["-accel", "tcg", "-m", "512", "-smp", &smp.to_string()])
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa", "node,memdev=mem"])
            .arg("-chardev")
            .arg(format!("socket,id=vub,path={},reconnect=1", socket.display()))
            .args(["-device", &format!("vhost-user-blk-pci,chardev=vub,num-queues={num_queues}")])
            .arg("-kernel")
            .arg(&kit.kernel)
            .arg("-initrd")
            .arg(&kit.initrd)
            .args(["-append", "console=ttyS0 panic=-1 quiet", "-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("unix:{},server=on,wait=on", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(RigError::io("spawning qemu-system-x86_64 (scripts/setup-host installs it)"))?;
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        if let Some(mut pipe) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut s) = sink.lock() {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        let stream = connect(&serial, &mut child, &stderr)?;
        let reader = stream.try_clone().map_err(RigError::io("cloning the serial socket"))?;
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).split(b'\n') {
                let Ok(line) = line else { return };
                let text = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
                if tx.send((Instant::now(), text)).is_err() {
                    return;
                }
            }
        });
        let mut q = Qemu { child, lines: rx, writer: stream, stderr, recent: Default::default() };
        q.wait_for(|l| l.starts_with("FLOTILLA-LINUX-READY"), BOOT, "Linux reaching /init")?;
        // The shell may drop what is typed before it starts: ask until it answers.
        let deadline = Instant::now() + REPLY;
        loop {
            q.send("echo \"UP\"\"=1\"")?;
            match q.wait_for(|l| l.starts_with("UP=1"), Duration::from_secs(2), "the shell answering") {
                Ok(_) => return Ok(q),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => {}
            }
        }
    }

    /// The next console line, or None when `deadline` passed.
    pub fn next_line(&mut self, deadline: Instant) -> Result<Option<Line>, RigError> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(l) => {
                if self.recent.len() >= 40 {
                    self.recent.pop_front();
                }
                self.recent.push_back(l.1.clone());
                Ok(Some(l))
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(self.guest_error("the console closed (QEMU exited?)")),
        }
    }

    /// Waits for a line `want` accepts; `what` names it in the error.
    pub fn wait_for(&mut self, want: impl Fn(&str) -> bool, timeout: Duration, what: &str) -> Result<Line, RigError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_line(deadline)? {
                Some(l) if want(&l.1) => return Ok(l),
                Some(_) => {}
                None => return Err(self.guest_error(&format!("timed out after {timeout:?} waiting for {what}"))),
            }
        }
    }

    /// Runs `cmd` in the guest's shell and returns the value it leaves in `$R` (the marker is
    /// split with quotes in the typed line, so the echoed input never matches).
    pub fn ask(&mut self, key: &str, cmd: &str) -> Result<String, RigError> {
        let (a, b) = key.split_at(1);
        self.send(&format!("{cmd}; echo \"{a}\"\"{b}=$R\""))?;
        let prefix = format!("{key}=");
        let (_, l) = self.wait_for(|l| l.starts_with(&prefix), REPLY, &prefix)?;
        Ok(l[prefix.len()..].trim().to_string())
    }

    pub fn send(&mut self, line: &str) -> Result<(), RigError> {
        self.writer.write_all(format!("{line}\n").as_bytes()).map_err(RigError::io("writing to the guest console"))
    }

    pub fn guest_error(&self, what: &str) -> RigError {
        let stderr = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        let seen = self.recent.iter().cloned().collect::<Vec<_>>().join("\n");
        RigError::Guest { what: format!("{what} (QEMU's stderr: {})", stderr.trim()), seen }
    }

    /// Powers the guest off; QEMU is killed if it has not exited within 20 s.
    pub fn poweroff(&mut self) {
        let _ = self.send("poweroff -f");
        if crate::process::wait_timeout(&mut self.child, Duration::from_secs(20)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// QEMU creates the serial socket and waits for us (`wait=on`) before it starts the guest.
fn connect(serial: &Path, child: &mut Child, stderr: &std::sync::Mutex<String>) -> Result<UnixStream, RigError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match UnixStream::connect(serial) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(RigError::Io {
                    what: format!("connecting to QEMU's serial {}", serial.display()),
                    source: e,
                })
            }
            Err(_) => {}
        }
        if let Ok(Some(st)) = child.try_wait() {
            // Give the stderr thread a moment to read what QEMU said.
            std::thread::sleep(Duration::from_millis(100));
            let detail = stderr.lock().map(|s| s.clone()).unwrap_or_default();
            return Err(RigError::Process { what: format!("qemu-system-x86_64 exited at start ({st})"), detail });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
