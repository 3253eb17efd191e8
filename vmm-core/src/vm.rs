//! The machine: builds KVM, guest RAM, devices and vCPUs from a [`MachineConfig`] and offers the
//! Rust API that the monitor (QMP over D-Bus) drives: run-state changes with their events,
//! CPU/PCI/chardev queries, memsave/pmemsave, NMI injection.

use crate::acpi;
use crate::boot::{self, BootEntry, BootSpec};
use crate::chardev::Chardev;
use crate::cpuid;
use crate::devices::bus::{lock, Bus, MmioWindow};
use crate::devices::i8042::I8042;
use crate::devices::marker::BootMarker;
use crate::devices::pci::{PciBus, PciConfigIo, PciEcam, PciFunctionInfo, SharedPciBus};
use crate::devices::pm::{AcpiPm, ResetControl, PM_BLOCK_LEN};
use crate::devices::serial::SerialDevice;
use crate::devices::{ActionSink, GuestAction, IrqLevel};
use crate::irq::{IrqError, IrqRouter, SharedIrqRouter};
use crate::layout;
use crate::memory::{GuestRam, MemoryError};
use crate::runstate::{EventCallback, EventHub, EventReason, RunState, VmEvent, VmEventKind};
use crate::vcpu::{ControlMsg, VcpuContext, VcpuError, VcpuHandle, VcpuInfo};
use crate::vhost_user::{self, FrontendError, MachineParts};
use crate::virtio_pci::{DeviceSignals, BAR_SIZE};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};
use vm_config::MachineConfig;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM: {0}: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("-smp {0}: the number of CPUs must be between 1 and {1}")]
    BadCpuCount(u8, usize),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Regs(#[from] crate::regs::RegsError),
    #[error("building ACPI tables: {0}")]
    Acpi(String),
    #[error("writing ACPI tables to guest memory: {0}")]
    AcpiWrite(String),
    #[error("device bus: {0}")]
    Bus(#[from] crate::devices::bus::OverlapError),
    #[error("chardev '{0}': {1}")]
    Chardev(String, String),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("Resetting the Virtual Machine is required")]
    ResetRequired,
    #[error("vCPU {0}: {1}")]
    VcpuOp(u8, String),
    #[error("interrupt routing: {0}")]
    Irq(#[from] IrqError),
    #[error(transparent)]
    VhostUser(#[from] FrontendError),
    #[error("device '{id}': PCI slot {slot} is taken or does not exist")]
    PciSlot { id: String, slot: u8 },
    #[error("device '{id}': no room left on PCI bus 0 or in the 32-bit PCI window")]
    PciFull { id: String },
}

/// Why the machine ended (the process then exits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// `quit` from the monitor or SIGTERM.
    Quit,
    /// The guest powered off (ACPI S5) without `-no-shutdown`.
    GuestPoweroff,
    /// The guest reset with `-no-reboot`.
    GuestReset,
}

/// memsave/pmemsave failures, worded as QEMU words them (the seed names the classes:
/// InvalidParameterValue, OpenFileFailed, IOError).
#[derive(Debug, thiserror::Error)]
pub enum MemsaveError {
    #[error("Parameter 'cpu-index' expects a CPU number")]
    InvalidCpu,
    #[error("Invalid addr 0x{addr:016x}/size {size} specified")]
    InvalidRange { addr: u64, size: u64 },
    #[error("Could not open '{}': {err}", .path.display())]
    Open { path: PathBuf, err: std::io::Error },
    #[error("An IO error has occurred")]
    Write(#[source] std::io::Error),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

/// One chardev as query-chardev reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevInfo {
    pub label: String,
    pub filename: String,
    pub frontend_open: bool,
}

struct MachineState {
    run: RunState,
    exit: Option<ExitReason>,
    /// Why the machine is in `internal-error` (which vCPU, what KVM reported); cleared by reset.
    fault: Option<(u8, String)>,
}

struct VmInner {
    cfg: MachineConfig,
    _kvm: Kvm,
    vm: Arc<VmFd>,
    ram: GuestRam,
    vcpus: Vec<VcpuHandle>,
    state: Mutex<MachineState>,
    exited: Condvar,
    events: EventHub,
    pm: Arc<Mutex<AcpiPm>>,
    pci: SharedPciBus,
    serial: Option<Arc<Chardev>>,
    rsdp: u64,
    acpi_bytes: Vec<u8>,
    boot_marker: Arc<Mutex<Option<Duration>>>,
    control: Sender<ControlMsg>,
    nmi_supported: bool,
    irq: SharedIrqRouter,
    /// The fixed MMIO bus as vCPUs see it, for host-side accesses ([`Vm::mmio_read`]).
    mmio: Bus,
    /// The 32-bit PCI window where BARs live.
    pci_window: MmioWindow,
    /// Each vhost-user function's signals, to wait for its backend to stop at a reset.
    virtio_signals: Vec<Arc<DeviceSignals>>,
}

/// A running (or paused) machine. Cloning shares it.
#[derive(Clone)]
pub struct Vm {
    inner: Arc<VmInner>,
}

/// Writes the UART's output to its chardev, once the chardev is open.
struct ChardevWriter(Arc<OnceLock<Arc<Chardev>>>);

impl Write for ChardevWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(c) = self.0.get() {
            c.write(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const MAX_CPUS_LIMIT: usize = 255;
/// How long a machine reset waits for the vhost-user backends to stop their rings.
const BACKEND_STOP_WAIT: Duration = Duration::from_secs(5);

impl Vm {
    /// Builds the machine and starts it (or leaves it in `prelaunch` with `-S`).
    pub fn new(cfg: MachineConfig) -> Result<Vm, VmError> {
        let start = Instant::now();
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let max_cpus = kvm.get_max_vcpus().min(MAX_CPUS_LIMIT);
        if cfg.cpus == 0 || cfg.cpus as usize > max_cpus {
            return Err(VmError::BadCpuCount(cfg.cpus, max_cpus));
        }
        let vm = Arc::new(kvm.create_vm().map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?);
        let ram = GuestRam::new(cfg.mem_bytes)?;
        if cfg.mem_prealloc {
            ram.preallocate()?;
            tracing::info!(bytes = cfg.mem_bytes, "guest RAM preallocated");
        }
        for (slot, region) in ram.mem.iter().enumerate() {
            let host = region.as_ptr() as u64;
            let mr = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `ram`, which outlives the VM fd
            // (both live in VmInner, and the vCPUs are stopped before either is dropped).
            unsafe { vm.set_user_memory_region(mr) }.map_err(|e| VmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        vm.set_tss_address(0xfffb_d000).map_err(|e| VmError::Kvm("KVM_SET_TSS_ADDR", e))?;
        vm.set_identity_map_address(0xfffb_c000).map_err(|e| VmError::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        vm.create_irq_chip().map_err(|e| VmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).map_err(|e| VmError::Kvm("KVM_CREATE_PIT2", e))?;
        // The GSI routing table from here on is the router's (KVM's defaults, then MSI routes);
        // sending it once now checks that KVM takes it.
        let gsi_limit = u32::try_from(kvm.check_extension_int(Cap::IrqRouting)).unwrap_or(0);
        let irq_router = IrqRouter::new(vm.clone(), gsi_limit);
        irq_router.commit()?;
        let irq_router: SharedIrqRouter = Arc::new(Mutex::new(irq_router));

        let (control, control_rx) = channel::<ControlMsg>();
        let actions: ActionSink = {
            let c = Mutex::new(control.clone());
            Arc::new(move |action| {
                let _ = lock(&c).send(ControlMsg::Guest { action, why: "device register" });
            })
        };
        let sci: IrqLevel = {
            let vm = vm.clone();
            Arc::new(move |level| {
                if let Err(e) = vm.set_irq_line(layout::SCI_IRQ, level) {
                    tracing::warn!(error = %e, "raising SCI");
                }
            })
        };

        let mut io_bus = Bus::default();
        let mut mmio_bus = Bus::default();
        let pm = Arc::new(Mutex::new(AcpiPm::new(sci, actions.clone())));
        io_bus.insert(layout::PM1A_EVT_BLK as u64, PM_BLOCK_LEN, pm.clone())?;
        io_bus.insert(layout::RESET_PORT as u64, 1, Arc::new(Mutex::new(ResetControl::new(actions.clone()))))?;
        io_bus.insert(layout::I8042_PORT as u64, 5, Arc::new(Mutex::new(I8042::new(actions))))?;
        let marker = BootMarker::new(start);
        let boot_marker = marker.first.clone();
        io_bus.insert(layout::BOOT_MARKER_PORT as u64, 1, Arc::new(Mutex::new(marker)))?;
        let pci: SharedPciBus = Arc::new(Mutex::new(PciBus::new()));
        // 0xCF8..0xCFF except 0xCF9 (reset control): address dword at 0xCF8 is only written as
        // a dword, so map 0xCF8 alone and the data window 0xCFC..0xD00.
        let cfg_io = Arc::new(Mutex::new(PciConfigIo::new(pci.clone())));
        io_bus.insert(layout::PCI_CONFIG_ADDRESS as u64, 1, cfg_io.clone())?;
        io_bus.insert(layout::PCI_CONFIG_DATA as u64, 4, Arc::new(Mutex::new(PciDataWindow(cfg_io))))?;
        mmio_bus.insert(layout::PCI_ECAM_START, layout::PCI_ECAM_SIZE, Arc::new(Mutex::new(PciEcam::new(pci.clone()))))?;
        let pci_window = MmioWindow::new(layout::PCI_MMIO32_START, layout::PCI_MMIO32_SIZE);
        mmio_bus.insert(layout::PCI_MMIO32_START, layout::PCI_MMIO32_SIZE, Arc::new(Mutex::new(pci_window.clone())))?;
        // Until VmInner owns the window (and clears it when dropped), an error clears it here.
        let window_guard = ClearWindowOnError(Some(pci_window.clone()));
        let (pci_slots, virtio_signals) = add_vhost_user_functions(&cfg, &ram, &irq_router, &pci_window, &vm, &pci)?;

        let serial = match &cfg.serial {
            Some(chr) => {
                let irq = lock(&irq_router).irqfd_for_pin(layout::COM1_IRQ)?;
                let out = Arc::new(OnceLock::new());
                let dev = Arc::new(Mutex::new(SerialDevice::new(irq, ChardevWriter(out.clone()))));
                let input = dev.clone();
                let chardev = Chardev::open(chr, Box::new(move |bytes: &[u8]| lock(&input).queue_input(bytes)))
                    .map_err(|e| VmError::Chardev(chr.id.clone(), e.to_string()))?;
                let chardev = Arc::new(chardev);
                let _ = out.set(chardev.clone());
                io_bus.insert(layout::COM1_PORT as u64, 8, dev)?;
                Some(chardev)
            }
            None => None,
        };

        let tables = acpi::build(&acpi::AcpiConfig { cpus: cfg.cpus, pci_devices: pci_slots })
            .map_err(|e| VmError::Acpi(e.to_string()))?;
        let mmio = mmio_bus.clone();
        let ctx = Arc::new(VcpuContext { io_bus, mmio_bus, mem: ram.mem.clone(), control: control.clone() });

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut vcpus = Vec::with_capacity(cfg.cpus as usize);
        for id in 0..cfg.cpus {
            let fd = vm.create_vcpu(id as u64).map_err(|e| VmError::Kvm("KVM_CREATE_VCPU", e))?;
            fd.set_cpuid2(&cpuid::for_vcpu(&supported, id, cfg.cpus)).map_err(|e| VmError::Kvm("KVM_SET_CPUID2", e))?;
            vcpus.push(VcpuHandle::spawn(fd, id, ctx.clone())?);
        }
        let nmi_supported = kvm.check_extension(Cap::UserNmi);

        let inner = Arc::new(VmInner {
            rsdp: tables.rsdp_addr,
            acpi_bytes: tables.bytes,
            cfg,
            _kvm: kvm,
            vm,
            ram,
            vcpus,
            state: Mutex::new(MachineState { run: RunState::Prelaunch, exit: None, fault: None }),
            exited: Condvar::new(),
            events: EventHub::default(),
            pm,
            pci,
            serial,
            boot_marker,
            control,
            nmi_supported,
            irq: irq_router,
            mmio,
            pci_window,
            virtio_signals,
        });
        window_guard.disarm();
        inner.load_and_reset_cpus()?;
        spawn_controller(Arc::downgrade(&inner), control_rx);
        let vm = Vm { inner };
        if !vm.inner.cfg.start_paused {
            let mut st = lock(&vm.inner.state);
            vm.inner.resume_all(&mut st)?;
        }
        tracing::info!(elapsed_us = start.elapsed().as_micros() as u64, "machine built");
        Ok(vm)
    }

    pub fn config(&self) -> &MachineConfig {
        &self.inner.cfg
    }

    pub fn subscribe(&self) -> Receiver<VmEvent> {
        self.inner.events.subscribe()
    }

    /// Calls `f` with every event, synchronously (see [`EventHub::subscribe_fn`]): an event is
    /// queued before the command that caused it returns.
    pub fn subscribe_fn(&self, f: EventCallback) {
        self.inner.events.subscribe_fn(f)
    }

    /// (status, running) as query-status reports them.
    pub fn status(&self) -> (RunState, bool) {
        let run = lock(&self.inner.state).run;
        (run, run == RunState::Running)
    }

    /// `stop`: pauses a running guest (anything else stays as it is, as in QEMU).
    pub fn stop(&self) -> Result<(), VmError> {
        let mut st = lock(&self.inner.state);
        if st.run == RunState::Running {
            self.inner.pause_all()?;
            st.run = RunState::Paused;
            self.inner.events.emit(VmEventKind::Stop);
        }
        Ok(())
    }

    /// `cont`.
    pub fn cont(&self) -> Result<(), VmError> {
        let mut st = lock(&self.inner.state);
        if st.run.needs_reset() {
            return Err(VmError::ResetRequired);
        }
        if st.run != RunState::Running {
            self.inner.resume_all(&mut st)?;
        }
        Ok(())
    }

    /// `system_reset`.
    pub fn system_reset(&self) -> Result<(), VmError> {
        self.inner.reset(false)
    }

    /// `system_powerdown`: presses the ACPI power button; the guest decides what to do.
    pub fn system_powerdown(&self) {
        self.inner.events.emit(VmEventKind::Powerdown);
        lock(&self.inner.pm).press_power_button();
    }

    /// `quit`.
    pub fn quit(&self) {
        self.quit_because(EventReason::HostQmpQuit);
    }

    /// Ends the machine as `quit` does, giving the SHUTDOWN event's reason (`HostSignal` for a
    /// termination signal).
    pub fn quit_because(&self, reason: EventReason) {
        self.inner.finish(ExitReason::Quit, VmEventKind::Shutdown { guest: false }, reason);
    }

    /// `inject-nmi`: an NMI to every vCPU.
    pub fn inject_nmi(&self) -> Result<(), VmError> {
        if !self.inner.nmi_supported {
            return Err(VmError::VcpuOp(0, "this KVM cannot inject NMIs".into()));
        }
        for v in &self.inner.vcpus {
            v.nmi()?.map_err(|e| VmError::VcpuOp(v.index, e))?;
        }
        Ok(())
    }

    pub fn nmi_supported(&self) -> bool {
        self.inner.nmi_supported
    }

    pub fn cpus(&self) -> Result<Vec<VcpuInfo>, VmError> {
        Ok(self.inner.vcpus.iter().map(|v| v.info()).collect::<Result<_, _>>()?)
    }

    pub fn cpu_count(&self) -> usize {
        self.inner.vcpus.len()
    }

    pub fn pci(&self) -> Vec<PciFunctionInfo> {
        lock(&self.inner.pci).describe()
    }

    pub fn chardevs(&self) -> Vec<ChardevInfo> {
        self.inner
            .serial
            .iter()
            .map(|c| ChardevInfo { label: c.label().to_string(), filename: c.filename(), frontend_open: c.frontend_open() })
            .collect()
    }

    /// When the guest first wrote the boot marker port, since the machine started building.
    pub fn boot_marker(&self) -> Option<Duration> {
        *lock(&self.inner.boot_marker)
    }

    /// `pmemsave`: guest-physical memory to a file.
    pub fn pmemsave(&self, addr: u64, size: u64, path: &Path) -> Result<(), MemsaveError> {
        let mut f = std::fs::File::create(path).map_err(|e| MemsaveError::Open { path: path.to_path_buf(), err: e })?;
        let mut buf = vec![0u8; 4096];
        let mut done = 0u64;
        while done < size {
            let chunk = (size - done).min(buf.len() as u64) as usize;
            let a = addr.checked_add(done).ok_or(MemsaveError::InvalidRange { addr, size })?;
            // Memory that is not RAM (holes, MMIO) reads as zero, as QEMU's
            // cpu_physical_memory_read does for unassigned space.
            if self.inner.ram.mem.read_slice(&mut buf[..chunk], GuestAddress(a)).is_err() {
                self.read_physical_sparse(a, &mut buf[..chunk]);
            }
            f.write_all(&buf[..chunk]).map_err(MemsaveError::Write)?;
            done += chunk as u64;
        }
        Ok(())
    }

    fn read_physical_sparse(&self, addr: u64, out: &mut [u8]) {
        for (i, b) in out.iter_mut().enumerate() {
            *b = self.inner.ram.mem.read_obj::<u8>(GuestAddress(addr + i as u64)).unwrap_or(0);
        }
    }

    /// `memsave`: guest-virtual memory, translated through `cpu`'s page tables, to a file.
    pub fn memsave(&self, addr: u64, size: u64, path: &Path, cpu: usize) -> Result<(), MemsaveError> {
        let vcpu = self.inner.vcpus.get(cpu).ok_or(MemsaveError::InvalidCpu)?;
        let mut f = std::fs::File::create(path).map_err(|e| MemsaveError::Open { path: path.to_path_buf(), err: e })?;
        let mut done = 0u64;
        let mut buf = vec![0u8; 4096];
        while done < size {
            let va = addr.checked_add(done).ok_or(MemsaveError::InvalidRange { addr, size })?;
            let in_page = 4096 - (va & 0xfff);
            let chunk = (size - done).min(in_page) as usize;
            let pa = vcpu.translate(va)?.ok_or(MemsaveError::InvalidRange { addr, size })?;
            self.inner
                .ram
                .mem
                .read_slice(&mut buf[..chunk], GuestAddress(pa))
                .map_err(|_| MemsaveError::InvalidRange { addr, size })?;
            f.write_all(&buf[..chunk]).map_err(MemsaveError::Write)?;
            done += chunk as u64;
        }
        Ok(())
    }

    /// Blocks until the machine ends; returns why.
    pub fn wait(&self) -> ExitReason {
        let mut st = lock(&self.inner.state);
        loop {
            if let Some(r) = st.exit {
                return r;
            }
            st = self.inner.exited.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Like [`Vm::wait`], bounded.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.inner.state);
        loop {
            if let Some(r) = st.exit {
                return Some(r);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            st = self.inner.exited.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// The VM's GSI routing table: MSI vectors (irqfd + route) for PCI devices.
    pub fn irq_router(&self) -> SharedIrqRouter {
        self.inner.irq.clone()
    }

    /// While in `internal-error`: the vCPU that stopped and what KVM reported.
    pub fn internal_error(&self) -> Option<(u8, String)> {
        lock(&self.inner.state).fault.clone()
    }

    /// The guest RAM memfd (for vhost-user backends) and the memory map.
    pub fn guest_memory(&self) -> &GuestRam {
        &self.inner.ram
    }

    /// A read of guest-physical MMIO as a vCPU would do it (ECAM, BARs), from the host side:
    /// tests play a guest driver with it. Returns false when nothing is mapped there.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.inner.mmio.read(addr, data)
    }

    /// A write of guest-physical MMIO as a vCPU would do it (an ioeventfd address written this
    /// way reaches the device's userspace handler, which signals the same eventfd).
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        self.inner.mmio.write(addr, data)
    }

    /// A drive's error policy said stop (blockd's BLOCK_IO_ERROR with action `stop`): a
    /// running guest pauses in `io-error` (STOP event; `cont` resumes it). Anything not running
    /// stays as it is, as QEMU's vm_stop does. Returns whether it stopped the guest.
    pub fn stop_on_io_error(&self) -> Result<bool, VmError> {
        let mut st = lock(&self.inner.state);
        if st.run != RunState::Running {
            return Ok(false);
        }
        self.inner.pause_all()?;
        st.run = RunState::IoError;
        self.inner.events.emit(VmEventKind::Stop);
        Ok(true)
    }
}

/// Clears the PCI window when `Vm::new` fails before the machine owns it: mapped BARs and
/// their devices reference each other, and the devices' vhost-user threads must end.
struct ClearWindowOnError(Option<MmioWindow>);

impl ClearWindowOnError {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for ClearWindowOnError {
    fn drop(&mut self) {
        if let Some(w) = self.0.take() {
            w.clear();
        }
    }
}

/// Builds the virtio-pci function and vhost-user frontend of every `vhost_user_devices` entry,
/// in its slot (or the first free one), with its BAR placed in the 32-bit window in order.
/// Returns the slots for the ACPI tables.
fn add_vhost_user_functions(
    cfg: &MachineConfig,
    ram: &GuestRam,
    irq: &SharedIrqRouter,
    window: &MmioWindow,
    vm: &Arc<VmFd>,
    pci: &SharedPciBus,
) -> Result<(Vec<acpi::AcpiPciSlot>, Vec<Arc<DeviceSignals>>), VmError> {
    let parts = MachineParts { mem: &ram.mem, irq, window, ioevents: vm.clone() };
    let mut slots = Vec::new();
    let mut signals = Vec::new();
    let mut next_bar = layout::PCI_MMIO32_START;
    for dev in &cfg.vhost_user_devices {
        if !window.contains(next_bar, BAR_SIZE) {
            return Err(VmError::PciFull { id: dev.id.clone() });
        }
        let slot = match dev.pci_slot {
            Some(s) => s,
            None => lock(pci).free_slot().ok_or_else(|| VmError::PciFull { id: dev.id.clone() })?,
        };
        if slot >= acpi::PCI_SLOTS || !lock(pci).is_free(slot) {
            return Err(VmError::PciSlot { id: dev.id.clone(), slot });
        }
        let function = vhost_user::build_function(dev, next_bar, &parts)?;
        signals.push(lock(&function).signals().clone());
        if !lock(pci).add_at(slot, function) {
            return Err(VmError::PciSlot { id: dev.id.clone(), slot });
        }
        tracing::info!(id = %dev.id, slot, bar = format_args!("{next_bar:#x}"), kind = ?dev.kind, "virtio-pci function");
        slots.push(acpi::AcpiPciSlot { slot, irq_pin: 0 });
        next_bar += BAR_SIZE;
    }
    Ok((slots, signals))
}

/// 0xCFC..0xCFF, forwarded to the config mechanism with the right offset.
struct PciDataWindow(Arc<Mutex<PciConfigIo>>);

impl crate::devices::bus::BusDevice for PciDataWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.0).read(4 + offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.0).write(4 + offset, data)
    }
}

impl VmInner {
    fn boot_spec(&self) -> Result<BootSpec<'_>, VmError> {
        let kernel = self.cfg.kernel.as_deref().ok_or(boot::BootError::NoKernel)?;
        Ok(BootSpec {
            kernel,
            initrd: self.cfg.initrd.as_deref(),
            cmdline: &self.cfg.cmdline,
            mem_size: self.cfg.mem_bytes,
            rsdp: self.rsdp,
        })
    }

    /// Power-on: firmware tables and kernel into RAM, every vCPU to its reset state.
    fn load_and_reset_cpus(&self) -> Result<(), VmError> {
        self.ram
            .mem
            .write_slice(&self.acpi_bytes, GuestAddress(layout::ACPI_START))
            .map_err(|e| VmError::AcpiWrite(e.to_string()))?;
        let entry: BootEntry = boot::load(&self.ram.mem, &self.boot_spec()?)?;
        self.reset_irqchip();
        lock(&self.pm).reset();
        for v in &self.vcpus {
            let e = (v.index == 0).then_some(entry);
            v.reset(e)?.map_err(|e| VmError::VcpuOp(v.index, e))?;
        }
        Ok(())
    }

    /// Masks every IOAPIC pin, as after power-on, so a reset guest gets no stale interrupts.
    fn reset_irqchip(&self) {
        let mut chip = kvm_bindings::kvm_irqchip { chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC, ..Default::default() };
        if self.vm.get_irqchip(&mut chip).is_ok() {
            // SAFETY: chip_id IOAPIC selects the ioapic member of the union.
            let ioapic = unsafe { &mut chip.chip.ioapic };
            for e in ioapic.redirtbl.iter_mut() {
                e.bits = 1 << 16;
            }
            if let Err(e) = self.vm.set_irqchip(&chip) {
                tracing::warn!(error = %e, "resetting the IOAPIC");
            }
        }
    }

    fn pause_all(&self) -> Result<(), VmError> {
        for v in &self.vcpus {
            v.pause()?;
        }
        Ok(())
    }

    fn resume_all(&self, st: &mut MachineState) -> Result<(), VmError> {
        for v in &self.vcpus {
            v.resume()?;
        }
        st.run = RunState::Running;
        self.events.emit(VmEventKind::Resume);
        Ok(())
    }

    fn reset(&self, guest: bool) -> Result<(), VmError> {
        let mut st = lock(&self.state);
        if st.exit.is_some() {
            return Ok(());
        }
        self.pause_all()?;
        // PCI functions back to power-on (their rings stopped, BARs where vmm-core put them).
        lock(&self.pci).reset();
        self.wait_backends_stopped();
        self.load_and_reset_cpus()?;
        st.fault = None;
        let reason = if guest { EventReason::GuestReset } else { EventReason::HostQmpSystemReset };
        self.events.emit_with(VmEventKind::Reset { guest }, Some(reason));
        if st.run == RunState::Running {
            for v in &self.vcpus {
                v.resume()?;
            }
        } else {
            // QEMU: a machine reset while not running leaves it in prelaunch, so `cont` works
            // again after a shutdown or an internal error.
            st.run = RunState::Prelaunch;
        }
        Ok(())
    }

    /// Waits until every vhost-user backend has stopped its rings (GET_VRING_BASE answered,
    /// RESET_DEVICE done), so none writes guest RAM after it is reloaded or once the vCPUs run
    /// again; bounded, since a hung backend must not hang the machine (its requests time out
    /// and its connection is dropped within a few seconds anyway).
    fn wait_backends_stopped(&self) {
        let deadline = Instant::now() + BACKEND_STOP_WAIT;
        for (i, s) in self.virtio_signals.iter().enumerate() {
            if !s.wait_reset(deadline.saturating_duration_since(Instant::now())) {
                let id = self.cfg.vhost_user_devices.get(i).map(|d| d.id.as_str()).unwrap_or("?");
                tracing::warn!(id, wait_s = BACKEND_STOP_WAIT.as_secs(), "reset: the backend has not stopped its rings; going on");
            }
        }
    }

    fn finish(&self, reason: ExitReason, event: VmEventKind, why: EventReason) {
        let mut st = lock(&self.state);
        if st.exit.is_some() {
            return;
        }
        self.events.emit_with(event, Some(why));
        if let Err(e) = self.pause_all() {
            tracing::warn!(error = %e, "stopping vCPUs at exit");
        }
        st.exit = Some(reason);
        self.exited.notify_all();
    }

    fn guest_poweroff(&self) {
        if self.cfg.no_shutdown {
            let mut st = lock(&self.state);
            if st.exit.is_some() {
                return;
            }
            self.events.emit_with(VmEventKind::Shutdown { guest: true }, Some(EventReason::GuestShutdown));
            if let Err(e) = self.pause_all() {
                tracing::warn!(error = %e, "stopping vCPUs");
            }
            if st.run == RunState::Running {
                self.events.emit(VmEventKind::Stop);
            }
            st.run = RunState::Shutdown;
        } else {
            let event = VmEventKind::Shutdown { guest: true };
            self.finish(ExitReason::GuestPoweroff, event, EventReason::GuestShutdown);
        }
    }

    fn guest_reset(&self) {
        if self.cfg.no_reboot {
            self.finish(ExitReason::GuestReset, VmEventKind::Shutdown { guest: true }, EventReason::GuestReset);
        } else if let Err(e) = self.reset(true) {
            tracing::error!(error = %e, "guest reset failed");
            self.internal_error(0, format!("reset failed: {e}"));
        }
    }

    fn internal_error(&self, cpu: u8, reason: String) {
        let mut st = lock(&self.state);
        if st.exit.is_some() || st.run == RunState::InternalError {
            return;
        }
        tracing::error!(cpu, %reason, "guest stopped with an internal error; the VM is kept for inspection");
        if let Err(e) = self.pause_all() {
            tracing::warn!(error = %e, "stopping vCPUs");
        }
        let was_running = st.run == RunState::Running;
        st.run = RunState::InternalError;
        st.fault = Some((cpu, reason));
        if was_running {
            self.events.emit(VmEventKind::Stop);
        }
    }
}

impl Drop for VmInner {
    fn drop(&mut self) {
        let _ = self.control.send(ControlMsg::Exit);
        // VcpuHandle's Drop stops and joins each thread before guest RAM is unmapped.
        self.vcpus.clear();
        // The mapped BARs hold their devices and the devices hold the window: break the cycle
        // so each function (and its vhost-user thread) goes with the machine.
        self.pci_window.clear();
    }
}

/// Handles what vCPUs and devices report. Holds only a weak reference, so dropping the last
/// `Vm` tears the machine down.
fn spawn_controller(inner: std::sync::Weak<VmInner>, rx: Receiver<ControlMsg>) {
    let spawned = std::thread::Builder::new().name("vm-control".into()).spawn(move || {
        while let Ok(msg) = rx.recv() {
            let Some(vm) = inner.upgrade() else { return };
            match msg {
                ControlMsg::Guest { action: GuestAction::Reset, why } => {
                    tracing::info!(why, "guest reset");
                    vm.guest_reset();
                }
                ControlMsg::Guest { action: GuestAction::PowerOff, why } => {
                    tracing::info!(why, "guest power-off");
                    vm.guest_poweroff();
                }
                ControlMsg::Fault { cpu, reason } => vm.internal_error(cpu, reason),
                ControlMsg::Exit => return,
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the machine controller thread");
    }
}
