//! The VM's GSI routing table and the irqfds behind it: the legacy irqchip pins, and MSI routes
//! for PCI devices (virtio-pci MSI-X vectors), each signalled through an eventfd that KVM turns
//! into an interrupt without a trip through vmm-core (the eventfd can be handed to a vhost-user
//! backend as its call fd).
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so every commit re-sends KVM's default
//! irqchip routes for GSIs 0..23 ([`default_routes`]) followed by one MSI route per configured
//! vector. MSI GSIs are allocated from [`FIRST_MSI_GSI`] up.
//!
//! ## Masking and the pending bit
//!
//! A masked vector has its irqfd *unregistered* (its route stays in the table, unused). A signal
//! from the device then stays in the eventfd's counter, where KVM no longer reads it: that
//! counter is the vector's pending bit ([`IrqRouter::is_pending`] polls it without consuming it,
//! for an MSI-X PBA read). [`IrqRouter::unmask`] consumes the counter, registers the irqfd again
//! and, if something was pending, signals the eventfd once, so the message is delivered exactly
//! as MSI-X requires (one message for any number of signals while masked). The other way, routing
//! a masked vector to nowhere with the irqfd still registered, would let KVM swallow the signal
//! and lose the pending state.
//!
//! A freshly allocated vector has its irqfd registered but no route until the first
//! [`IrqRouter::set_msi`]; a signal before that is dropped by KVM (there is nowhere to send it).

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_IRQ_ROUTES,
};
use kvm_ioctls::VmFd;
use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// Pins of the in-kernel IOAPIC; GSIs below this are irqchip pins.
pub const IOAPIC_PINS: u32 = 24;
/// Pins of the two cascaded 8259s (GSIs 0..15 reach them too).
pub const PIC_PINS: u32 = 16;
/// The first GSI handed out for MSI routes.
pub const FIRST_MSI_GSI: u32 = IOAPIC_PINS;

/// One entry of the routing table, before it is laid out for KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `gsi` drives `pin` of `chip` (`KVM_IRQCHIP_PIC_MASTER`, `_SLAVE` or `_IOAPIC`).
    Irqchip { gsi: u32, chip: u32, pin: u32 },
    Msi { gsi: u32, msg: MsiMessage },
}

/// An MSI message as the device would write it: address (low, high) and data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
}

impl Route {
    pub fn gsi(&self) -> u32 {
        match *self {
            Route::Irqchip { gsi, .. } | Route::Msi { gsi, .. } => gsi,
        }
    }

    /// The entry as `KVM_SET_GSI_ROUTING` takes it.
    pub fn to_kvm(&self) -> kvm_irq_routing_entry {
        let mut e = kvm_irq_routing_entry { gsi: self.gsi(), ..Default::default() };
        match *self {
            Route::Irqchip { chip, pin, .. } => {
                e.type_ = KVM_IRQ_ROUTING_IRQCHIP;
                e.u.irqchip.irqchip = chip;
                e.u.irqchip.pin = pin;
            }
            Route::Msi { msg, .. } => {
                e.type_ = KVM_IRQ_ROUTING_MSI;
                e.u.msi.address_lo = msg.addr_lo;
                e.u.msi.address_hi = msg.addr_hi;
                e.u.msi.data = msg.data;
            }
        }
        e
    }
}

/// KVM's own default table (`default_routing` in arch/x86/kvm), in its order: GSIs 0..15 go to
/// IOAPIC pin = GSI and to the 8259 pin GSI % 8 (master below 8, slave from 8); GSIs 16..23 to
/// the IOAPIC only. GSI 2 keeps both entries as KVM has them (nothing in this machine raises it:
/// the PIT drives GSI 0, and on the 8259 side pin 2 is the cascade).
pub fn default_routes() -> Vec<Route> {
    let mut v = Vec::with_capacity((IOAPIC_PINS + PIC_PINS) as usize);
    for gsi in 0..IOAPIC_PINS {
        v.push(Route::Irqchip { gsi, chip: KVM_IRQCHIP_IOAPIC, pin: gsi });
        if gsi < PIC_PINS {
            let chip = if gsi < 8 { KVM_IRQCHIP_PIC_MASTER } else { KVM_IRQCHIP_PIC_SLAVE };
            v.push(Route::Irqchip { gsi, chip, pin: gsi % 8 });
        }
    }
    v
}

