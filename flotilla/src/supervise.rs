//! Runs one VM instance's processes and supervises them the way a QEMU process behaves to its
//! caller: SIGTERM/SIGINT/SIGHUP reach the VM, the launcher exits with the VM's exit status,
//! `-pidfile` holds the launcher's pid while it runs, and `-daemonize` returns to the caller
//! once the VM has started.
//!
//! The processes, in start order:
//! 1. a private `dbus-daemon` in the instance's runtime directory (`bus.rs`);
//! 2. with `-drive`, blockd, and with a balloon, balloond (`device_daemons.rs`), each waited
//!    for until it says `ready`; later restarted like the gateway when they exit;
//! 3. `vmm-core --config-json '<json>' --dbus-address ADDR --instance NAME --ready-fd FD`, which
//!    says `ready` on FD once the machine is built and its bus name owned;
//! 4. with `-qmp`, then: `qmp-gateway --dbus-address ADDR --instance NAME --qmp SPEC...
//!    [--daemon blockd] [--daemon balloond] [--daemon netd] [--nic JSON]...` (one `--qmp` per socket, see
//!    `QmpSocket::gateway_spec`). A gateway that exits is started again after a delay that
//!    doubles from 100 ms up to 5 s (back to 100 ms after a run of 10 s; `restart.rs`).
//!
//! The instance NAME is `-name`, else `vm<launcher pid>`. When vmm-core exits (guest power-off,
//! `quit`, a signal) the gateway, the device daemons and the bus are terminated (SIGTERM,
//! SIGKILL after 2 s), the QMP and vhost-user unix sockets and the runtime directory removed,
//! and the launcher exits like vmm-core.

use std::fs::File;
use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::termios::{self, SetArg, Termios};
use nix::unistd::{fork, setsid, ForkResult, Pid};

use crate::bus::{BusError, PrivateBus, RuntimeDir, TERM_GRACE};
use crate::cli::{LaunchOptions, QmpSocket};
use crate::device_daemons::{Binaries, DaemonError, DeviceDaemons};
use crate::drive_files::FileError;
use crate::restart::{remove_socket_files, ReadyPipe, Restartable};

