//! The storage and balloon part of qemu-system-x86_64's command line: `-drive`, `-device`,
//! `-chardev` and QEMU 1.1's `-balloon`, checked as QEMU 7.2 checks them (same defaults, same
//! generated ids, same error wording where QEMU has one).
//!
//! Parsing only records what was asked ([`DeviceSet`]); [`DeviceSet::finish`] makes the
//! cross-option checks (a `-device` naming an unknown drive, a drive used twice, duplicate ids,
//! PCI slots). What needs the file system (opening images, probing their format, the external
//! vhost-user sockets) is `drive_files.rs`'s; where the sockets go is `device_plan.rs`'s.

use std::path::PathBuf;

use vm_config::{CacheMode, DriveFormat, ErrorAction, VirtioKind};

use crate::net_opts::{nic_device_key, NetSet, NetdevKind, NicProps, NicSpec, NET_QUEUE_SIZE};
use crate::qemu_opts::{parse_bool, parse_keyvals, ValueError};

/// virtio-blk-pci's `queue-size` default in QEMU 7.2.
pub const BLK_QUEUE_SIZE: u16 = 256;
/// vhost-user-blk-pci's `queue-size` default in QEMU 7.2.
pub const VHOST_USER_BLK_QUEUE_SIZE: u16 = 128;
/// virtio-balloon's virtqueues: inflate, deflate, stats (QEMU sizes them 128).
pub const BALLOON_QUEUES: u16 = 3;
pub const BALLOON_QUEUE_SIZE: u16 = 128;
/// Queues per block device when `num-queues` is not given. (QEMU 7.2's default is one per
/// vCPU for virtio-pci; Flotilla starts with one, the guest driver works either way.)
pub const DEFAULT_NUM_QUEUES: u16 = 1;
/// Most queues a block device may have (virtio-blk's num_queues is a u16; the virtio-pci
/// MSI-X table needs one vector per queue plus config; 64 keeps that table small).
pub const MAX_NUM_QUEUES: u16 = 64;

const ID_HINT: &str = "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.";

/// `-drive if=`: the two interfaces Flotilla implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriveIf {
    Virtio,
    None,
}

/// One `-drive`, as given (the format may still need probing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveSpec {
    /// `-drive ARG`, for messages about this drive found later (missing file, probing).
    pub location: String,
    pub id: String,
    pub interface: DriveIf,
    pub file: PathBuf,
    /// None: probed like QEMU (qcow2 magic, else raw with QEMU's warning).
    pub format: Option<DriveFormat>,
    pub readonly: bool,
    pub cache: CacheMode,
    pub werror: ErrorAction,
    pub rerror: ErrorAction,
    pub serial: Option<String>,
    /// A key QEMU passes on to the image format driver, which refuses it once the format is
    /// known ("Block format 'raw' does not support the option 'K'").
    pub format_option: Option<String>,
}

/// What a virtio-pci device's vhost-user backend is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A `-drive` served by blockd (by id).
    Drive(String),
    /// An external vhost-user backend listening on this path (`-chardev socket,path=`).
    External(PathBuf),
    /// balloond.
    Balloon,
    /// netd, for the NIC of this net client name ([`NicSpec::name`]).
    Netd(String),
}

/// One virtio-pci function of the machine, in command-line order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// `-device ARG` (or the `-drive`/`-balloon` that implied it), for messages.
    pub location: String,
    /// The qdev id; "" when not given, as QEMU's query-pci reports it.
    pub id: String,
    /// The QEMU device model name, for messages (`virtio-blk-pci`, ...).
    pub model: &'static str,
    pub kind: VirtioKind,
    pub backend: Backend,
    pub num_queues: u16,
    pub queue_size: u16,
    pub pci_slot: Option<u8>,
    /// virtio-blk-pci's `serial=` (overrides the drive's).
    pub serial: Option<String>,
    /// `vectors=`: MSI-X table entries (None: one per queue plus one).
    pub msix_vectors: Option<u16>,
}