#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    #[error("no free GSI for an MSI route: {first}..{limit} are all in use")]
    NoFreeGsi { first: u32, limit: u32 },
    #[error("GSI {0} is not an allocated MSI vector")]
    UnknownGsi(u32),
    #[error("GSI {0} is not an irqchip pin (0..{IOAPIC_PINS})")]
    NotAPin(u32),
    #[error("creating an eventfd for GSI {gsi}: {source}")]
    EventFd {
        gsi: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} the eventfd of GSI {gsi}: {source}")]
    EventFdIo {
        op: &'static str,
        gsi: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("building a routing table of {entries} entries (KVM takes at most {KVM_MAX_IRQ_ROUTES})")]
    TableTooLarge { entries: usize },
    #[error("KVM_SET_GSI_ROUTING with {entries} routes: {source}")]
    SetRouting {
        entries: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_IRQFD: registering the eventfd for GSI {gsi}: {source}")]
    RegisterIrqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_IRQFD: unregistering the eventfd of GSI {gsi}: {source}")]
    UnregisterIrqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The three VM ioctls the router needs; [`VmFd`] in the machine, a recorder in unit tests.
pub trait IrqChipFd: Send + Sync {
    fn set_gsi_routing(&self, table: &KvmIrqRouting) -> Result<(), kvm_ioctls::Error>;
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error>;
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error>;
}

impl IrqChipFd for VmFd {
    fn set_gsi_routing(&self, table: &KvmIrqRouting) -> Result<(), kvm_ioctls::Error> {
        VmFd::set_gsi_routing(self, table)
    }
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        VmFd::register_irqfd(self, fd, gsi)
    }
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        VmFd::unregister_irqfd(self, fd, gsi)
    }
}

/// An allocated MSI vector: its GSI and the eventfd that raises it (a duplicate of the router's
/// own, so it can be handed out, e.g. to a vhost-user backend as its call fd).
#[derive(Debug)]
pub struct MsiVector {
    pub gsi: u32,
    pub eventfd: EventFd,
}

struct MsiState {
    eventfd: EventFd,
    msg: Option<MsiMessage>,
    masked: bool,
}

/// Owner of the VM's GSI routing table. Shared as [`SharedIrqRouter`].
pub struct IrqRouter {
    chip: Arc<dyn IrqChipFd>,
    limit: u32,
    msi: BTreeMap<u32, MsiState>,
    /// Irqfds on irqchip pins (COM1), kept so the eventfds live as long as the router.
    pins: Vec<(u32, EventFd)>,
}

pub type SharedIrqRouter = Arc<Mutex<IrqRouter>>;

impl IrqRouter {
    /// A router for GSIs below `gsi_limit` (what `KVM_CAP_IRQ_ROUTING` reports; capped at the
    /// table size KVM takes). Nothing is sent to KVM until [`IrqRouter::commit`] or a change.
    pub fn new(chip: Arc<dyn IrqChipFd>, gsi_limit: u32) -> IrqRouter {
        let cap = FIRST_MSI_GSI + (KVM_MAX_IRQ_ROUTES as u32 - default_routes().len() as u32);
        IrqRouter { chip, limit: gsi_limit.min(cap), msi: BTreeMap::new(), pins: Vec::new() }
    }

    /// The whole table as the next commit sends it: the defaults, then every MSI vector that has
    /// a message, by GSI.
    pub fn routes(&self) -> Vec<Route> {
        let mut v = default_routes();
        v.extend(self.msi.iter().filter_map(|(&gsi, s)| s.msg.map(|msg| Route::Msi { gsi, msg })));
        v
    }