/// Environment variable naming the vmm-core binary (default: next to this executable).
pub const VMM_CORE_ENV: &str = "FLOTILLA_VMM_CORE";
/// Environment variable naming the qmp-gateway binary (default: next to this executable).
pub const GATEWAY_ENV: &str = "FLOTILLA_QMP_GATEWAY";
/// Environment variable naming the blockd binary (default: next to this executable).
pub const BLOCKD_ENV: &str = "FLOTILLA_BLOCKD";
/// Environment variable naming the balloond binary (default: next to this executable).
pub const BALLOOND_ENV: &str = "FLOTILLA_BALLOOND";
/// Environment variable naming the netd binary (default: next to this executable).
pub const NETD_ENV: &str = "FLOTILLA_NETD";
/// How long a daemonizing launcher watches vmm-core for an early failure before detaching.
const DAEMON_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot find vmm-core at '{0}' (set {VMM_CORE_ENV} to its path)")]
    VmmCoreMissing(PathBuf),
    #[error("cannot find qmp-gateway at '{0}' (set {GATEWAY_ENV} to its path)")]
    GatewayMissing(PathBuf),
    #[error("cannot find blockd at '{0}' (set {BLOCKD_ENV} to its path)")]
    BlockdMissing(PathBuf),
    #[error("cannot find balloond at '{0}' (set {BALLOOND_ENV} to its path)")]
    BalloondMissing(PathBuf),
    #[error("cannot find netd at '{0}' (set {NETD_ENV} to its path)")]
    NetdMissing(PathBuf),
    #[error(transparent)]
    Tap(#[from] crate::tap::NicTapError),
    #[error(transparent)]
    UserNet(#[from] crate::user_net::UserNetError),
    #[error(transparent)]
    DriveFile(#[from] FileError),
    #[error("the vhost-user socket path '{}' is longer than a unix socket address holds (107 bytes); use a shorter -name, drive id or XDG_RUNTIME_DIR", .0.display())]
    SocketPath(PathBuf),
    #[error(transparent)]
    DeviceDaemon(#[from] DaemonError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("cannot create the readiness pipe: {0}")]
    Pipe(Errno),
    #[error("cannot locate the flotilla executable: {0}")]
    CurrentExe(io::Error),
    #[error("could not open kernel file '{0}': {1}")]
    Kernel(PathBuf, io::Error),
    #[error("could not load initial ram disk '{0}': {1}")]
    Initrd(PathBuf, io::Error),
    #[error("cannot create PID file: {0}")]
    Pidfile(String),
    #[error("cannot start vmm-core '{0}': {1}")]
    Spawn(PathBuf, io::Error),
    #[error("cannot daemonize: {0}")]
    Daemonize(String),
    #[error("cannot set up signal handling: {0}")]
    Signals(Errno),
}

/// How the VM ended; `main` turns it into the launcher's own exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Exit(i32),
    /// vmm-core was killed by this signal; the launcher re-raises it.
    Signal(i32),
}

/// A helper binary: `$env` if set, else `name` next to this executable.
fn find_binary(env: &str, name: &str) -> Result<Result<PathBuf, PathBuf>, LaunchError> {
    let path = match std::env::var_os(env).filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => {
            let exe = std::env::current_exe().map_err(LaunchError::CurrentExe)?;
            exe.parent().unwrap_or(Path::new("/")).join(name)
        }
    };
    Ok(if path.is_file() { Ok(path) } else { Err(path) })
}

pub fn find_vmm_core() -> Result<PathBuf, LaunchError> {
    find_binary(VMM_CORE_ENV, "vmm-core")?.map_err(LaunchError::VmmCoreMissing)
}

pub fn find_gateway() -> Result<PathBuf, LaunchError> {
    find_binary(GATEWAY_ENV, "qmp-gateway")?.map_err(LaunchError::GatewayMissing)
}

pub fn find_blockd() -> Result<PathBuf, LaunchError> {
    find_binary(BLOCKD_ENV, "blockd")?.map_err(LaunchError::BlockdMissing)
}

pub fn find_balloond() -> Result<PathBuf, LaunchError> {
    find_binary(BALLOOND_ENV, "balloond")?.map_err(LaunchError::BalloondMissing)
}

pub fn find_netd() -> Result<PathBuf, LaunchError> {
    find_binary(NETD_ENV, "netd")?.map_err(LaunchError::NetdMissing)
}

/// Checks what QEMU checks before starting, so that errors come from the launcher; returns
/// the drives' formats (probed where not given; QEMU's warning printed for a guessed raw) and
/// the NICs' taps, opened (held by the launcher for the VM's life, inherited by netd).
fn preflight(opts: &LaunchOptions) -> Result<(Vec<vm_config::DriveFormat>, Vec<crate::tap::NicTap>), LaunchError> {
    let (formats, mut warnings) = crate::drive_files::check_all(&opts.devices)?;
    if let Some(k) = &opts.machine.kernel {
        File::open(k).map_err(|e| LaunchError::Kernel(k.clone(), e))?;
    }
    if let Some(i) = &opts.machine.initrd {
        File::open(i).map_err(|e| LaunchError::Initrd(i.clone(), e))?;
    }
    let taps = crate::tap::open_all(&opts.devices)?;
    warnings.extend(opts.devices.net.resolve_notes(&opts.devices.nics));
    for w in warnings {
        eprintln!("{w}");
    }
    Ok((formats, taps))
}

/// `-pidfile`: created and locked like QEMU's (a second instance on the same file fails),
/// holding this process's pid; removed when dropped.
struct PidFile {
    path: PathBuf,
    _lock: Flock<File>,
}

impl PidFile {
    fn create(path: &Path) -> Result<PidFile, LaunchError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| LaunchError::Pidfile(format!("Cannot open pid file {}: {e}", path.display())))?;
        let mut lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            LaunchError::Pidfile(format!("Cannot lock pid file {}: {}", path.display(), nix_io(e)))
        })?;
        let write = |f: &mut File| -> io::Result<()> {
            f.set_len(0)?;
            f.write_all(format!("{}\n", std::process::id()).as_bytes())?;
            f.flush()
        };
        write(&mut lock)
            .map_err(|e| LaunchError::Pidfile(format!("Failed to write pid file {}: {e}", path.display())))?;
        Ok(PidFile { path: path.to_path_buf(), _lock: lock })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!("could not remove pid file {}: {e}", self.path.display());
        }
    }
}

