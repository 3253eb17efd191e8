//! The vmm-core process: `vmm-core --config-json '<MachineConfig as JSON>' [--dbus-address ADDR
//! --instance NAME]`, as started by the `flotilla` launcher. Runs the machine until the guest
//! powers off, `quit`, or SIGTERM/SIGINT/SIGHUP. With `--dbus-address` it serves
//! `org.flotilla.VmmCore1` as `org.flotilla.<NAME>.VmmCore` on that bus (see `dbus.rs`). With
//! `--ready-fd FD` it writes `ready\n` to that (inherited) file descriptor and closes it once the
//! machine is built and, with D-Bus, its bus name is owned: the launcher starts the QMP gateway
//! then.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vm_config::MachineConfig;
use vmm_core::dbus::DbusServer;
use vmm_core::{EventReason, ExitReason, Vm};

/// How long the D-Bus side may take to send its last events and replies at exit.
const DBUS_SHUTDOWN: Duration = Duration::from_secs(3);

fn usage() -> &'static str {
    "usage: vmm-core --config-json JSON [--dbus-address ADDRESS --instance NAME] [--ready-fd FD]\n       \
     (normally started by the flotilla launcher)"
}

struct Args {
    cfg: MachineConfig,
    /// (bus address, instance name)
    dbus: Option<(String, String)>,
    /// An inherited fd to report readiness on.
    ready_fd: Option<i32>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut cfg = None;
    let (mut address, mut instance, mut ready_fd) = (None, None, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config-json" => {
                let json = args.next().ok_or("--config-json needs a value")?;
                cfg = Some(MachineConfig::from_json(&json).map_err(|e| e.to_string())?);
            }
            "--dbus-address" => address = Some(args.next().ok_or("--dbus-address needs a value")?),
            "--instance" => instance = Some(args.next().ok_or("--instance needs a value")?),
            "--ready-fd" => {
                let fd = args.next().ok_or("--ready-fd needs a value")?;
                ready_fd =
                    Some(fd.parse().ok().filter(|&n: &i32| n > 2).ok_or("--ready-fd needs a descriptor above 2")?);
            }
            "-h" | "--help" => return Err(usage().to_string()),
            other => return Err(format!("unknown argument '{other}'\n{}", usage())),
        }
    }
    let cfg = cfg.ok_or_else(|| usage().to_string())?;
    let dbus = match (address, instance) {
        (Some(a), Some(i)) => Some((a, i)),
        (None, None) => None,
        _ => return Err(format!("--dbus-address and --instance go together\n{}", usage())),
    };
    Ok(Args { cfg, dbus, ready_fd })
}

fn main() -> ExitCode {
    daemon_logging::init();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vmm-core: {e}");
            return ExitCode::from(1);
        }
    };
    let vm = match Vm::new(args.cfg) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("vmm-core: {e}");
            return ExitCode::from(1);
        }
    };
    let bus = match &args.dbus {
        None => None,
        Some((address, instance)) => match DbusServer::start(vm.clone(), address, instance) {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("vmm-core: {e}");
                return ExitCode::from(1);
            }
        },
    };
    if let Some(fd) = args.ready_fd {
        if let Err(e) = daemon_start::report_ready(fd) {
            tracing::warn!("cannot report readiness on fd {fd}: {e}");
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        if let Err(e) = register_flag(sig, stop.clone()) {
            eprintln!("vmm-core: cannot handle signal {sig}: {e}");
        }
    }
    loop {
        if let Some(reason) = vm.wait_timeout(Duration::from_millis(100)) {
            tracing::info!(?reason, "machine ended");
            if let Some(bus) = bus {
                bus.shutdown(DBUS_SHUTDOWN);
            }
            return match reason {
                ExitReason::Quit | ExitReason::GuestPoweroff | ExitReason::GuestReset => ExitCode::SUCCESS,
            };
        }
        if stop.load(Ordering::SeqCst) {
            // QEMU: "terminating on signal", then a host-initiated shutdown.
            eprintln!("vmm-core: terminating on signal");
            vm.quit_because(EventReason::HostSignal);
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
