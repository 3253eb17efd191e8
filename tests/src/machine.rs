//! Booting the test guest on vmm-core in-process, for tests that drive the Rust API directly.

use crate::console::Console;
use std::path::PathBuf;
use std::time::Duration;
use vm_config::{ChardevBackend, ChardevConfig, MachineConfig};
use vmm_core::Vm;

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("flotilla-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A machine config that boots the test guest with COM1 on a unix socket in `dir`.
pub fn guest_config(dir: &TempDir, cpus: u8, mem_mib: u64) -> MachineConfig {
    MachineConfig {
        name: Some("test-guest".into()),
        mem_bytes: mem_mib << 20,
        cpus,
        kernel: Some(crate::guest::guest_elf()),
        serial: Some(ChardevConfig {
            id: "serial0".into(),
            backend: ChardevBackend::UnixServer { path: dir.path("serial.sock"), wait: false },
        }),
        ..Default::default()
    }
}

pub const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Booted {
    pub vm: Vm,
    pub console: Console,
    pub dir: TempDir,
}

/// Builds the machine in `prelaunch`, connects to its console (a unix server drops output while
/// no client is attached), then starts it and waits for READY unless the config asked for `-S`.
pub fn boot(mut cfg: MachineConfig, dir: TempDir) -> Booted {
    let paused = cfg.start_paused;
    cfg.start_paused = true;
    let sock = match &cfg.serial {
        Some(ChardevConfig { backend: ChardevBackend::UnixServer { path, .. }, .. }) => path.clone(),
        _ => panic!("boot() needs a unix-socket serial"),
    };
    let vm = Vm::new(cfg).unwrap_or_else(|e| panic!("building the machine: {e}"));
    let mut console = Console::connect(&sock, BOOT_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    wait_for_client(&vm);
    if !paused {
        vm.cont().unwrap_or_else(|e| panic!("cont: {e}"));
        console.expect("READY", BOOT_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    }
    Booted { vm, console, dir }
}

/// Until the chardev has accepted our connection (query-chardev stops saying "disconnected:").
fn wait_for_client(vm: &Vm) {
    let deadline = std::time::Instant::now() + BOOT_TIMEOUT;
    while vm.chardevs().iter().any(|c| c.filename.starts_with("disconnected:")) {
        assert!(std::time::Instant::now() < deadline, "serial chardev never accepted the test's connection");
        std::thread::sleep(Duration::from_millis(5));
    }
}