fn nix_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// The write end of the pipe a daemonizing launcher's original process waits on.
struct DaemonReport(Option<File>);

impl DaemonReport {
    /// Tells the waiting original process to exit with `code` (0: the VM started).
    fn send(&mut self, code: i32) {
        if let Some(mut f) = self.0.take() {
            let _ = f.write_all(&code.to_ne_bytes());
        }
    }
}

impl Drop for DaemonReport {
    fn drop(&mut self) {
        self.send(1);
    }
}

/// Forks twice (setsid in between) like QEMU's os_daemonize(). The original process waits for
/// the daemon's report and exits with it; only the daemon returns.
fn daemonize() -> Result<DaemonReport, LaunchError> {
    let (r, w) = nix::unistd::pipe().map_err(|e| LaunchError::Daemonize(format!("pipe: {e}")))?;
    // SAFETY: called before this process starts any thread (the launcher's only threads are
    // spawned later), so the child may run arbitrary code.
    match unsafe { fork() }.map_err(|e| LaunchError::Daemonize(format!("fork: {e}")))? {
        ForkResult::Parent { child } => {
            drop(w);
            let mut r = File::from(r);
            let mut buf = [0u8; 4];
            let code = match r.read_exact(&mut buf) {
                Ok(()) => i32::from_ne_bytes(buf),
                Err(_) => 1, // the daemon died before reporting
            };
            let _ = nix::sys::wait::waitpid(child, None);
            std::process::exit(code);
        }
        ForkResult::Child => {}
    }
    drop(r);
    setsid().map_err(|e| LaunchError::Daemonize(format!("setsid: {e}")))?;
    // SAFETY: still single-threaded (see above).
    match unsafe { fork() }.map_err(|e| LaunchError::Daemonize(format!("fork: {e}")))? {
        // SAFETY: _exit in the intermediate child skips atexit handlers and destructors that
        // belong to the daemon.
        ForkResult::Parent { .. } => unsafe { libc::_exit(0) },
        ForkResult::Child => {}
    }
    Ok(DaemonReport(Some(File::from(w))))
}

/// Points fds 0-2 at /dev/null (after the daemon has reported success).
fn detach_stdio() {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        Ok(null) => {
            for fd in 0..=2 {
                if let Err(e) = nix::unistd::dup2(null.as_raw_fd(), fd) {
                    tracing::warn!("dup2 /dev/null to fd {fd}: {e}");
                }
            }
        }
        Err(e) => tracing::warn!("cannot open /dev/null: {e}"),
    }
}

fn forwarded_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGCHLD] {
        set.add(s);
    }
    set
}

/// Waits for one of `set` (blocked in this thread); returns (signal, si_code) or None on timeout.
pub fn wait_signal(set: &SigSet, timeout: Option<Duration>) -> Option<(i32, i32)> {
    // SAFETY: siginfo_t is plain old data; zeroed is a valid value for an out-parameter.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let rc = match timeout {
        None => {
            // SAFETY: valid sigset and siginfo pointers for the duration of the call.
            unsafe { libc::sigwaitinfo(set.as_ref(), &mut info) }
        }
        Some(t) => {
            let ts = libc::timespec { tv_sec: t.as_secs() as libc::time_t, tv_nsec: t.subsec_nanos() as _ };
            // SAFETY: as above, plus a valid timespec.
            unsafe { libc::sigtimedwait(set.as_ref(), &mut info, &ts) }
        }
    };
    (rc > 0).then_some((info.si_signo, info.si_code))
}

