//! A private dbus-daemon for one test (the launcher runs its own, `flotilla/src/bus.rs`): a
//! session-type bus listening in the test's scratch directory, anyone may own any name,
//! killed (with everything mentioning the directory) when dropped.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::machine::TempDir;
use crate::process::Reaper;

pub struct Bus {
    _reaper: Reaper,
    /// The D-Bus address (`unix:path=...`) to hand to daemons and clients.
    pub address: String,
}

impl Bus {
    /// Starts the daemon and returns once its socket exists (bounded by `timeout`).
    pub fn start(dir: &TempDir, timeout: Duration) -> Bus {
        let sock = dir.path("bus.sock");
        let conf = dir.path("bus.conf");
        let xml = format!(
            "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\" \
             \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n<busconfig><type>session</type>\
             <listen>unix:path={}</listen><auth>EXTERNAL</auth><policy context=\"default\">\
             <allow send_destination=\"*\" eavesdrop=\"true\"/><allow eavesdrop=\"true\"/><allow own=\"*\"/>\
             </policy></busconfig>\n",
            sock.display()
        );
        std::fs::write(&conf, xml).expect("bus config");
        let child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .args(["--nofork", "--nopidfile"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon (package dbus)");
        let reaper = Reaper::new(child, &dir.0.display().to_string());
        let deadline = Instant::now() + timeout;
        while !sock.exists() {
            assert!(Instant::now() < deadline, "dbus-daemon did not create {}", sock.display());
            std::thread::sleep(Duration::from_millis(10));
        }
        Bus { _reaper: reaper, address: format!("unix:path={}", sock.display()) }
    }
}
