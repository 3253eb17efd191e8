//! blockd and balloond, the vhost-user backends the launcher runs for a VM:
//!
//! ```text
//! blockd   --config-json JSON --dbus-address ADDR --instance NAME --ready-fd FD   (with -drive)
//! balloond --config-json JSON --dbus-address ADDR --instance NAME --ready-fd FD   (with a balloon)
//! netd     --config-json JSON --dbus-address ADDR --instance NAME --ready-fd FD   (a NIC on tap/user)
//! ```
//!
//! netd also inherits its NICs' tap descriptors (the numbers in its config), at every start.
//!
//! Both are started after the bus and before vmm-core, and vmm-core is started only once each
//! has written `ready` on FD (its sockets listen then), within [`READY_TIMEOUT`]. One that
//! exits first fails the launch. Later they are [`Restartable`]s: restarted with the same
//! arguments and backoff when they exit, stale sockets removed first; vmm-core reconnects.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::SigSet;

use crate::device_plan::DevicePlan;
use crate::restart::{describe, Restartable};

/// How long a device daemon may take to say `ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot start {name} '{}': {source}", .program.display())]
    Spawn {
        name: &'static str,
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} exited before it was ready ({})", describe(*.status))]
    EarlyExit { name: &'static str, status: ExitStatus },
    #[error("{name} did not report ready within {:?}", READY_TIMEOUT)]
    NotReady { name: &'static str },
    #[error("terminating on signal {0} while the device daemons started")]
    Interrupted(i32),
    #[error("cannot create the vhost-user socket directory {}: {source}", .path.display())]
    SocketDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The binaries, found by the caller (`supervise::find_blockd` / `find_balloond`).
pub struct Binaries<'a> {
    pub blockd: Option<&'a Path>,
    pub balloond: Option<&'a Path>,
    pub netd: Option<&'a Path>,
}

/// The instance's device daemons.
pub struct DeviceDaemons {
    pub list: Vec<Restartable>,
}

/// The arguments a device daemon is started with (without `--ready-fd`, added per start).
pub fn daemon_args(config_json: String, address: &str, instance: &str) -> Vec<String> {
    vec![
        "--config-json".into(),
        config_json,
        "--dbus-address".into(),
        address.into(),
        "--instance".into(),
        instance.into(),
    ]
}

impl DeviceDaemons {
    /// Starts what `plan` needs and waits until every one is ready. Termination signals
    /// (blocked in this thread, in `signals`) that arrive meanwhile abort the start.
    pub fn start(
        plan: &DevicePlan,
        bins: &Binaries<'_>,
        address: &str,
        instance: &str,
        signals: &SigSet,
        pipe_stderr: bool,
    ) -> Result<DeviceDaemons, DaemonError> {
        let mut list = Vec::new();
        let configs = [
            ("blockd", bins.blockd, plan.blockd.as_ref().map(|c| c.to_json()), plan.blockd_sockets(), vec![]),
            ("balloond", bins.balloond, plan.balloond.as_ref().map(|c| c.to_json()), plan.balloond_sockets(), vec![]),
            ("netd", bins.netd, plan.netd.as_ref().map(|c| c.to_json()), plan.netd_sockets(), netd_fds(plan)),
        ];
        for (name, bin, json, sockets, fds) in configs {
            let (Some(bin), Some(json)) = (bin, json) else { continue };
            for dir in sockets.iter().filter_map(|s| s.parent()) {
                make_socket_dir(dir)?;
            }
            tracing::debug!(config = %json, "{name} configuration");
            let mut r = Restartable::new(name, bin, daemon_args(json, address, instance), sockets)
                .with_ready_fd()
                .inherit_fds(fds)
                .pipe_stderr(pipe_stderr);
            r.spawn().map_err(|source| DaemonError::Spawn { name, program: bin.to_path_buf(), source })?;
            list.push(r);
        }
        let mut daemons = DeviceDaemons { list };
        daemons.wait_ready(signals)?;
        Ok(daemons)
    }

    /// Waits for every daemon's `ready`, bounded.
    fn wait_ready(&mut self, signals: &SigSet) -> Result<(), DaemonError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut waiting: Vec<bool> = self.list.iter().map(|_| true).collect();
        while waiting.iter().any(|&w| w) {
            for (r, w) in self.list.iter_mut().zip(waiting.iter_mut()) {
                if !*w {
                    continue;
                }
                if r.check_ready() {
                    *w = false;
                } else if let Some(status) = r.exited() {
                    return Err(DaemonError::EarlyExit { name: r.name, status });
                }
            }
            if !waiting.iter().any(|&w| w) {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let name = self.list.iter().zip(&waiting).find(|(_, &w)| w).map_or("a device daemon", |(r, _)| r.name);
                return Err(DaemonError::NotReady { name });
            }
            // SIGCHLD wakes this early when a daemon exits; the pipe is polled every 10 ms.
            if let Some((sig, _)) = crate::supervise::wait_signal(signals, Some(left.min(Duration::from_millis(10)))) {
                if sig != libc::SIGCHLD {
                    return Err(DaemonError::Interrupted(sig));
                }
            }
        }
        Ok(())
    }

    /// Restarts those that exited, when their time comes.
    pub fn poll(&mut self) {
        for r in &mut self.list {
            r.poll();
        }
    }

    /// The earliest planned restart, or a readiness report awaited (checked every 20 ms).
    pub fn next_wakeup(&self) -> Option<Instant> {
        let mut t = self.list.iter().filter_map(Restartable::next_start).min();
        if self.list.iter().any(Restartable::ready_pending) {
            let soon = Instant::now() + Duration::from_millis(20);
            t = Some(t.map_or(soon, |x| x.min(soon)));
        }
        t
    }

    /// Ends them (blockd flushes its images on SIGTERM) and removes their sockets.
    pub fn stop(&mut self) {
        for r in &mut self.list {
            r.stop();
        }
    }

    /// The gateway's `--daemon` arguments for the daemons of this VM.
    pub fn gateway_args(plan: &DevicePlan) -> Vec<String> {
        let mut a = Vec::new();
        if plan.blockd.is_some() {
            a.extend(["--daemon".to_string(), "blockd".to_string()]);
        }
        if plan.balloond.is_some() {
            a.extend(["--daemon".to_string(), "balloond".to_string()]);
        }
        if plan.netd.is_some() {
            a.extend(["--daemon".to_string(), "netd".to_string()]);
        }
        a
    }
}