/// Runs the VM to its end.
pub fn launch(opts: &LaunchOptions) -> Result<Outcome, LaunchError> {
    let vmm_core = find_vmm_core()?;
    let gateway = if opts.qmp.is_empty() { None } else { Some(find_gateway()?) };
    let blockd = if opts.devices.has_drives() { Some(find_blockd()?) } else { None };
    let balloond = if opts.devices.has_balloon() { Some(find_balloond()?) } else { None };
    let netd = if opts.devices.has_netd() { Some(find_netd()?) } else { None };
    let (formats, taps) = preflight(opts)?;
    let bins = Binaries { blockd: blockd.as_deref(), balloond: balloond.as_deref(), netd: netd.as_deref() };
    // The daemon changes to "/"; keep the pid file where the user meant it.
    let pidfile_path = match &opts.pidfile {
        Some(p) if p.is_relative() => {
            Some(std::env::current_dir().map_err(|e| LaunchError::Pidfile(e.to_string()))?.join(p))
        }
        other => other.clone(),
    };

    let mut report = if opts.daemonize { Some(daemonize()?) } else { None };
    let launched =
        run_vm(opts, &formats, &taps, &bins, &vmm_core, gateway.as_deref(), pidfile_path.as_deref(), report.as_mut());
    // The taps stay open until every process that uses them has ended (run_vm returns then).
    drop(taps);
    match launched {
        Err(e) if report.is_some() => {
            // Say why before the waiting original process exits.
            eprintln!("flotilla: {e}");
            if let Some(r) = report.as_mut() {
                r.send(1);
            }
            Ok(Outcome::Exit(1))
        }
        other => other,
    }
}

#[allow(clippy::too_many_arguments)]
fn run_vm(
    opts: &LaunchOptions,
    formats: &[vm_config::DriveFormat],
    taps: &[crate::tap::NicTap],
    bins: &Binaries<'_>,
    vmm_core: &Path,
    gateway_bin: Option<&Path>,
    pidfile_path: Option<&Path>,
    mut report: Option<&mut DaemonReport>,
) -> Result<Outcome, LaunchError> {
    let _pidfile = match pidfile_path {
        Some(p) => Some(PidFile::create(p)?),
        None => None,
    };

    // Signals are taken synchronously (sigwaitinfo); block them before any thread or child
    // exists (the child gets an empty mask back in pre_exec).
    let signals = forwarded_signals();
    signals.thread_block().map_err(LaunchError::Signals)?;

    let tty_saved: Option<Termios> =
        if !opts.daemonize && io::stdin().is_terminal() { termios::tcgetattr(io::stdin().as_fd()).ok() } else { None };

    // Dropped in reverse order: the bus is terminated before its directory goes.
    let instance = opts.machine.name.clone().unwrap_or_else(|| format!("vm{}", std::process::id()));
    let runtime = RuntimeDir::create(&instance)?;
    let _chardev_sockets = ChardevSockets::of(&opts.machine);
    // Dropped after every process that uses them (declared before the daemons).
    let user_nets = crate::user_net::start_all(&opts.devices)?;
    let frames: Vec<(String, std::os::fd::RawFd)> = user_nets.iter().map(|u| (u.nic.clone(), u.fd())).collect();
    let plan = crate::device_plan::plan(&opts.devices, formats, taps, &frames, runtime.path(), opts.machine.mem_bytes);
    if let Some(p) = plan.overlong_socket() {
        return Err(LaunchError::SocketPath(p));
    }
    let mut bus = PrivateBus::start(runtime.path())?;
    let mut daemons = DeviceDaemons::start(&plan, bins, &bus.address, &instance, &signals, opts.daemonize)?;
    let mut gateway = gateway_bin.map(|bin| {
        let mut extra = DeviceDaemons::gateway_args(&plan);
        extra.extend(crate::net_opts::gateway_nic_args(&opts.devices.net, &opts.devices.nics, taps));
        gateway(bin, &bus.address, &instance, &opts.qmp, extra).pipe_stderr(false)
    });
    let (mut ready, ready_w) = ReadyPipe::new().map_err(LaunchError::Pipe)?;
    let ready_fd = ready_w.as_raw_fd();

    let mut machine = opts.machine.clone();
    machine.vhost_user_devices = plan.vhost_user_devices.clone();
    let json = machine.to_json();
    tracing::debug!(vmm_core = %vmm_core.display(), config = %json, "starting vmm-core");
    let mut cmd = Command::new(vmm_core);
    cmd.arg("--config-json").arg(&json);
    cmd.args(["--dbus-address", &bus.address, "--instance", &instance, "--ready-fd", &ready_fd.to_string()]);
    if opts.daemonize {
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    }
    let launcher = std::process::id() as libc::pid_t;
    // SAFETY: the closure only makes async-signal-safe calls (sigprocmask, fcntl, prctl,
    // getppid).
    unsafe {
        cmd.pre_exec(move || {
            // The readiness pipe's write end is vmm-core's to keep (the pipe is close-on-exec).
            if libc::fcntl(ready_fd, libc::F_SETFD, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // std's Command keeps the parent's signal mask; ours blocks the signals vmm-core
            // must receive.
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            if libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
                return Err(io::Error::other("cannot reset the signal mask"));
            }
            // The VM does not outlive its launcher (killing QEMU kills the VM).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != launcher {
                return Err(io::Error::other("launcher exited during start"));
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| LaunchError::Spawn(vmm_core.to_path_buf(), e))?;
    drop(ready_w);
    let pid = Pid::from_raw(child.id() as i32);
    tracing::info!(pid = child.id(), "vmm-core started");

    let mut forwarder = None;
    if let Some(err) = child.stderr.take() {
        // vmm-core's stderr reaches the user's terminal until the daemon detaches, /dev/null after.
        forwarder = std::thread::Builder::new()
            .name("stderr-forward".into())
            .spawn(move || crate::restart::forward_stderr(err))
            .map_err(|e| tracing::warn!("cannot forward vmm-core's stderr: {e}"))
            .ok();
    }

    if let Some(rep) = report.as_mut() {
        let deadline = Instant::now() + DAEMON_GRACE;
        let mut early = None;
        while early.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if let Some((sig, code)) = wait_signal(&signals, Some(left)) {
                forward(pid, sig, code);
            }
            early = child.try_wait().ok().flatten();
        }
        if let Some(status) = early {
            // Failed to start: the caller sees the error on its stderr and vmm-core's status.
            if let Some(f) = forwarder.take() {
                let _ = f.join();
            }
            let outcome = outcome_of(status);
            rep.send(match outcome {
                Outcome::Exit(c) => c,
                Outcome::Signal(s) => 128 + s,
            });
            return Ok(outcome);
        }
        rep.send(0);
        detach_stdio();
        if let Err(e) = std::env::set_current_dir("/") {
            tracing::warn!("chdir /: {e}");
        }
    }

    let status = supervise(&mut child, pid, &signals, &mut ready, gateway.as_mut(), &mut daemons, &mut bus);
    // vmm-core has ended: the rest of the instance goes, in order.
    if let Some(g) = gateway.as_mut() {
        g.stop();
    }
    daemons.stop();
    bus.daemon.terminate(TERM_GRACE);
    drop(runtime);
    if let Some(t) = &tty_saved {
        // vmm-core restores the terminal itself, unless it was killed.
        let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, t);
    }
    if let Some(f) = forwarder {
        let _ = f.join();
    }
    let outcome = outcome_of(status);
    tracing::info!(?outcome, "vmm-core ended");
    Ok(outcome)
}

