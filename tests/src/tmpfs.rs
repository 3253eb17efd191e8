//! A small tmpfs mounted for one test (ENOSPC on demand), unmounted when dropped. Mounting
//! needs root: as root directly, otherwise through `sudo -n` (CI may run as a user with sudo,
//! as scripts/setup-host allows); the tmpfs then belongs to the test's user so the daemons it
//! starts can write there.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Tmpfs(pub PathBuf);

fn privileged(program: &str) -> Command {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.args(["-n", program]);
        c
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed (mounting a tmpfs needs root or passwordless sudo): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount(8) spelling: `1m`, `64m`) at `path`, creating it.
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        // SAFETY: getuid/getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let opts = format!("size={size},uid={uid},gid={gid},mode=0700");
        run(privileged("mount").args(["-t", "tmpfs", "-o", &opts, "tmpfs"]).arg(path));
        Tmpfs(path.to_path_buf())
    }

    /// Changes its size in place (frees space for a held write, or takes it away).
    pub fn resize(&self, size: &str) {
        run(privileged("mount").args(["-o", &format!("remount,size={size}")]).arg(&self.0));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = privileged("umount").arg("-l").arg(&self.0).status();
    }
}