/// `-chardev socket,id=,path=`: a vhost-user backend's socket the frontend connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevSpec {
    pub location: String,
    pub id: String,
    pub path: PathBuf,
}

/// `-balloon`: the last one given wins, as with QEMU 1.1.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BalloonOpt {
    None,
    Virtio { location: String, pci_slot: Option<u8> },
}

/// Everything the storage/balloon options asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceSet {
    pub drives: Vec<DriveSpec>,
    pub chardevs: Vec<ChardevSpec>,
    pub devices: Vec<DeviceSpec>,
    /// `-device` options, resolved against drives and chardevs in `finish` (a `-device` may
    /// come before the `-drive` it names, as with QEMU).
    pending: Vec<PendingDevice>,
    balloon: Option<BalloonOpt>,
    /// Units taken per interface, for QEMU's `virtio<N>` / `none<N>` ids.
    units: Vec<(DriveIf, u32)>,
    /// `-netdev`, `-net`.
    pub net: NetSet,
    /// The NICs, resolved in `finish` (PCI order).
    pub nics: Vec<NicSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PendingDevice {
    spec: DeviceSpec,
    /// virtio-blk-pci's `drive=` / vhost-user-blk-pci's `chardev=`.
    reference: Option<String>,
    /// The device of a `-drive if=virtio`: its backend is set already.
    implied: bool,
    /// virtio-net-pci's properties.
    nic: Option<NicProps>,
}

/// QEMU's id check (`id_wellformed`).
fn check_id(id: &str) -> Result<(), ValueError> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ValueError::with_hint("Parameter 'id' expects an identifier", ID_HINT))
    }
}

/// QEMU's `cache=` modes.
fn parse_cache(v: &str) -> Result<CacheMode, ValueError> {
    Ok(match v {
        "writeback" => CacheMode::Writeback,
        "none" | "off" => CacheMode::None,
        "writethrough" => CacheMode::Writethrough,
        "directsync" => CacheMode::Directsync,
        "unsafe" => CacheMode::Unsafe,
        _ => return Err(ValueError::new("invalid cache option")),
    })
}

fn parse_error_action(v: &str, write: bool) -> Result<ErrorAction, ValueError> {
    Ok(match v {
        "report" => ErrorAction::Report,
        "ignore" => ErrorAction::Ignore,
        "stop" => ErrorAction::Stop,
        "enospc" if write => ErrorAction::Enospc,
        _ => {
            let what = if write { "write" } else { "read" };
            return Err(ValueError::new(format!("'{v}' invalid {what} error action")));
        }
    })
}

/// Image formats QEMU 7.2 knows but Flotilla's blockd does not open.
const OTHER_FORMATS: &[&str] = &[
    "vmdk",
    "vdi",
    "vpc",
    "vhdx",
    "vvfat",
    "qed",
    "qcow",
    "luks",
    "dmg",
    "parallels",
    "bochs",
    "cloop",
    "host_device",
    "host_cdrom",
    "file",
    "nbd",
    "iscsi",
    "rbd",
    "gluster",
    "ssh",
    "http",
    "https",
    "null-co",
    "null-aio",
    "blkdebug",
    "quorum",
    "throttle",
    "compress",
    "copy-on-read",
    "preallocate",
    "replication",
    "nvme",
    "snapshot-access",
];

fn parse_format(v: &str) -> Result<DriveFormat, ValueError> {
    match v {
        "raw" => Ok(DriveFormat::Raw),
        "qcow2" => Ok(DriveFormat::Qcow2),
        f if OTHER_FORMATS.contains(&f) => {
            Err(ValueError::new(format!("image format '{f}' is not supported by flotilla (only raw and qcow2)")))
        }
        f => Err(ValueError::new(format!("Unknown driver '{f}'"))),
    }
}

