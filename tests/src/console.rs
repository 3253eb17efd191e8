//! The test guest's serial console as tests see it: a unix-socket client that splits the
//! guest's output into lines and waits for the one a test expects, always with a deadline.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("could not connect to the serial socket {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("timed out after {timeout:?} waiting for a line starting with '{want}'; last lines:\n{seen}")]
    Timeout { want: String, timeout: Duration, seen: String },
    #[error("the console closed while waiting for '{want}'; last lines:\n{seen}")]
    Closed { want: String, seen: String },
    #[error("writing to the console: {0}")]
    Write(std::io::Error),
}

/// Connects to a `-serial unix:PATH,server` socket, retrying until `timeout`, and splits what
/// the guest writes into lines on a reader thread; each line goes through `make` with the
/// instant its newline arrived. Returns the lines and the socket to write commands to.
pub fn connect_lines<T: Send + 'static>(
    path: &Path,
    timeout: Duration,
    make: fn(Instant, String) -> T,
) -> Result<(Receiver<T>, UnixStream), ConsoleError> {
    let deadline = Instant::now() + timeout;
    let stream = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => return Err(ConsoleError::Connect(path.display().to_string(), e)),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let reader = stream.try_clone().map_err(|e| ConsoleError::Connect(path.display().to_string(), e))?;
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).split(b'\n') {
            let at = Instant::now();
            let Ok(line) = line else { return };
            let text = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
            if tx.send(make(at, text)).is_err() {
                return;
            }
        }
    });
    Ok((rx, stream))
}

pub struct Console {
    lines: Receiver<String>,
    writer: UnixStream,
    /// Everything seen so far, for error messages.
    pub history: Vec<String>,
}

impl Console {
    /// Connects to a `-serial unix:PATH,server,nowait` socket, retrying until `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Console, ConsoleError> {
        let (lines, writer) = connect_lines(path, timeout, |_, text| text)?;
        Ok(Console { lines, writer, history: Vec::new() })
    }

    fn tail(&self) -> String {
        let n = self.history.len();
        self.history[n.saturating_sub(20)..].join("\n")
    }

    /// Waits for a line starting with `prefix`; returns it.
    pub fn expect(&mut self, prefix: &str, timeout: Duration) -> Result<String, ConsoleError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.history.push(line.clone());
                    if line.starts_with(prefix) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(ConsoleError::Timeout { want: prefix.into(), timeout, seen: self.tail() })
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(ConsoleError::Closed { want: prefix.into(), seen: self.tail() })
                }
            }
        }
    }

    /// Collects every line that arrives within `window` (for "nothing happens" checks).
    pub fn drain_for(&mut self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut got = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.history.push(l.clone());
                    got.push(l);
                }
                Err(_) => break,
            }
        }
        got
    }

    /// Sends one command line.
    pub fn send(&mut self, line: &str) -> Result<(), ConsoleError> {
        self.writer.write_all(format!("{line}\n").as_bytes()).map_err(ConsoleError::Write)
    }

    /// Sends a command and waits for the answer line starting with `answer`.
    pub fn command(&mut self, line: &str, answer: &str, timeout: Duration) -> Result<String, ConsoleError> {
        self.send(line)?;
        self.expect(answer, timeout)
    }
}

/// Parses `key=value` fields of a guest report line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields() {
        let l = "CPUS madt=4 online=4";
        assert_eq!(field(l, "madt"), Some("4"));
        assert_eq!(field(l, "online"), Some("4"));
        assert_eq!(field(l, "x"), None);
    }
}