    /// Sends the table to KVM.
    pub fn commit(&self) -> Result<(), IrqError> {
        let entries: Vec<kvm_irq_routing_entry> = self.routes().iter().map(Route::to_kvm).collect();
        let table =
            KvmIrqRouting::from_entries(&entries).map_err(|_| IrqError::TableTooLarge { entries: entries.len() })?;
        self.chip
            .set_gsi_routing(&table)
            .map_err(|source| IrqError::SetRouting { entries: entries.len(), source })
    }

    /// An eventfd that raises irqchip pin `gsi` (0..23, through KVM's default routes) when
    /// written, e.g. for a legacy ISA device. It lives as long as the router.
    pub fn irqfd_for_pin(&mut self, gsi: u32) -> Result<EventFd, IrqError> {
        if gsi >= IOAPIC_PINS {
            return Err(IrqError::NotAPin(gsi));
        }
        let (mine, theirs) = eventfd_pair(gsi)?;
        self.chip.register_irqfd(&mine, gsi).map_err(|source| IrqError::RegisterIrqfd { gsi, source })?;
        self.pins.push((gsi, mine));
        Ok(theirs)
    }

    /// Allocates the lowest free GSI from [`FIRST_MSI_GSI`], with a fresh eventfd registered as
    /// its irqfd. The vector is unmasked and has no route until [`IrqRouter::set_msi`].
    pub fn allocate_msi(&mut self) -> Result<MsiVector, IrqError> {
        let gsi = (FIRST_MSI_GSI..self.limit)
            .find(|g| !self.msi.contains_key(g))
            .ok_or(IrqError::NoFreeGsi { first: FIRST_MSI_GSI, limit: self.limit })?;
        let (mine, theirs) = eventfd_pair(gsi)?;
        self.chip.register_irqfd(&mine, gsi).map_err(|source| IrqError::RegisterIrqfd { gsi, source })?;
        self.msi.insert(gsi, MsiState { eventfd: mine, msg: None, masked: false });
        Ok(MsiVector { gsi, eventfd: theirs })
    }

    fn state(&mut self, gsi: u32) -> Result<&mut MsiState, IrqError> {
        self.msi.get_mut(&gsi).ok_or(IrqError::UnknownGsi(gsi))
    }

    /// Points MSI vector `gsi` at a message (what the guest wrote to the MSI-X table entry or
    /// MSI capability) and commits the table. Nothing is sent when the message is unchanged; on
    /// failure the previous message is kept.
    pub fn set_msi(&mut self, gsi: u32, addr_lo: u32, addr_hi: u32, data: u32) -> Result<(), IrqError> {
        let msg = MsiMessage { addr_lo, addr_hi, data };
        let st = self.state(gsi)?;
        let old = st.msg.replace(msg);
        if old == Some(msg) {
            return Ok(());
        }
        if addr_lo & 0xfff0_0000 != 0xfee0_0000 {
            tracing::debug!(gsi, addr_lo = format_args!("{addr_lo:#x}"), "MSI address outside the APIC window");
        }
        let result = self.commit();
        if result.is_err() {
            self.state(gsi)?.msg = old;
        }
        result
    }

    /// The message vector `gsi` sends, if one was set.
    pub fn msi_message(&self, gsi: u32) -> Result<Option<MsiMessage>, IrqError> {
        self.msi.get(&gsi).map(|s| s.msg).ok_or(IrqError::UnknownGsi(gsi))
    }

    /// Masks vector `gsi`: its irqfd is unregistered, so a signal stays pending in the eventfd
    /// (see the module notes). Masking a masked vector does nothing.
    pub fn mask(&mut self, gsi: u32) -> Result<(), IrqError> {
        let chip = self.chip.clone();
        let st = self.state(gsi)?;
        if !st.masked {
            chip.unregister_irqfd(&st.eventfd, gsi).map_err(|source| IrqError::UnregisterIrqfd { gsi, source })?;
            st.masked = true;
        }
        Ok(())
    }

