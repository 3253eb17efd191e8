//! What the `block` and `balloon` parts share around their own work: options parsed (or the
//! usage printed for --help), the bench made the subreaper of what it starts, the part run, and
//! its report printed — JSON on stdout with the table on stderr under --json, the table on
//! stdout otherwise. Exit status 2 for a bad command line, 1 for an error or failed runs.

use std::fmt::Display;
use std::process::ExitCode;

use serde_json::Value;

/// `name` is the part (`block`), `unit` what its failures count (`runs`, `rounds`).
pub fn main<O, P: Display, R: std::error::Error>(
    name: &str,
    unit: &str,
    usage: &str,
    parsed: Result<Option<O>, P>,
    json: impl Fn(&O) -> bool,
    run: impl FnOnce(&O) -> Result<(Value, String, bool), R>,
) -> ExitCode {
    let o = match parsed {
        Ok(Some(o)) => o,
        Ok(None) => {
            print!("{usage}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("flotilla-bench {name}: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = crate::vmproc::become_subreaper() {
        eprintln!("flotilla-bench {name}: {}", crate::error::chain(&e));
        return ExitCode::from(1);
    }
    match run(&o) {
        Ok((report, table, failed)) => {
            if json(&o) {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
                );
                eprint!("{table}");
            } else {
                print!("{table}");
            }
            if failed {
                eprintln!("flotilla-bench {name}: some {unit} failed (see \"failures\")");
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("flotilla-bench {name}: {}", crate::error::chain(&e));
            ExitCode::from(1)
        }
    }
}