/// Keys of `-drive` that QEMU accepts but Flotilla does not implement.
const UNSUPPORTED_DRIVE_KEYS: &[&str] = &[
    "bus",
    "unit",
    "snapshot",
    "aio",
    "discard",
    "detect-zeroes",
    "copy-on-read",
    "bps",
    "bps_rd",
    "bps_wr",
    "iops",
    "iops_rd",
    "iops_wr",
    "throttling.bps-total",
    "throttling.iops-total",
    "group",
    "auto-read-only",
    "force-share",
    "read-only",
    "cyls",
    "heads",
    "secs",
    "trans",
    "boot",
    "encrypt.key-secret",
    "file.locking",
];

/// A PCI address as QEMU's `addr` property takes it: `SLOT[.FN]`, both hex. Flotilla's devices
/// are single-function on bus 0, slots 1..=31 (slot 0 is the host bridge).
fn parse_pci_addr(model: &str, v: &str) -> Result<u8, ValueError> {
    let bad = || ValueError::new(format!("Property '{model}.addr' doesn't take value '{v}'"));
    let (slot, func) = match v.split_once('.') {
        Some((s, f)) => (s, Some(f)),
        None => (v, None),
    };
    let hex = |s: &str| {
        let s = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")).unwrap_or(s);
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            None
        } else {
            u32::from_str_radix(s, 16).ok()
        }
    };
    let slot = hex(slot).filter(|&s| s < 32).ok_or_else(bad)?;
    if let Some(f) = func {
        let f = hex(f).filter(|&f| f < 8).ok_or_else(bad)?;
        if f != 0 {
            return Err(ValueError::new(format!(
                "PCI function {f} is not supported by flotilla: devices are single-function (addr=SLOT or SLOT.0)"
            )));
        }
    }
    if slot == 0 {
        return Err(ValueError::new(format!(
            "PCI: slot 0 function 0 not available for {model}, in use by the host bridge"
        )));
    }
    // slot < 32 was checked above.
    u8::try_from(slot).map_err(|_| bad())
}

fn parse_u16(key: &str, v: &str) -> Result<u16, ValueError> {
    let n = if let Some(h) = v.strip_prefix("0x") {
        u64::from_str_radix(h, 16).ok()
    } else if v.bytes().all(|b| b.is_ascii_digit()) {
        v.parse::<u64>().ok()
    } else {
        None
    };
    let n = n.ok_or_else(|| ValueError::new(format!("Parameter '{key}' expects integer")))?;
    u16::try_from(n).map_err(|_| ValueError::new(format!("Parameter '{key}' expects uint16_t")))
}

fn parse_num_queues(v: &str) -> Result<u16, ValueError> {
    let n = parse_u16("num-queues", v)?;
    if n == 0 {
        return Err(ValueError::new("num-queues property must be larger than 0"));
    }
    if n > MAX_NUM_QUEUES {
        return Err(ValueError::new(format!("num-queues {n} is more than flotilla supports ({MAX_NUM_QUEUES})")));
    }
    Ok(n)
}

fn parse_queue_size(v: &str) -> Result<u16, ValueError> {
    let n = parse_u16("queue-size", v)?;
    if !(2..=1024).contains(&n) || !n.is_power_of_two() {
        // QEMU's words for virtio-blk.
        return Err(ValueError::new(format!(
            "invalid queue-size property ({n}), must be > 2 and a power of 2 and <= 1024"
        )));
    }
    Ok(n)
}

impl DeviceSet {
    fn next_unit(&mut self, interface: DriveIf) -> u32 {
        let mut u = 0;
        while self.units.contains(&(interface, u)) {
            u += 1;
        }
        u
    }

    fn drive_id_taken(&self, id: &str) -> bool {
        self.drives.iter().any(|d| d.id == id)
    }