    /// Unmasks vector `gsi`: registers its irqfd again and, if it was signalled while masked,
    /// delivers one message. Returns whether a pending message was delivered.
    pub fn unmask(&mut self, gsi: u32) -> Result<bool, IrqError> {
        let chip = self.chip.clone();
        let st = self.state(gsi)?;
        if !st.masked {
            return Ok(false);
        }
        let pending = take_count(&st.eventfd, gsi)? > 0;
        if let Err(source) = chip.register_irqfd(&st.eventfd, gsi) {
            if pending {
                // Put the pending bit back for a later unmask.
                signal(&st.eventfd, gsi)?;
            }
            return Err(IrqError::RegisterIrqfd { gsi, source });
        }
        st.masked = false;
        if pending {
            signal(&st.eventfd, gsi)?;
        }
        Ok(pending)
    }

    pub fn is_masked(&self, gsi: u32) -> Result<bool, IrqError> {
        self.msi.get(&gsi).map(|s| s.masked).ok_or(IrqError::UnknownGsi(gsi))
    }

    /// The MSI-X pending bit: vector `gsi` is masked and was signalled since. Does not consume
    /// the signal. An unmasked vector is never pending (KVM delivers at once).
    pub fn is_pending(&self, gsi: u32) -> Result<bool, IrqError> {
        let st = self.msi.get(&gsi).ok_or(IrqError::UnknownGsi(gsi))?;
        if !st.masked {
            return Ok(false);
        }
        let mut pfd = libc::pollfd { fd: st.eventfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd on the stack for an fd the router owns; a zero timeout never blocks.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
        if ready < 0 {
            return Err(IrqError::EventFdIo { op: "polling", gsi, source: std::io::Error::last_os_error() });
        }
        Ok(ready > 0 && pfd.revents & libc::POLLIN != 0)
    }

    /// Frees vector `gsi`: unregisters its irqfd, drops its route (committing the table if it
    /// had one) and makes the GSI available again. Copies of the eventfd handed out stay valid
    /// but raise nothing.
    pub fn release(&mut self, gsi: u32) -> Result<(), IrqError> {
        let st = self.msi.get(&gsi).ok_or(IrqError::UnknownGsi(gsi))?;
        if !st.masked {
            self.chip.unregister_irqfd(&st.eventfd, gsi).map_err(|source| IrqError::UnregisterIrqfd { gsi, source })?;
        }
        let had_route = self.msi.remove(&gsi).and_then(|s| s.msg).is_some();
        if had_route {
            self.commit()?;
        }
        Ok(())
    }

    /// How many MSI vectors are allocated.
    pub fn msi_count(&self) -> usize {
        self.msi.len()
    }
}

/// A non-blocking eventfd and a duplicate of it.
fn eventfd_pair(gsi: u32) -> Result<(EventFd, EventFd), IrqError> {
    let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| IrqError::EventFd { gsi, source })?;
    let dup = fd.try_clone().map_err(|source| IrqError::EventFd { gsi, source })?;
    Ok((fd, dup))
}

/// Reads (and so clears) the eventfd's counter; 0 when it was not signalled.
fn take_count(fd: &EventFd, gsi: u32) -> Result<u64, IrqError> {
    match fd.read() {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
        Err(source) => Err(IrqError::EventFdIo { op: "reading", gsi, source }),
    }
}

