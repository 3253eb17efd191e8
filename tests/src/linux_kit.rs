//! The Linux guest kit (`tests/kit/build-linux-kit.sh`: Debian's kernel, a busybox initramfs),
//! built on first use and cached by the script; this module runs it once per process. Used by
//! the tests and the bench that boot Linux under QEMU with one of our daemons as its backend.

use crate::process::{wait_timeout, Collector};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Kit {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The kit's kernel and initramfs; the build script runs at most once per process (its first
/// run downloads two Debian packages, hence the long bound).
pub fn kit() -> Result<Kit, String> {
    static KIT: OnceLock<Result<Kit, String>> = OnceLock::new();
    KIT.get_or_init(build).clone()
}

fn build() -> Result<Kit, String> {
    let out = run_kit_script("build-linux-kit.sh", Duration::from_secs(600))?;
    Ok(Kit { kernel: printed(&out, "KERNEL=")?.into(), initrd: printed(&out, "INITRD=")?.into() })
}

/// Runs one of `tests/kit/`'s build scripts, bounded (in its own process group, killed whole
/// on a timeout), and returns what it printed on stdout; its stderr is in the error.
pub fn run_kit_script(name: &str, timeout: Duration) -> Result<String, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kit").join(name);
    let mut child = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    let mut out = Collector::new(child.stdout.take().ok_or("no stdout pipe")?);
    let mut err = Collector::new(child.stderr.take().ok_or("no stderr pipe")?);
    let Some(status) = wait_timeout(&mut child, timeout) else {
        // SAFETY: kill(2) on the process group created above.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
        return Err(format!("{} timed out after {timeout:?}:\n{}", script.display(), err.take()));
    };
    let (out, err) = (out.take(), err.take());
    if !status.success() {
        return Err(format!("{} failed:\n{err}", script.display()));
    }
    Ok(out)
}

/// The value of a `KEY=value` line a kit script printed.
pub fn printed(out: &str, key: &str) -> Result<String, String> {
    out.lines().find_map(|l| l.strip_prefix(key)).map(str::to_string).ok_or(format!("no {key} in:\n{out}"))
}