    /// `-drive KEY=VALUE,...`
    pub fn drive(&mut self, arg: &str) -> Result<(), ValueError> {
        let mut file = None;
        let mut interface = None;
        let mut format = None;
        let mut id = None;
        let mut index = None;
        let mut readonly = false;
        let mut cache = CacheMode::Writeback;
        let mut werror = ErrorAction::Enospc;
        let mut rerror = ErrorAction::Report;
        let mut serial = None;
        let mut format_option = None;
        for (k, v) in parse_keyvals(arg, Some("file")) {
            match k.as_str() {
                "file" => file = Some(v),
                "if" => {
                    interface = Some(match v.as_str() {
                        "virtio" => DriveIf::Virtio,
                        "none" => DriveIf::None,
                        "ide" | "scsi" | "floppy" | "pflash" | "mtd" | "sd" | "xen" => {
                            return Err(if_unsupported(&v));
                        }
                        _ => return Err(ValueError::new(format!("unsupported bus type '{v}'"))),
                    })
                }
                "format" => format = Some(parse_format(&v)?),
                "id" => {
                    check_id(&v)?;
                    id = Some(v);
                }
                "index" => {
                    let n: u32 = v
                        .parse()
                        .ok()
                        .filter(|_| v.bytes().all(|b| b.is_ascii_digit()))
                        .ok_or_else(|| ValueError::new("Parameter 'index' expects a number"))?;
                    index = Some(n);
                }
                "readonly" => {
                    readonly = parse_bool("read-only", &v)?;
                }
                "cache" => cache = parse_cache(&v)?,
                "werror" => werror = parse_error_action(&v, true)?,
                "rerror" => rerror = parse_error_action(&v, false)?,
                "serial" => serial = Some(v),
                "media" => match v.as_str() {
                    "disk" => {}
                    "cdrom" => return Err(ValueError::new("media=cdrom is not supported by flotilla (only disk)")),
                    _ => return Err(ValueError::new(format!("'{v}' invalid media"))),
                },
                k if UNSUPPORTED_DRIVE_KEYS.contains(&k) => {
                    return Err(ValueError::new(format!("-drive option '{k}' is not supported by flotilla")))
                }
                _ => {
                    // QEMU hands unknown keys to the format driver, which refuses them.
                    format_option.get_or_insert(k);
                }
            }
        }
        // QEMU's default interface is IDE.
        let interface = interface.ok_or_else(|| if_unsupported("ide"))?;
        if let (Some(k), Some(f)) = (&format_option, format) {
            return Err(format_option_error(f, k));
        }
        let unit = match index {
            Some(n) => {
                if self.units.contains(&(interface, n)) {
                    return Err(ValueError::new(format!("drive with bus=0, unit={n} (index={n}) exists")));
                }
                n
            }
            None => self.next_unit(interface),
        };
        let id = id.unwrap_or_else(|| {
            let name = match interface {
                DriveIf::Virtio => "virtio",
                DriveIf::None => "none",
            };
            format!("{name}{unit}")
        });
        if self.drive_id_taken(&id) {
            return Err(ValueError::new(format!("Duplicate ID '{id}' for drive")));
        }
        let file = match file {
            Some(f) if f.is_empty() => return Err(ValueError::new("A block device must be specified for \"file\"")),
            Some(f) => PathBuf::from(f),
            None if interface == DriveIf::Virtio => {
                return Err(ValueError::new("Device needs media, but drive is empty"))
            }
            None => return Err(ValueError::new("a drive without a medium (no file=) is not supported by flotilla")),
        };
        self.units.push((interface, unit));
        let location = format!("-drive {arg}");
        if interface == DriveIf::Virtio {
            let spec = DeviceSpec {
                location: location.clone(),
                id: String::new(),
                model: "virtio-blk-pci",
                kind: VirtioKind::Block,
                backend: Backend::Drive(id.clone()),
                num_queues: DEFAULT_NUM_QUEUES,
                queue_size: BLK_QUEUE_SIZE,
                pci_slot: None,
                serial: None,
                msix_vectors: None,
            };
            self.pending.push(PendingDevice { spec, reference: None, implied: true, nic: None });
        }
        self.drives.push(DriveSpec {
            location,
            id,
            interface,
            file,
            format,
            readonly,
            cache,
            werror,
            rerror,
            serial,
            format_option,
        });
        Ok(())
    }

