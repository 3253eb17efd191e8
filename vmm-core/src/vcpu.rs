//! vCPU threads. Each thread owns its `VcpuFd` and is driven by requests on a channel; a request
//! to a running vCPU is followed by a signal that makes KVM_RUN return (the handler sets the
//! vCPU's `immediate_exit`, so a signal that lands just before KVM_RUN is not lost either).

use crate::boot::BootEntry;
use crate::devices::bus::Bus;
use crate::devices::GuestAction;
use crate::memory::GuestMemory;
use crate::regs;
use kvm_bindings::{kvm_lapic_state, kvm_mp_state, kvm_sregs, KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

/// What one vCPU reports for query-cpus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuInfo {
    pub index: u8,
    pub halted: bool,
    pub pc: u64,
    pub thread_id: i32,
}

/// Messages from vCPUs and devices to the machine's controller.
#[derive(Debug, Clone)]
pub enum ControlMsg {
    Guest { action: GuestAction, why: &'static str },
    /// KVM could not go on with this vCPU (internal error, failed entry, unknown exit).
    Fault { cpu: u8, reason: String },
    /// The machine is going away; the controller thread ends.
    Exit,
}

type Reply<T> = Sender<T>;

pub enum VcpuRequest {
    Pause(Reply<()>),
    Resume,
    Info(Reply<VcpuInfo>),
    Translate(u64, Reply<Option<u64>>),
    Nmi(Reply<Result<(), String>>),
    /// Back to power-on state; `Some` for the boot CPU, which then starts at the entry.
    Reset(Option<BootEntry>, Reply<Result<(), String>>),
    Exit,
}

/// What a vCPU thread needs from the machine.
pub struct VcpuContext {
    pub io_bus: Bus,
    pub mmio_bus: Bus,
    pub mem: GuestMemory,
    pub control: Sender<ControlMsg>,
}

thread_local! {
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int) {
    // Async-signal-safe: a const-initialised thread-local and one volatile byte store.
    IMMEDIATE_EXIT.with(|p| {
        let ptr = p.get();
        if !ptr.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set while its VcpuFd lives.
            unsafe { std::ptr::write_volatile(ptr, 1) };
        }
    });
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: installing a handler that only touches a thread-local byte; no SA_RESTART so
        // KVM_RUN returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = kick_handler as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

pub struct VcpuHandle {
    pub index: u8,
    tx: Sender<VcpuRequest>,
    pthread: libc::pthread_t,
    alive: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
}

const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {0} thread has gone")]
    Gone(u8),
    #[error("vCPU {0} did not answer within {1:?}")]
    Timeout(u8, Duration),
    #[error("spawning vCPU thread")]
    Spawn(#[source] std::io::Error),
}

impl VcpuHandle {
    pub fn spawn(vcpu: VcpuFd, index: u8, ctx: Arc<VcpuContext>) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler();
        let (tx, rx) = channel();
        let (ptx, prx) = channel();
        let alive = Arc::new(AtomicBool::new(true));
        let alive_t = alive.clone();
        let join = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // SAFETY: pthread_self has no preconditions.
                let me = unsafe { libc::pthread_self() };
                let _ = ptx.send(me);
                let mut t = VcpuThread { vcpu, index, ctx, running: false, initial: None, io_pending: false };
                t.main(rx);
                alive_t.store(false, Ordering::SeqCst);
            })
            .map_err(VcpuError::Spawn)?;
        let pthread = prx.recv_timeout(REPLY_TIMEOUT).map_err(|_| VcpuError::Gone(index))?;
        Ok(VcpuHandle { index, tx, pthread, alive, join: Some(join) })
    }

    fn kick(&self) {
        if self.alive.load(Ordering::SeqCst) {
            // SAFETY: the thread is alive (checked just above; it only exits after an Exit
            // request, which we send last), so its pthread_t is valid.
            unsafe { libc::pthread_kill(self.pthread, kick_signal()) };
        }
    }

    pub fn send(&self, req: VcpuRequest) -> Result<(), VcpuError> {
        self.tx.send(req).map_err(|_| VcpuError::Gone(self.index))?;
        self.kick();
        Ok(())
    }

    fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> VcpuRequest) -> Result<T, VcpuError> {
        let (tx, rx) = channel();
        self.send(make(tx))?;
        rx.recv_timeout(REPLY_TIMEOUT).map_err(|e| match e {
            RecvTimeoutError::Timeout => VcpuError::Timeout(self.index, REPLY_TIMEOUT),
            RecvTimeoutError::Disconnected => VcpuError::Gone(self.index),
        })
    }

    pub fn pause(&self) -> Result<(), VcpuError> {
        self.ask(VcpuRequest::Pause)
    }

    pub fn resume(&self) -> Result<(), VcpuError> {
        self.send(VcpuRequest::Resume)
    }

    pub fn info(&self) -> Result<VcpuInfo, VcpuError> {
        self.ask(VcpuRequest::Info)
    }

    pub fn translate(&self, gva: u64) -> Result<Option<u64>, VcpuError> {
        self.ask(|r| VcpuRequest::Translate(gva, r))
    }

    pub fn nmi(&self) -> Result<Result<(), String>, VcpuError> {
        self.ask(VcpuRequest::Nmi)
    }

    pub fn reset(&self, entry: Option<BootEntry>) -> Result<Result<(), String>, VcpuError> {
        self.ask(|r| VcpuRequest::Reset(entry, r))
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        let _ = self.send(VcpuRequest::Exit);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

struct VcpuThread {
    vcpu: VcpuFd,
    index: u8,
    ctx: Arc<VcpuContext>,
    running: bool,
    /// Power-on sregs and LAPIC, captured before the first run, restored on reset.
    initial: Option<(kvm_sregs, kvm_lapic_state)>,
    /// The last exit was an MMIO or port access: KVM finishes it (loads a read's data into the
    /// register, advances RIP) only at the next KVM_RUN.
    io_pending: bool,
}

struct ClearImmediateExit;
impl Drop for ClearImmediateExit {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
    }
}

