//! The test guest's serial console with every line timestamped when it arrives on the host (on
//! the reader thread, so a caller busy elsewhere, e.g. restarting a backend, does not delay the
//! stamp): for timing guest events from the host, as `flotilla-bench restart --frontend
//! vmm-core` times the guest's `blkpulse` completion lines.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::console::{connect_lines, ConsoleError};

/// One line of guest output and when its newline reached the host.
#[derive(Debug, Clone)]
pub struct Line {
    pub at: Instant,
    pub text: String,
}

pub struct StampedConsole {
    lines: Receiver<Line>,
    writer: UnixStream,
}

/// Why [`StampedConsole::next`] returned no line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoLine {
    Timeout,
    Closed,
}

impl StampedConsole {
    /// Connects to a `-serial unix:PATH,server` socket, retrying until `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<StampedConsole, ConsoleError> {
        let (lines, writer) = connect_lines(path, timeout, |at, text| Line { at, text })?;
        Ok(StampedConsole { lines, writer })
    }

    /// The next line, waiting up to `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Result<Line, NoLine> {
        self.lines.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => NoLine::Timeout,
            RecvTimeoutError::Disconnected => NoLine::Closed,
        })
    }

    /// The next line starting with `prefix` within `timeout` (others skipped).
    pub fn expect(&mut self, prefix: &str, timeout: Duration) -> Result<Line, NoLine> {
        let deadline = Instant::now() + timeout;
        loop {
            let l = self.next(deadline.saturating_duration_since(Instant::now()))?;
            if l.text.starts_with(prefix) {
                return Ok(l);
            }
        }
    }

    /// Sends one command line.
    pub fn send(&mut self, line: &str) -> Result<(), ConsoleError> {
        self.writer.write_all(format!("{line}\n").as_bytes()).map_err(ConsoleError::Write)
    }
}