    /// `-chardev socket,id=ID,path=PATH`
    pub fn chardev(&mut self, arg: &str) -> Result<(), ValueError> {
        let mut pairs = parse_keyvals(arg, Some("backend")).into_iter();
        let backend = match pairs.next() {
            Some((k, v)) if k == "backend" => v,
            _ => return Err(ValueError::new("chardev: no backend specified")),
        };
        match backend.as_str() {
            "socket" => {}
            "null" | "stdio" | "file" | "pty" | "pipe" | "udp" | "vc" | "serial" | "tty" | "parallel" | "ringbuf"
            | "memory" | "mux" | "msmouse" | "wctablet" | "braille" | "testdev" | "spicevmc" | "spiceport"
            | "qemu-vdagent" | "dbus" => {
                return Err(ValueError::new(format!(
                    "chardev backend '{backend}' is not supported by flotilla (only socket, for vhost-user-blk-pci)"
                )))
            }
            _ => return Err(ValueError::new(format!("'{backend}' is not a valid char driver name"))),
        }
        let mut id = None;
        let mut path = None;
        for (k, v) in pairs {
            match k.as_str() {
                "id" => id = Some(v),
                "path" => path = Some(v),
                "server" | "wait" => {
                    if parse_bool(&k, &v)? && k == "server" {
                        return Err(ValueError::new(
                            "-chardev socket,server=on is not supported by flotilla: vmm-core connects to the backend's socket",
                        ));
                    }
                }
                "reconnect" => {} // vmm-core always reconnects
                "host" | "port" | "fd" | "to" | "ipv4" | "ipv6" | "nodelay" | "telnet" | "tn3270" | "websocket"
                | "tls-creds" | "tls-authz" | "abstract" | "tight" | "mux" | "logfile" | "logappend" => {
                    return Err(ValueError::new(format!("socket option '{k}' is not supported by flotilla")))
                }
                _ => return Err(ValueError::new(format!("Invalid parameter '{k}'"))),
            }
        }
        let id = id.ok_or_else(|| ValueError::new("chardev: no id specified"))?;
        check_id(&id)?;
        if self.chardevs.iter().any(|c| c.id == id) {
            return Err(ValueError::new(format!("Duplicate ID '{id}' for chardev")));
        }
        let path = match path {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            // QEMU's socket chardev without path/host/fd.
            _ => return Err(ValueError::new("Unable to parse FD number ")),
        };
        self.chardevs.push(ChardevSpec { location: format!("-chardev {arg}"), id, path });
        Ok(())
    }

