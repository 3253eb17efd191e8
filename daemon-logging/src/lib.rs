//! Logging set-up shared by every Flotilla process (launcher, vmm-core, gateway, device
//! daemons), so they all log the same way: to stderr, filtered by an environment variable, with
//! terminal colours only when stderr is a terminal (under the launcher or systemd it is a pipe
//! or the journal, where escape codes are noise).
//!
//! Through a writer that can neither panic nor hold a lock: with `std::io::stderr()` every write
//! takes std's stderr lock, so a thread blocked on a full stderr pipe makes every other thread
//! that logs wait on that lock for ever (a daemon stuck at exit on a futex, issue 9); and when a
//! write fails (the pipe's reader is gone), tracing-subscriber reports it with `eprintln!`,
//! which panics on the same closed pipe and kills the logging thread. Here each line is one
//! `write(2)` on fd 2 (a line of at most `PIPE_BUF` bytes is not interleaved with another) and a
//! failed write drops the line.

use std::io::{self, IsTerminal, Write};
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber filtered by `RUST_LOG` (default `warn`). Call once, first
/// thing in `main`.
pub fn init() {
    init_from("RUST_LOG", "warn");
}

/// Like [`init`], with the filter read from `var`, or `default` when it is unset or invalid.
pub fn init_from(var: &str, default: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env(var).unwrap_or_else(|_| EnvFilter::new(default)))
        .with_writer(|| RawStderr)
        .with_ansi(io::stderr().is_terminal())
        .try_init();
}

/// Writes `text` to stderr the same way (no lock, no panic); for the last words of `main`.
pub fn stderr_line(text: &str) {
    let _ = RawStderr.write_all(format!("{text}\n").as_bytes());
}

/// fd 2 without std's lock; a write that fails is dropped (reported as written).
pub struct RawStderr;

impl Write for RawStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: writes from a valid slice of `buf.len()` bytes; fd 2 is only written.
            let n = unsafe { libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), buf.len()) };
            if n >= 0 {
                // `write` returns at most `buf.len()`, so this fits.
                return Ok(usize::try_from(n).unwrap_or(buf.len()));
            }
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                // EPIPE, EBADF, EIO...: nobody can read the log; the line is lost, not the thread.
                return Ok(buf.len());
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_to_a_closed_descriptor_is_dropped_without_an_error() {
        // Run in a child so the test harness keeps its own fd 2.
        if std::env::var_os("DAEMON_LOGGING_CHILD").is_some() {
            // SAFETY: closing our own stderr in this throw-away child process.
            unsafe { libc::close(libc::STDERR_FILENO) };
            assert_eq!(RawStderr.write(b"lost\n").ok(), Some(5));
            stderr_line("also lost");
            std::process::exit(7);
        }
        let exe = std::env::current_exe().expect("test executable");
        let st = std::process::Command::new(exe)
            .args(["--exact", "tests::a_line_to_a_closed_descriptor_is_dropped_without_an_error"])
            .env("DAEMON_LOGGING_CHILD", "1")
            .stdout(std::process::Stdio::null())
            .status()
            .expect("child");
        assert_eq!(st.code(), Some(7));
    }
}