fn signal(fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
    fd.write(1).map_err(|source| IrqError::EventFdIo { op: "signalling", gsi, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the router asked of KVM.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Routing(Vec<(u32, u32, [u32; 3])>),
        Register(u32),
        Unregister(u32),
    }

    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<Call>>,
        fail_routing: std::sync::atomic::AtomicBool,
        /// Raw fds registered per GSI, to check the same eventfd comes back.
        fds: Mutex<Vec<(u32, i32)>>,
    }

    impl Recorder {
        fn calls(&self) -> Vec<Call> {
            self.calls.lock().expect("lock").clone()
        }
        fn last_table(&self) -> Vec<(u32, u32, [u32; 3])> {
            self.calls()
                .into_iter()
                .rev()
                .find_map(|c| match c {
                    Call::Routing(t) => Some(t),
                    _ => None,
                })
                .expect("a routing commit")
        }
    }

    impl IrqChipFd for Recorder {
        fn set_gsi_routing(&self, table: &KvmIrqRouting) -> Result<(), kvm_ioctls::Error> {
            if self.fail_routing.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(kvm_ioctls::Error::new(libc::EINVAL));
            }
            let entries = table
                .as_slice()
                .iter()
                .map(|e| {
                    assert_eq!(e.flags, 0);
                    // SAFETY: type_ says which union member the router filled in.
                    let u = unsafe {
                        match e.type_ {
                            KVM_IRQ_ROUTING_IRQCHIP => [e.u.irqchip.irqchip, e.u.irqchip.pin, 0],
                            KVM_IRQ_ROUTING_MSI => [e.u.msi.address_lo, e.u.msi.address_hi, e.u.msi.data],
                            t => panic!("unexpected route type {t}"),
                        }
                    };
                    (e.gsi, e.type_, u)
                })
                .collect();
            self.calls.lock().expect("lock").push(Call::Routing(entries));
            Ok(())
        }
        fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
            self.calls.lock().expect("lock").push(Call::Register(gsi));
            self.fds.lock().expect("lock").push((gsi, fd.as_raw_fd()));
            Ok(())
        }
        fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
            let mut fds = self.fds.lock().expect("lock");
            let at = fds.iter().position(|&(g, f)| g == gsi && f == fd.as_raw_fd());
            // KVM answers ENOENT for an irqfd it does not have; so does the recorder.
            let Some(at) = at else { return Err(kvm_ioctls::Error::new(libc::ENOENT)) };
            fds.remove(at);
            self.calls.lock().expect("lock").push(Call::Unregister(gsi));
            Ok(())
        }
    }

    fn router(limit: u32) -> (Arc<Recorder>, IrqRouter) {
        let rec = Arc::new(Recorder::default());
        let r = IrqRouter::new(rec.clone(), limit);
        (rec, r)
    }

    const IRQCHIP: u32 = KVM_IRQ_ROUTING_IRQCHIP;
    const MSI: u32 = KVM_IRQ_ROUTING_MSI;

    fn default_table() -> Vec<(u32, u32, [u32; 3])> {
        // Written out by hand from KVM's default_routing: IOAPIC entry first, then the 8259's.
        let mut t = Vec::new();
        for gsi in 0..24 {
            t.push((gsi, IRQCHIP, [KVM_IRQCHIP_IOAPIC, gsi, 0]));
            if gsi < 8 {
                t.push((gsi, IRQCHIP, [KVM_IRQCHIP_PIC_MASTER, gsi, 0]));
            } else if gsi < 16 {
                t.push((gsi, IRQCHIP, [KVM_IRQCHIP_PIC_SLAVE, gsi - 8, 0]));
            }
        }
        t
    }

    #[test]
    fn the_default_table_is_kvms() {
        let routes = default_routes();
        assert_eq!(routes.len(), 40);
        let (rec, r) = router(4096);
        r.commit().expect("commit");
        assert_eq!(rec.last_table(), default_table());
        // Spot checks against KVM's list: the timer and COM1 reach both chips, GSI 2 is IOAPIC
        // pin 2 and the master's cascade pin, 23 is IOAPIC only.
        assert!(routes.contains(&Route::Irqchip { gsi: 0, chip: KVM_IRQCHIP_PIC_MASTER, pin: 0 }));
        assert!(routes.contains(&Route::Irqchip { gsi: 4, chip: KVM_IRQCHIP_IOAPIC, pin: 4 }));
        assert!(routes.contains(&Route::Irqchip { gsi: 2, chip: KVM_IRQCHIP_IOAPIC, pin: 2 }));
        assert!(routes.contains(&Route::Irqchip { gsi: 2, chip: KVM_IRQCHIP_PIC_MASTER, pin: 2 }));
        assert!(routes.contains(&Route::Irqchip { gsi: 15, chip: KVM_IRQCHIP_PIC_SLAVE, pin: 7 }));
        assert_eq!(routes.iter().filter(|r| r.gsi() == 23).count(), 1);
    }

    #[test]
    fn every_commit_resends_the_defaults_before_the_msi_routes() {
        let (rec, mut r) = router(4096);
        let a = r.allocate_msi().expect("alloc");
        let b = r.allocate_msi().expect("alloc");
        assert_eq!((a.gsi, b.gsi), (24, 25));
        assert_eq!(rec.calls(), vec![Call::Register(24), Call::Register(25)], "no route before set_msi");
        r.set_msi(b.gsi, 0xfee0_1000, 0, 0x46).expect("set");
        let mut want = default_table();
        want.push((25, MSI, [0xfee0_1000, 0, 0x46]));
        assert_eq!(rec.last_table(), want);
        r.set_msi(a.gsi, 0xfee0_0000, 0, 0x45).expect("set");
        let mut want = default_table();
        want.push((24, MSI, [0xfee0_0000, 0, 0x45]));
        want.push((25, MSI, [0xfee0_1000, 0, 0x46]));
        assert_eq!(rec.last_table(), want);
        // The same message again sends nothing.
        let n = rec.calls().len();
        r.set_msi(a.gsi, 0xfee0_0000, 0, 0x45).expect("set");
        assert_eq!(rec.calls().len(), n);
        assert_eq!(r.msi_message(a.gsi).expect("msg"), Some(MsiMessage { addr_lo: 0xfee0_0000, addr_hi: 0, data: 0x45 }));
    }

    #[test]
    fn kvm_entries_carry_the_message() {
        let msg = MsiMessage { addr_lo: 0xfee0_1000, addr_hi: 0x1, data: 0x4045 };
        let e = Route::Msi { gsi: 30, msg }.to_kvm();
        assert_eq!((e.gsi, e.type_, e.flags), (30, KVM_IRQ_ROUTING_MSI, 0));
        // SAFETY: an MSI entry, so the msi member is the one written.
        let m = unsafe { e.u.msi };
        assert_eq!((m.address_lo, m.address_hi, m.data), (0xfee0_1000, 1, 0x4045));
        let e = Route::Irqchip { gsi: 9, chip: KVM_IRQCHIP_PIC_SLAVE, pin: 1 }.to_kvm();
        assert_eq!((e.gsi, e.type_), (9, KVM_IRQ_ROUTING_IRQCHIP));
        // SAFETY: an irqchip entry.
        let c = unsafe { e.u.irqchip };
        assert_eq!((c.irqchip, c.pin), (KVM_IRQCHIP_PIC_SLAVE, 1));
    }

    #[test]
    fn gsis_are_reused_lowest_first_and_run_out_at_the_limit() {
        let (rec, mut r) = router(27);
        let v: Vec<u32> = (0..3).map(|_| r.allocate_msi().expect("alloc").gsi).collect();
        assert_eq!(v, [24, 25, 26]);
        assert!(matches!(r.allocate_msi(), Err(IrqError::NoFreeGsi { first: 24, limit: 27 })));
        r.set_msi(25, 0xfee0_0000, 0, 0x41).expect("set");
        r.release(25).expect("release");
        assert_eq!(rec.last_table(), default_table(), "the route went with the vector");
        assert_eq!(r.allocate_msi().expect("alloc").gsi, 25);
        assert_eq!(r.msi_message(25).expect("fresh"), None);
        assert_eq!(r.msi_count(), 3);
        // Unknown GSIs are refused everywhere.
        assert!(matches!(r.set_msi(40, 0, 0, 0), Err(IrqError::UnknownGsi(40))));
        assert!(matches!(r.mask(3), Err(IrqError::UnknownGsi(3))));
        assert!(matches!(r.release(40), Err(IrqError::UnknownGsi(40))));
        // The limit is capped by the table KVM can take.
        let (_, big) = router(u32::MAX);
        assert_eq!(big.limit, 24 + KVM_MAX_IRQ_ROUTES as u32 - 40);
    }

    #[test]
    fn a_failed_commit_keeps_the_old_message() {
        let (rec, mut r) = router(4096);
        let v = r.allocate_msi().expect("alloc");
        r.set_msi(v.gsi, 0xfee0_0000, 0, 0x45).expect("set");
        rec.fail_routing.store(true, std::sync::atomic::Ordering::SeqCst);
        let err = r.set_msi(v.gsi, 0xfee0_0000, 0, 0x47).expect_err("KVM refused");
        assert!(matches!(err, IrqError::SetRouting { entries: 41, .. }), "{err}");
        assert_eq!(r.msi_message(v.gsi).expect("msg").map(|m| m.data), Some(0x45));
    }

    #[test]
    fn masked_signals_stay_pending_and_unmask_delivers_one() {
        let (rec, mut r) = router(4096);
        let v = r.allocate_msi().expect("alloc");
        r.set_msi(v.gsi, 0xfee0_0000, 0, 0x45).expect("set");
        assert!(!r.is_pending(v.gsi).expect("pending"));
        r.mask(v.gsi).expect("mask");
        r.mask(v.gsi).expect("mask twice is a no-op");
        assert!(r.is_masked(v.gsi).expect("masked"));
        assert!(!r.is_pending(v.gsi).expect("pending"), "nothing signalled yet");
        v.eventfd.write(1).expect("signal");
        v.eventfd.write(1).expect("signal");
        assert!(r.is_pending(v.gsi).expect("pending"));
        assert!(r.is_pending(v.gsi).expect("pending"), "polling does not consume the bit");
        assert!(r.unmask(v.gsi).expect("unmask"), "the pending message is delivered");
        assert!(!r.is_masked(v.gsi).expect("masked"));
        assert_eq!(
            rec.calls().into_iter().filter(|c| !matches!(c, Call::Routing(_))).collect::<Vec<_>>(),
            vec![Call::Register(24), Call::Unregister(24), Call::Register(24)]
        );
        // Two signals while masked became one, written after the irqfd was back (the recorder
        // does not consume it, so it is still in the counter).
        assert_eq!(v.eventfd.read().expect("one signal"), 1);
        // Unmask with nothing pending signals nothing.
        r.mask(v.gsi).expect("mask");
        assert!(!r.unmask(v.gsi).expect("unmask"));
        assert!(r.unmask(v.gsi).is_ok_and(|d| !d), "unmasking an unmasked vector is a no-op");
        assert!(v.eventfd.read().is_err(), "counter empty (EAGAIN)");
    }

    #[test]
    fn release_of_a_masked_vector_does_not_unregister_twice() {
        let (rec, mut r) = router(4096);
        let v = r.allocate_msi().expect("alloc");
        r.mask(v.gsi).expect("mask");
        r.release(v.gsi).expect("release (the recorder refuses an unknown irqfd)");
        assert_eq!(rec.calls(), vec![Call::Register(24), Call::Unregister(24)], "no route was set: no commit");
        assert_eq!(r.msi_count(), 0);
    }

    #[test]
    fn pin_irqfds_are_only_for_irqchip_pins() {
        let (rec, mut r) = router(4096);
        let fd = r.irqfd_for_pin(4).expect("COM1");
        fd.write(1).expect("the handed-out copy works");
        assert!(matches!(r.irqfd_for_pin(24), Err(IrqError::NotAPin(24))));
        assert_eq!(rec.calls(), vec![Call::Register(4)]);
        // Pins never take an MSI GSI.
        assert_eq!(r.allocate_msi().expect("alloc").gsi, 24);
    }
}