    /// `-device DRIVER,KEY=VALUE,...`
    pub fn device(&mut self, arg: &str) -> Result<(), ValueError> {
        let mut pairs = parse_keyvals(arg, Some("driver")).into_iter().peekable();
        let driver = match pairs.peek() {
            Some((k, v)) if k == "driver" => v.clone(),
            _ => return Err(ValueError::new("Parameter 'driver' is missing")),
        };
        pairs.next();
        let (model, kind, queue_size): (&'static str, _, _) = match driver.as_str() {
            "virtio-blk-pci" => ("virtio-blk-pci", VirtioKind::Block, BLK_QUEUE_SIZE),
            "vhost-user-blk-pci" => ("vhost-user-blk-pci", VirtioKind::Block, VHOST_USER_BLK_QUEUE_SIZE),
            "virtio-balloon-pci" => ("virtio-balloon-pci", VirtioKind::Balloon, BALLOON_QUEUE_SIZE),
            "virtio-net-pci" => ("virtio-net-pci", VirtioKind::Net, NET_QUEUE_SIZE),
            d if QEMU_OTHER_DEVICES.contains(&d) => {
                return Err(ValueError::new(format!("device '{d}' is not supported by flotilla")))
            }
            d => return Err(ValueError::new(format!("'{d}' is not a valid device model name"))),
        };
        let mut spec = DeviceSpec {
            location: format!("-device {arg}"),
            id: String::new(),
            model,
            kind,
            backend: Backend::Balloon,
            num_queues: if kind == VirtioKind::Balloon { BALLOON_QUEUES } else { DEFAULT_NUM_QUEUES },
            queue_size,
            pci_slot: None,
            serial: None,
            msix_vectors: None,
        };
        let mut reference = None;
        let mut nic = (kind == VirtioKind::Net).then(NicProps::default);
        for (k, v) in pairs {
            if let Some(p) = nic.as_mut() {
                if nic_device_key(p, &k, &v)? {
                    continue;
                }
            }
            match (model, k.as_str()) {
                (_, "id") => {
                    check_id(&v)?;
                    spec.id = v;
                }
                (_, "addr") => spec.pci_slot = Some(parse_pci_addr(model, &v)?),
                ("virtio-blk-pci", "drive") | ("vhost-user-blk-pci", "chardev") => reference = Some(v),
                ("virtio-blk-pci" | "vhost-user-blk-pci", "num-queues") => spec.num_queues = parse_num_queues(&v)?,
                ("virtio-blk-pci" | "vhost-user-blk-pci", "queue-size") => spec.queue_size = parse_queue_size(&v)?,
                ("virtio-blk-pci", "serial") => spec.serial = Some(v),
                _ => return Err(ValueError::new(format!("Property '{model}.{k}' not found"))),
            }
        }
        if !spec.id.is_empty() && self.pending.iter().any(|p| !p.implied && p.spec.id == spec.id) {
            return Err(ValueError::new(format!("Duplicate ID '{}' for device", spec.id)));
        }
        match model {
            "virtio-blk-pci" if reference.is_none() => return Err(ValueError::new("drive property not set")),
            "vhost-user-blk-pci" if reference.is_none() => return Err(ValueError::new("chardev is mandatory")),
            _ => {}
        }
        self.pending.push(PendingDevice { spec, reference, implied: false, nic });
        Ok(())
    }

    /// `-netdev TYPE,id=ID,...`
    pub fn netdev(&mut self, arg: &str) -> Result<(), ValueError> {
        self.net.netdev(arg)
    }

    /// QEMU 1.1's `-net nic|tap|user|none,...`: a `-net nic` is a virtio-net-pci function in
    /// command-line order, like a `-device`.
    pub fn legacy_net(&mut self, arg: &str) -> Result<(), ValueError> {
        let Some(props) = self.net.net(arg)? else { return Ok(()) };
        let mut pci_slot = None;
        for (k, v) in parse_keyvals(arg, Some("type")) {
            if k == "addr" {
                pci_slot = Some(parse_pci_addr("virtio-net-pci", &v)?);
            }
        }
        let spec = DeviceSpec {
            location: format!("-net {arg}"),
            id: String::new(),
            model: "virtio-net-pci",
            kind: VirtioKind::Net,
            backend: Backend::Netd(String::new()),
            num_queues: 3,
            queue_size: NET_QUEUE_SIZE,
            pci_slot,
            serial: None,
            msix_vectors: props.vectors,
        };
        self.pending.push(PendingDevice { spec, reference: None, implied: false, nic: Some(props) });
        Ok(())
    }

    /// QEMU 1.1's `-balloon none` / `-balloon virtio[,addr=str]`.
    pub fn balloon(&mut self, arg: &str) -> Result<(), ValueError> {
        if arg == "none" {
            self.balloon = Some(BalloonOpt::None);
            return Ok(());
        }
        let Some(rest) = arg.strip_prefix("virtio").filter(|r| r.is_empty() || r.starts_with(',')) else {
            return Err(ValueError::new(format!("Unknown -balloon argument {arg}")));
        };
        let mut pci_slot = None;
        for (k, v) in parse_keyvals(rest.trim_start_matches(','), None) {
            match k.as_str() {
                "" => {}
                "addr" => pci_slot = Some(parse_pci_addr("virtio-balloon-pci", &v)?),
                _ => return Err(ValueError::new(format!("Unknown -balloon argument {arg}"))),
            }
        }
        self.balloon = Some(BalloonOpt::Virtio { location: format!("-balloon {arg}"), pci_slot });
        Ok(())
    }

