//! The real `qemu.qmp` Python library (and its `qmp-shell`) against the gateway. Nothing is
//! skipped: without python3 or qemu.qmp the test fails and says what to install.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn require_qemu_qmp() {
    let out = Command::new("python3").args(["-c", "import qemu.qmp, qemu.qmp.legacy"]).output();
    match out {
        Err(e) => panic!("python3 is needed for this test ({e}): install python3 and `pip install qemu.qmp`"),
        Ok(o) if !o.status.success() => panic!(
            "the qemu.qmp Python library is needed for this test: `pip install qemu.qmp` \
             (python3 said: {})",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Ok(_) => {}
    }
}

/// Runs a command with stdin, killing it after `limit`.
fn run_bounded(mut cmd: Command, stdin: &[u8], limit: Duration) -> std::process::Output {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} did not finish within {limit:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn qemu_qmp_library_drives_the_gateway() {
    require_qemu_qmp();
    let vm = Vm::start("pyqmp");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/qemu_qmp_client.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script).arg(&vm.gateway.sock).arg(vm.gateway.tcp_port.to_string()).arg(&vm.dir);
    let out = run_bounded(cmd, b"", Duration::from_secs(90));
    assert!(
        out.status.success(),
        "qemu.qmp checks failed\nstdout: {}\nstderr: {}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        vm.gateway.log()
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("all checks passed"));
}

#[test]
fn qmp_shell_drives_the_gateway() {
    require_qemu_qmp();
    let vm = Vm::start("qmpshell");
    let shell = |args: &[&str], input: &[u8]| -> String {
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "qemu.qmp.qmp_shell"]).args(args).arg(&vm.gateway.sock);
        let out = run_bounded(cmd, input, Duration::from_secs(60));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "qmp-shell failed\nstdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    // QMP mode.
    let out = shell(&[], b"query-name\nstop\nquery-status\nquery-balloon\n");
    assert!(out.contains("Connected to QEMU 1.1.0"), "{out}");
    assert!(out.contains(r#"{"return": {"name": "mock-vm"}}"#), "{out}");
    assert!(out.contains(r#""status": "paused""#), "{out}");
    assert!(out.contains(r#""class": "DeviceNotActive""#), "{out}");
    // HMP mode: every line goes through human-monitor-command.
    let out = shell(&["-H"], b"info status\ncont\ninfo status\nnosuchhmp\n");
    assert!(out.contains("VM status: paused"), "{out}");
    assert!(out.contains("VM status: running"), "{out}");
    assert!(out.contains("unknown command: 'nosuchhmp'"), "{out}");
}
