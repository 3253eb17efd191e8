//! QEMU (`-accel tcg`) booting the Linux guest kit (`linux_kit`) with one device on a
//! vhost-user backend under test, driven through its serial console's shell: what
//! `blockd_qemu.rs` and `netd_qemu.rs` share. Guest RAM is a shared memfd, as vhost-user needs.

use crate::console::Console;
use crate::linux_kit;
use crate::process::{wait_timeout, Collector, Reaper};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct QemuGuest {
    pub reaper: Reaper,
    pub console: Console,
    pub stderr: Collector,
}

impl QemuGuest {
    /// Boots with `smp` vCPUs, the device arguments `devices` (chardev, -device/-netdev) and
    /// the kernel command line `append`, and returns once the guest's shell answers (within
    /// `boot` for Linux to reach /init, `reply` for the shell). Panics with QEMU's stderr when
    /// it does not get there.
    pub fn boot(serial: &Path, smp: u32, devices: &[String], append: &str, boot: Duration, reply: Duration) -> QemuGuest {
        let kit = linux_kit::kit().unwrap_or_else(|e| panic!("building the Linux guest kit: {e}"));
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-m", "512", "-smp", &smp.to_string()])
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa", "node,memdev=mem"])
            .args(devices)
            .arg("-kernel")
            .arg(&kit.kernel)
            .arg("-initrd")
            .arg(&kit.initrd)
            .args(["-append", append, "-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("unix:{},server=on,wait=on", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning qemu-system-x86_64 (scripts/setup-host installs it)");
        let mut reaper = Reaper::new(child, &serial.display().to_string());
        let stderr = Collector::new(reaper.child().stderr.take().expect("stderr"));
        let console = Console::connect(serial, Duration::from_secs(20)).expect("QEMU's serial socket");
        let mut q = QemuGuest { reaper, console, stderr };
        if let Err(e) = q.console.expect("FLOTILLA-LINUX-READY", boot) {
            q.fail(&format!("Linux did not reach /init: {e}"));
        }
        // The shell may drop what is typed before it starts: ask until it answers.
        let deadline = Instant::now() + reply;
        loop {
            match q.console.command("echo \"UP\"\"=1\"", "UP=1", Duration::from_secs(2)) {
                Ok(_) => break,
                Err(e) if Instant::now() >= deadline => q.fail(&format!("the shell does not answer: {e}")),
                Err(_) => {}
            }
        }
        q
    }

    /// Ends QEMU and panics with `what` and QEMU's stderr.
    pub fn fail(&mut self, what: &str) -> ! {
        let _ = self.reaper.child().kill();
        let _ = self.reaper.child().wait();
        panic!("{what}\nQEMU's stderr:\n{}", self.stderr.take());
    }

    /// Runs `cmd` in the guest shell and returns what it leaves in `$R`: the value of the
    /// `key=` line it echoes (the key is split with quotes in the typed line, so the echo of
    /// the input never matches).
    pub fn ask(&mut self, key: &str, cmd: &str, timeout: Duration) -> String {
        let (a, b) = key.split_at(1);
        let line = format!("{cmd}; echo \"{a}\"\"{b}=$R\"");
        match self.console.command(&line, &format!("{key}="), timeout) {
            Ok(l) => l[key.len() + 1..].trim().to_string(),
            Err(e) => self.fail(&format!("guest command {cmd:?}: {e}")),
        }
    }

    /// Powers the guest off and waits for QEMU to exit (killed if it does not).
    pub fn poweroff(mut self) {
        let _ = self.console.send("sync; poweroff -f");
        if wait_timeout(self.reaper.child(), Duration::from_secs(20)).is_none() {
            let _ = self.reaper.child().kill();
            let _ = self.reaper.child().wait();
        }
    }
}