    /// The cross-option checks, once every option is in. Errors carry the offending option's
    /// location.
    pub fn finish(&mut self) -> Result<(), (String, ValueError)> {
        // -balloon virtio is a device of its own, after those on the command line (QEMU 1.1
        // added it when options were done).
        if let Some(BalloonOpt::Virtio { location, pci_slot }) = self.balloon.take() {
            self.pending.push(PendingDevice {
                spec: DeviceSpec {
                    location,
                    id: String::new(),
                    model: "virtio-balloon-pci",
                    kind: VirtioKind::Balloon,
                    backend: Backend::Balloon,
                    num_queues: BALLOON_QUEUES,
                    queue_size: BALLOON_QUEUE_SIZE,
                    pci_slot,
                    serial: None,
                    msix_vectors: None,
                },
                reference: None,
                implied: false,
                nic: None,
            });
        }
        let mut nic_props = Vec::new();
        for p in std::mem::take(&mut self.pending) {
            let PendingDevice { mut spec, reference, implied, nic } = p;
            if implied {
                self.devices.push(spec);
                continue;
            }
            if let Some(props) = nic {
                // Its host side is known once every NIC is in (resolve_nics).
                spec.backend = Backend::Netd(String::new());
                spec.msix_vectors = props.vectors.or(spec.msix_vectors);
                nic_props.push((self.devices.len(), spec.location.clone(), spec.id.clone(), props));
                self.devices.push(spec);
                continue;
            }
            let at = |e: ValueError| (spec.location.clone(), e);
            match (spec.model, reference) {
                ("virtio-blk-pci", Some(drive)) => {
                    let Some(d) = self.drives.iter().find(|d| d.id == drive) else {
                        return Err(at(ValueError::new(format!(
                            "Property 'virtio-blk-device.drive' can't find value '{drive}'"
                        ))));
                    };
                    if d.interface == DriveIf::Virtio
                        || self.devices.iter().any(|x| x.backend == Backend::Drive(drive.clone()))
                    {
                        return Err(at(ValueError::new(format!(
                            "Drive '{drive}' is already in use by another device"
                        ))));
                    }
                    spec.backend = Backend::Drive(drive);
                }
                ("vhost-user-blk-pci", Some(chardev)) => {
                    let Some(c) = self.chardevs.iter().find(|c| c.id == chardev) else {
                        return Err(at(ValueError::new(format!(
                            "Property 'vhost-user-blk.chardev' can't find value '{chardev}'"
                        ))));
                    };
                    let path = c.path.clone();
                    if self.devices.iter().any(|x| x.backend == Backend::External(path.clone())) {
                        return Err(at(ValueError::new(format!(
                            "Property 'vhost-user-blk.chardev' can't take value '{chardev}', it's in use"
                        ))));
                    }
                    spec.backend = Backend::External(path);
                }
                (_, _) => {
                    // The balloon (NICs were taken out above).
                    if self.devices.iter().any(|x| x.backend == Backend::Balloon) {
                        return Err(at(ValueError::new("Only one balloon device is supported")));
                    }
                    spec.backend = Backend::Balloon;
                }
            }
            self.devices.push(spec);
        }
        self.resolve_nics(nic_props)?;
        self.check_slots()?;
        Ok(())
    }