/// Passes a termination signal on to vmm-core, unless the kernel sent it (a terminal's ^C or
/// hang-up goes to the whole foreground process group, vmm-core included, already).
fn forward(pid: Pid, sig: i32, si_code: i32) {
    if sig == libc::SIGCHLD {
        return;
    }
    if si_code > 0 {
        tracing::debug!(sig, "signal from the kernel; vmm-core got it too");
        return;
    }
    match Signal::try_from(sig) {
        Ok(s) => {
            tracing::info!(signal = %s, "forwarding to vmm-core");
            if let Err(e) = kill(pid, s) {
                tracing::warn!("cannot signal vmm-core: {e}");
            }
        }
        Err(e) => tracing::warn!("unexpected signal {sig}: {e}"),
    }
}

/// vmm-core's unix-socket chardevs, removed when the launcher ends: vmm-core removes them
/// itself on a normal exit, but not when it is killed.
struct ChardevSockets(Vec<PathBuf>);

impl ChardevSockets {
    fn of(machine: &vm_config::MachineConfig) -> Self {
        ChardevSockets(
            machine
                .serial
                .iter()
                .filter_map(|c| match &c.backend {
                    vm_config::ChardevBackend::UnixServer { path, .. } => Some(path.clone()),
                    _ => None,
                })
                .collect(),
        )
    }
}

impl Drop for ChardevSockets {
    fn drop(&mut self) {
        remove_socket_files(&self.0, "serial");
    }
}

