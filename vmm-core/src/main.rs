//! The vmm-core process: `vmm-core --config-json '<MachineConfig as JSON>'`, as started by the
//! `flotilla` launcher. Runs the machine until the guest powers off, `quit`, or SIGTERM/SIGINT.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vm_config::MachineConfig;
use vmm_core::{ExitReason, Vm};

fn usage() -> &'static str {
    "usage: vmm-core --config-json JSON\n       (normally started by the flotilla launcher)"
}

fn parse_args() -> Result<MachineConfig, String> {
    let mut args = std::env::args().skip(1);
    let mut cfg = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config-json" => {
                let json = args.next().ok_or("--config-json needs a value")?;
                cfg = Some(MachineConfig::from_json(&json).map_err(|e| e.to_string())?);
            }
            "-h" | "--help" => return Err(usage().to_string()),
            other => return Err(format!("unknown argument '{other}'\n{}", usage())),
        }
    }
    cfg.ok_or_else(|| usage().to_string())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm-core: {e}");
            return ExitCode::from(1);
        }
    };
    let vm = match Vm::new(cfg) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("vmm-core: {e}");
            return ExitCode::from(1);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        if let Err(e) = register_flag(sig, stop.clone()) {
            eprintln!("vmm-core: cannot handle signal {sig}: {e}");
        }
    }
    loop {
        if let Some(reason) = vm.wait_timeout(Duration::from_millis(100)) {
            tracing::info!(?reason, "machine ended");
            return match reason {
                ExitReason::Quit | ExitReason::GuestPoweroff | ExitReason::GuestReset => ExitCode::SUCCESS,
            };
        }
        if stop.load(Ordering::SeqCst) {
            // QEMU: "terminating on signal", then a host-initiated shutdown.
            eprintln!("vmm-core: terminating on signal");
            vm.quit();
        }
    }
}

static FLAGS: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

extern "C" fn on_signal(_: libc::c_int) {
    if let Some(f) = FLAGS.get() {
        f.store(true, Ordering::SeqCst);
    }
}

/// Sets `flag` when `sig` arrives (the main loop polls it).
fn register_flag(sig: i32, flag: Arc<AtomicBool>) -> std::io::Result<()> {
    let _ = FLAGS.set(flag);
    // SAFETY: the handler only does an atomic store.
    let r = unsafe { libc::signal(sig, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    if r == libc::SIG_ERR {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