    /// Gives each NIC its host side: netd (tap, user) or an external vhost-user backend, and
    /// its queues (2 per pair, plus the control queue).
    fn resolve_nics(&mut self, nic_props: Vec<(usize, String, String, NicProps)>) -> Result<(), (String, ValueError)> {
        let list: Vec<(String, String, NicProps)> =
            nic_props.iter().map(|(_, loc, id, p)| (loc.clone(), id.clone(), p.clone())).collect();
        let nics = self.net.resolve(&list)?;
        for ((index, location, _, _), nic) in nic_props.iter().zip(&nics) {
            let at = |e: ValueError| (location.clone(), e);
            let netdev = self.net.netdev_of(nic).map(|d| d.kind.clone());
            let backend = match netdev {
                Some(NetdevKind::VhostUser { chardev, .. }) => {
                    let Some(c) = self.chardevs.iter().find(|c| c.id == chardev) else {
                        return Err(at(ValueError::new(format!("chardev \"{chardev}\" not found"))));
                    };
                    let path = c.path.clone();
                    if self.devices.iter().any(|x| x.backend == Backend::External(path.clone())) {
                        return Err(at(ValueError::new(format!(
                            "Property 'vhost-user-net.chardev' can't take value '{chardev}', it's in use"
                        ))));
                    }
                    Backend::External(path)
                }
                _ => Backend::Netd(nic.name.clone()),
            };
            let d = &mut self.devices[*index];
            d.backend = backend;
            // rx and tx per pair, then the control queue (QEMU's virtio-net always has one, and
            // netd always offers VIRTIO_NET_F_CTRL_VQ).
            d.num_queues = 2 * nic.queue_pairs + 1;
        }
        self.nics = nics;
        Ok(())
    }

    /// Whether netd is needed (a NIC on a tap or user network).
    pub fn has_netd(&self) -> bool {
        self.devices.iter().any(|d| matches!(d.backend, Backend::Netd(_)))
    }

    fn check_slots(&self) -> Result<(), (String, ValueError)> {
        for (i, d) in self.devices.iter().enumerate() {
            let Some(slot) = d.pci_slot else { continue };
            if let Some(other) = self.devices[..i].iter().find(|o| o.pci_slot == Some(slot)) {
                let id = if other.id.is_empty() { "(null)" } else { &other.id };
                return Err((
                    d.location.clone(),
                    ValueError::new(format!(
                        "PCI: slot {slot} function 0 not available for {}, in use by {},id={id}",
                        d.model, other.model
                    )),
                ));
            }
        }
        Ok(())
    }

    /// Whether blockd is needed (any `-drive`).
    pub fn has_drives(&self) -> bool {
        !self.drives.is_empty()
    }

    /// Whether balloond is needed.
    pub fn has_balloon(&self) -> bool {
        self.devices.iter().any(|d| d.backend == Backend::Balloon)
    }
}

fn if_unsupported(interface: &str) -> ValueError {
    let default = if interface == "ide" { " (QEMU's default)" } else { "" };
    ValueError::with_hint(
        format!("if={interface}{default} is not supported by flotilla"),
        "flotilla supports -drive if=virtio and if=none (with -device virtio-blk-pci,drive=ID)",
    )
}

/// QEMU's error for a `-drive` key that reached the format driver.
pub fn format_option_error(format: DriveFormat, key: &str) -> ValueError {
    let f = match format {
        DriveFormat::Raw => "raw",
        DriveFormat::Qcow2 => "qcow2",
    };
    ValueError::new(format!("Block format '{f}' does not support the option '{key}'"))
}

/// Device models QEMU has that Flotilla does not (yet) implement; anything else is unknown.
const QEMU_OTHER_DEVICES: &[&str] = &[
    "virtio-blk-device",
    "virtio-scsi-pci",
    "scsi-hd",
    "scsi-cd",
    "ide-hd",
    "ide-cd",
    "nvme",
    "e1000",
    "e1000e",
    "rtl8139",
    "virtio-rng-pci",
    "virtio-serial-pci",
    "virtconsole",
    "virtserialport",
    "virtio-gpu-pci",
    "vhost-user-gpu-pci",
    "virtio-vga",
    "VGA",
    "qxl-vga",
    "cirrus-vga",
    "virtio-tablet-pci",
    "virtio-keyboard-pci",
    "virtio-mouse-pci",
    "vhost-user-input-pci",
    "usb-tablet",
    "usb-kbd",
    "usb-ehci",
    "qemu-xhci",
    "pci-bridge",
    "pcie-root-port",
    "vhost-user-fs-pci",
    "vhost-vsock-pci",
    "virtio-iommu-pci",
    "i6300esb",
    "ivshmem-plain",
    "pvpanic",
    "virtio-balloon-device",
    "vhost-user-blk",
];