/// The QMP gateway of the instance: started once vmm-core is ready, restarted when it exits.
fn gateway(program: &Path, address: &str, instance: &str, qmp: &[QmpSocket], extra: Vec<String>) -> Restartable {
    let mut args = vec!["--dbus-address".to_string(), address.to_string(), "--instance".into(), instance.into()];
    for q in qmp {
        args.push("--qmp".into());
        args.push(q.gateway_spec());
    }
    args.extend(extra);
    let sockets = qmp
        .iter()
        .filter_map(|q| match q {
            QmpSocket::Unix { path } => Some(path.clone()),
            QmpSocket::Tcp { .. } => None,
        })
        .collect();
    Restartable::new("qmp-gateway", program, args, sockets)
}

fn supervise(
    child: &mut Child,
    pid: Pid,
    signals: &SigSet,
    ready: &mut ReadyPipe,
    mut gateway: Option<&mut Restartable>,
    daemons: &mut DeviceDaemons,
    bus: &mut PrivateBus,
) -> ExitStatus {
    let mut bus_alive = true;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("waiting for vmm-core: {e}");
                return child.wait().unwrap_or_else(|_| ExitStatus::from_raw(1 << 8));
            }
        }
        if ready.check() {
            tracing::info!("vmm-core is ready");
            if let Some(g) = gateway.as_mut() {
                if g.starts() == 0 {
                    g.start();
                }
            }
        }
        if let Some(g) = gateway.as_mut() {
            g.poll();
        }
        daemons.poll();
        if bus_alive && !bus.daemon.running() {
            bus_alive = false;
            eprintln!("flotilla: the instance's dbus-daemon exited; QMP is unavailable until the VM ends");
        }
        // SIGCHLD wakes us when a child exits; readiness is polled while it is awaited, a
        // gateway restart waits for its time, and the timeout is otherwise a safety net.
        let mut timeout = Duration::from_secs(1);
        if ready.pending() {
            timeout = Duration::from_millis(20);
        }
        let wakeups = gateway.as_ref().and_then(|g| g.next_start()).into_iter().chain(daemons.next_wakeup());
        for t in wakeups {
            timeout = timeout.min(t.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)));
        }
        if let Some((sig, code)) = wait_signal(signals, Some(timeout)) {
            forward(pid, sig, code);
        }
    }
}

fn outcome_of(status: ExitStatus) -> Outcome {
    match (status.code(), status.signal()) {
        (Some(c), _) => Outcome::Exit(c),
        (None, Some(s)) => Outcome::Signal(s),
        (None, None) => Outcome::Exit(1),
    }
}

/// Ends the launcher the way vmm-core ended: same exit code, or death by the same signal.
pub fn exit_like(outcome: Outcome) -> ! {
    match outcome {
        Outcome::Exit(c) => std::process::exit(c),
        Outcome::Signal(s) => {
            if let Ok(sig) = Signal::try_from(s) {
                // SAFETY: restoring the default disposition of a signal is always sound.
                let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
                let mut set = SigSet::empty();
                set.add(sig);
                let _ = set.thread_unblock();
                let _ = nix::sys::signal::raise(sig);
            }
            std::process::exit(128 + s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_from_status() {
        assert_eq!(outcome_of(ExitStatus::from_raw(0)), Outcome::Exit(0));
        assert_eq!(outcome_of(ExitStatus::from_raw(3 << 8)), Outcome::Exit(3));
        assert_eq!(outcome_of(ExitStatus::from_raw(libc::SIGKILL)), Outcome::Signal(libc::SIGKILL));
    }

    #[test]
    fn pidfile_is_locked_written_and_removed() {
        let dir = std::env::temp_dir().join(format!("flotilla-pidfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("vm.pid");
        std::fs::write(&path, "999999999 stale contents\n").expect("stale");
        let pf = PidFile::create(&path).expect("create");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), format!("{}\n", std::process::id()));
        // A second launcher on the same pid file fails, as with QEMU.
        let e = PidFile::create(&path).err().expect("second lock must fail");
        assert!(e.to_string().starts_with("cannot create PID file: Cannot lock pid file"), "{e}");
        drop(pf);
        assert!(!path.exists());
        let e = PidFile::create(&dir.join("missing/x.pid")).err().expect("missing dir");
        assert!(e.to_string().starts_with("cannot create PID file: Cannot open pid file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