/// The tap descriptors netd's config names (the launcher holds them open).
fn netd_fds(plan: &DevicePlan) -> Vec<std::os::fd::RawFd> {
    let mut fds = Vec::new();
    for nic in plan.netd.iter().flat_map(|n| &n.nics) {
        match &nic.backend {
            vm_config::NetBackendConfig::Tap { fds: f, .. } => fds.extend(f),
            vm_config::NetBackendConfig::User { socket_fd: Some(f), .. } => fds.push(*f),
            vm_config::NetBackendConfig::User { socket_fd: None, .. } => {}
        }
    }
    fds
}

fn make_socket_dir(dir: &Path) -> Result<(), DaemonError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(source) => Err(DaemonError::SocketDir { path: dir.to_path_buf(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_plan::plan;
    use crate::devices::DeviceSet;
    use vm_config::DriveFormat;

    fn signals() -> SigSet {
        // The test thread blocks nothing; an empty set makes wait_signal a plain sleep.
        SigSet::empty()
    }

    /// A stand-in for blockd: a shell script that records its arguments and says ready (or not).
    fn fake(dir: &Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("script");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        p
    }

    fn one_drive(rt: &Path) -> DevicePlan {
        let mut s = DeviceSet::default();
        s.drive("file=/img,if=virtio,format=raw").expect("drive");
        s.finish().expect("finish");
        plan(&s, &[DriveFormat::Raw], &[], &[], rt, 1 << 30)
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("flotilla-devd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    #[test]
    fn waits_for_ready_and_passes_the_arguments() {
        let dir = scratch("ready");
        let out = dir.join("args");
        // The last two arguments are --ready-fd FD.
        let bin = fake(
            &dir,
            "blockd",
            &format!(
                "printf '%s\\n' \"$@\" > {}; for a; do last=$a; done; echo ready > /proc/self/fd/$last; exec sleep 30",
                out.display()
            ),
        );
        let p = one_drive(&dir);
        let mut d = DeviceDaemons::start(
            &p,
            &Binaries { blockd: Some(&bin), balloond: None, netd: None },
            "unix:path=/b",
            "vm1",
            &signals(),
            false,
        )
        .expect("start");
        let args = std::fs::read_to_string(&out).expect("args");
        let args: Vec<&str> = args.lines().collect();
        let json = p.blockd.as_ref().expect("blockd").to_json();
        assert_eq!(args[..6], ["--config-json", json.as_str(), "--dbus-address", "unix:path=/b", "--instance", "vm1"]);
        assert_eq!(args[6], "--ready-fd");
        assert!(dir.join("vhost-user").is_dir(), "the socket directory is made");
        assert_eq!(DeviceDaemons::gateway_args(&p), ["--daemon", "blockd"]);
        d.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_daemon_that_dies_first_fails_the_start() {
        let dir = scratch("early");
        let bin = fake(&dir, "blockd", "echo 'blockd: bad config' >&2; exit 1");
        let e = DeviceDaemons::start(
            &one_drive(&dir),
            &Binaries { blockd: Some(&bin), balloond: None, netd: None },
            "a",
            "vm",
            &signals(),
            true,
        )
        .err()
        .expect("must fail");
        assert_eq!(e.to_string(), "blockd exited before it was ready (exit status 1)");
        let e = DeviceDaemons::start(
            &one_drive(&dir),
            &Binaries { blockd: Some(&dir.join("missing")), balloond: None, netd: None },
            "a",
            "vm",
            &signals(),
            false,
        )
        .err()
        .expect("must fail");
        assert!(e.to_string().starts_with("cannot start blockd '"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn nothing_started_without_drives_or_balloon() {
        let mut s = DeviceSet::default();
        s.finish().expect("finish");
        let p = plan(&s, &[], &[], &[], Path::new("/nonexistent"), 1 << 30);
        let d = DeviceDaemons::start(
            &p,
            &Binaries { blockd: None, balloond: None, netd: None },
            "a",
            "vm",
            &signals(),
            false,
        )
        .expect("nothing to do");
        assert!(d.list.is_empty());
        assert!(DeviceDaemons::gateway_args(&p).is_empty());
    }
}