impl VcpuThread {
    fn main(&mut self, rx: Receiver<VcpuRequest>) {
        let ptr = &mut self.vcpu.get_kvm_run().immediate_exit as *mut u8;
        IMMEDIATE_EXIT.with(|p| p.set(ptr));
        let _guard = ClearImmediateExit;
        if let (Ok(s), Ok(l)) = (self.vcpu.get_sregs(), self.vcpu.get_lapic()) {
            self.initial = Some((s, l));
        }
        loop {
            if !self.running {
                match rx.recv() {
                    Ok(req) => {
                        // A vCPU that stopped itself at an access (a reset port write) has it
                        // unfinished too.
                        self.complete_io();
                        if !self.handle(req) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
                continue;
            }
            while let Ok(req) = rx.try_recv() {
                // Registers read, saved or reset now must include the access the guest made.
                self.complete_io();
                if !self.handle(req) {
                    return;
                }
            }
            if self.running {
                self.run_once();
            }
        }
    }

    /// Re-enters KVM_RUN with `immediate_exit` set when an MMIO/PIO exit is unfinished: KVM
    /// completes the emulated access and returns EINTR without running guest code (the KVM API
    /// documentation's way to make the vCPU state consistent before pausing or inspecting it).
    fn complete_io(&mut self) {
        // Finishing one access can start the next (a string PIO or a split MMIO access exits
        // again): serve those too, bounded.
        for _ in 0..1024 {
            if !self.io_pending {
                break;
            }
            self.vcpu.set_kvm_immediate_exit(1);
            self.run_once();
        }
        if self.io_pending {
            tracing::warn!(cpu = self.index, "an MMIO/PIO access did not complete after 1024 re-entries");
            self.io_pending = false;
        }
        self.vcpu.set_kvm_immediate_exit(0);
    }

    /// Returns false on Exit.
    fn handle(&mut self, req: VcpuRequest) -> bool {
        match req {
            VcpuRequest::Pause(r) => {
                self.running = false;
                let _ = r.send(());
            }
            VcpuRequest::Resume => self.running = true,
            VcpuRequest::Info(r) => {
                let pc = self.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                let halted = self.vcpu.get_mp_state().map(|m| m.mp_state == KVM_MP_STATE_HALTED).unwrap_or(false);
                let _ = r.send(VcpuInfo { index: self.index, halted, pc, thread_id: nix::unistd::gettid().as_raw() });
            }
            VcpuRequest::Translate(gva, r) => {
                let pa = self.vcpu.translate_gva(gva).ok().filter(|t| t.valid != 0).map(|t| t.physical_address);
                let _ = r.send(pa);
            }
            VcpuRequest::Nmi(r) => {
                let _ = r.send(self.vcpu.nmi().map_err(|e| e.to_string()));
            }
            VcpuRequest::Reset(entry, r) => {
                let _ = r.send(self.reset(entry));
            }
            VcpuRequest::Exit => return false,
        }
        true
    }

    fn reset(&mut self, entry: Option<BootEntry>) -> Result<(), String> {
        if let Some((s, l)) = &self.initial {
            self.vcpu.set_sregs(s).map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
            self.vcpu.set_lapic(l).map_err(|e| format!("KVM_SET_LAPIC: {e}"))?;
        }
        self.vcpu.set_regs(&Default::default()).map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        let mp = match entry {
            Some(entry) => {
                regs::setup_boot_vcpu(&self.vcpu, &self.ctx.mem, entry).map_err(|e| e.to_string())?;
                KVM_MP_STATE_RUNNABLE
            }
            None => {
                regs::setup_fpu_msrs_lapic(&self.vcpu).map_err(|e| e.to_string())?;
                // Application processors wait for INIT/SIPI, as after power-on.
                KVM_MP_STATE_UNINITIALIZED
            }
        };
        self.vcpu
            .set_mp_state(kvm_mp_state { mp_state: mp })
            .map_err(|e| format!("KVM_SET_MP_STATE: {e}"))
    }

    fn fault(&mut self, reason: String) {
        self.running = false;
        tracing::error!(cpu = self.index, %reason, "vCPU stopped");
        let _ = self.ctx.control.send(ControlMsg::Fault { cpu: self.index, reason });
    }

    fn guest(&mut self, action: GuestAction, why: &'static str) {
        // Stop here: the controller resets or stops the whole machine and resumes us if needed.
        self.running = false;
        let _ = self.ctx.control.send(ControlMsg::Guest { action, why });
    }

    fn run_once(&mut self) {
        let ctx = self.ctx.clone();
        let result = self.vcpu.run();
        self.io_pending = matches!(
            result,
            Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..) | VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..))
        );
        match result {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    if !ctx.io_bus.read(port as u64, data) {
                        tracing::trace!(port, "read from unassigned port");
                    }
                }
                VcpuExit::IoOut(port, data) => {
                    if !ctx.io_bus.write(port as u64, data) {
                        tracing::trace!(port, ?data, "write to unassigned port");
                    }
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !ctx.mmio_bus.read(addr, data) {
                        tracing::debug!(addr = format_args!("{addr:#x}"), "read from unassigned MMIO");
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if !ctx.mmio_bus.write(addr, data) {
                        tracing::debug!(addr = format_args!("{addr:#x}"), "write to unassigned MMIO");
                    }
                }
                VcpuExit::Shutdown => self.guest(GuestAction::Reset, "triple fault"),
                VcpuExit::SystemEvent(kind, _) => match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => self.guest(GuestAction::PowerOff, "system event"),
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => self.guest(GuestAction::Reset, "system event"),
                    other => self.fault(format!("unexpected KVM system event {other}")),
                },
                VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
                VcpuExit::InternalError => {
                    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                    // union member KVM filled in.
                    let sub = unsafe { self.vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    let at = self.where_now();
                    self.fault(format!("KVM internal error, suberror {sub}{at}"));
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    self.fault(format!("KVM entry failed, hardware reason {reason:#x} on host cpu {cpu}{}", self.where_now()))
                }
                other => {
                    let what = format!("unhandled KVM exit {other:?}");
                    let at = self.where_now();
                    self.fault(format!("{what}{at}"));
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.vcpu.set_kvm_immediate_exit(0);
            }
            Err(e) => self.fault(format!("KVM_RUN failed: {e}")),
        }
    }

    fn where_now(&self) -> String {
        match self.vcpu.get_regs() {
            Ok(r) => format!(" at rip={:#x} rsp={:#x}", r.rip, r.rsp),
            Err(_) => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use kvm_ioctls::Kvm;
    use std::sync::{Mutex, OnceLock};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

    /// Port 0x81: answers 0x99 and, during the access, asks its vCPU where it is (as a QMP
    /// `query-cpus` landing right after a port exit would).
    struct AskDuringAccess {
        tx: Arc<OnceLock<Sender<VcpuRequest>>>,
        reply: Arc<Mutex<Option<Receiver<VcpuInfo>>>>,
    }
    impl BusDevice for AskDuringAccess {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0x99);
            if let Some(tx) = self.tx.get() {
                let (rtx, rrx) = channel();
                let _ = tx.send(VcpuRequest::Info(rtx));
                *crate::devices::bus::lock(&self.reply) = Some(rrx);
            }
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    #[test]
    fn a_request_after_a_port_exit_sees_the_access_completed() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("no /dev/kvm: skipped");
            return;
        };
        let vm = kvm.create_vm().expect("vm");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("mem");
        // 0x1000: in al, 0x81; 0x1002: jmp $ (real mode, so KVM_RUN loops there until kicked).
        mem.write_slice(&[0xe4, 0x81, 0xeb, 0xfe], GuestAddress(0x1000)).expect("code");
        let region = mem.iter().next().expect("region");
        let mr = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the mapping lives in `mem`, which outlives the VM (dropped after it below).
        unsafe { vm.set_user_memory_region(mr) }.expect("memory");
        let vcpu = vm.create_vcpu(0).expect("vcpu");
        let mut sregs = vcpu.get_sregs().expect("sregs");
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).expect("set sregs");
        vcpu.set_regs(&kvm_bindings::kvm_regs { rip: 0x1000, rflags: 2, ..Default::default() }).expect("regs");

        let tx = Arc::new(OnceLock::new());
        let reply = Arc::new(Mutex::new(None));
        let mut io_bus = Bus::default();
        let dev = AskDuringAccess { tx: tx.clone(), reply: reply.clone() };
        io_bus.insert(0x81, 1, Arc::new(Mutex::new(dev))).expect("port");
        let (control, _control_rx) = channel();
        let ctx = Arc::new(VcpuContext { io_bus, mmio_bus: Bus::default(), mem: mem.clone(), control });
        let handle = VcpuHandle::spawn(vcpu, 0, ctx).expect("spawn");
        let _ = tx.set(handle.tx.clone());
        handle.resume().expect("resume");
        let deadline = std::time::Instant::now() + REPLY_TIMEOUT;
        let rrx = loop {
            if let Some(r) = crate::devices::bus::lock(&reply).take() {
                break r;
            }
            assert!(std::time::Instant::now() < deadline, "the guest never read the port");
            std::thread::sleep(Duration::from_millis(1));
        };
        let info = rrx.recv_timeout(REPLY_TIMEOUT).expect("info");
        // Unfinished, the vCPU would still be at the `in` (0x1000) with AL not loaded.
        assert_eq!(info.pc, 0x1002, "the IN was completed before the request was served");
        drop(handle);
        drop(vm);
    }
}
