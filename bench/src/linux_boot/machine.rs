//! The machines compared and their command lines: the same kernel (the PVH vmlinux), command
//! line, memory, vCPUs, root disk (through a block device) and balloon everywhere; what differs
//! is the VMM, the machine type and the bus the two devices sit on.

use std::path::{Path, PathBuf};

use crate::vmproc::Spec;

/// The kernel command line every machine gets (the test kernel's own boot options are built
/// in: CONFIG_CMDLINE, which a boot loader's line is appended to).
pub const CMDLINE: &str = "console=ttyS0 root=/dev/vda1 rootwait";
pub const MEM_MIB: u32 = 512;
pub const CPUS: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    VmmCore,
    Microvm,
    MicrovmPcie,
    Q35,
}

impl Machine {
    pub const ALL: [Machine; 4] = [Machine::VmmCore, Machine::Microvm, Machine::MicrovmPcie, Machine::Q35];
    pub const DEFAULT: [Machine; 3] = [Machine::VmmCore, Machine::Microvm, Machine::Q35];

    pub fn key(self) -> &'static str {
        match self {
            Machine::VmmCore => "vmm-core",
            Machine::Microvm => "microvm",
            Machine::MicrovmPcie => "microvm-pcie",
            Machine::Q35 => "q35",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Machine::VmmCore => {
                "flotilla launcher -> vmm-core (-M q35), virtio-blk-pci through blockd (vhost-user), \
                 virtio-balloon-pci through balloond; vmm-core loads the vmlinux through its PVH note"
            }
            Machine::Microvm => {
                "QEMU -accel kvm -M microvm,acpi=on,rtc=on (qboot), virtio-mmio: virtio-blk-device, \
                 virtio-balloon-device (found through the DSDT); the vmlinux through its PVH note"
            }
            Machine::MicrovmPcie => {
                "QEMU -accel kvm -M microvm,acpi=on,rtc=on,pcie=on (qboot), virtio-blk-pci, \
                 virtio-balloon-pci on the GPEX host bridge; the vmlinux through its PVH note"
            }
            Machine::Q35 => {
                "QEMU -accel kvm -M q35 (SeaBIOS, fw_cfg + pvh.bin option ROM), virtio-blk-pci, \
                 virtio-balloon-pci; the vmlinux through its PVH note"
            }
        }
    }

    pub fn is_qemu(self) -> bool {
        self != Machine::VmmCore
    }

    fn machine_args(self) -> [&'static str; 4] {
        match self {
            Machine::VmmCore => ["-enable-kvm", "", "-M", "q35"],
            Machine::Microvm => ["-accel", "kvm", "-M", "microvm,acpi=on,rtc=on"],
            Machine::MicrovmPcie => ["-accel", "kvm", "-M", "microvm,acpi=on,rtc=on,pcie=on"],
            Machine::Q35 => ["-accel", "kvm", "-M", "q35"],
        }
    }

    /// The block and balloon devices: PCI everywhere but on plain microvm (virtio-mmio).
    fn device_models(self) -> (&'static str, &'static str) {
        match self {
            Machine::Microvm => ("virtio-blk-device", "virtio-balloon-device"),
            _ => ("virtio-blk-pci", "virtio-balloon-pci"),
        }
    }
}

/// The machine's command line: `program` is the flotilla launcher or qemu-system-x86_64.
pub fn spec(m: Machine, program: &Path, vmlinux: &Path, disk: &Path) -> Spec {
    let (blk, balloon) = m.device_models();
    let mut args: Vec<String> = m.machine_args().iter().filter(|a| !a.is_empty()).map(|a| a.to_string()).collect();
    let mem = MEM_MIB.to_string();
    let cpus = CPUS.to_string();
    let drive = format!("file={},if=none,format=raw,id=disk0", disk.display());
    let blk = format!("{blk},drive=disk0");
    let balloon = format!("{balloon},id=balloon0");
    for a in [
        "-m",
        &mem,
        "-smp",
        &cpus,
        "-kernel",
        &vmlinux.display().to_string(),
        "-append",
        CMDLINE,
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-nodefaults",
        "-drive",
        &drive,
        "-device",
        &blk,
        "-device",
        &balloon,
    ] {
        args.push(a.to_string());
    }
    // vmm-core and its daemons say only what goes wrong (their stderr is kept for the report).
    let env = if m.is_qemu() { vec![] } else { vec![("RUST_LOG".to_string(), "warn".to_string())] };
    Spec { label: m.key().to_string(), program: PathBuf::from(program), args, env }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_machine_gets_the_same_guest() {
        for m in Machine::ALL {
            let s = spec(m, Path::new("/bin/vmm"), Path::new("/k/vmlinux"), Path::new("/d/root.raw"));
            let a = s.args.join(" ");
            for want in [
                "-m 512 -smp 2 -kernel /k/vmlinux -append console=ttyS0 root=/dev/vda1 rootwait",
                "-serial stdio",
                "-drive file=/d/root.raw,if=none,format=raw,id=disk0",
                "-device virtio-blk-",
                "drive=disk0",
                "-device virtio-balloon-",
            ] {
                assert!(a.contains(want), "{}: {a} lacks {want}", m.key());
            }
            assert_eq!(s.args.iter().filter(|x| *x == CMDLINE).count(), 1);
        }
        let a = |m| spec(m, Path::new("q"), Path::new("k"), Path::new("d")).args.join(" ");
        assert!(
            a(Machine::Microvm).contains("-M microvm,acpi=on,rtc=on -m")
                && a(Machine::Microvm).contains("virtio-blk-device")
        );
        assert!(
            a(Machine::MicrovmPcie).contains("pcie=on")
                && a(Machine::MicrovmPcie).contains("virtio-blk-pci,drive=disk0")
        );
        assert!(a(Machine::VmmCore).starts_with("-enable-kvm -M q35 -m"));
        assert!(a(Machine::Q35).starts_with("-accel kvm -M q35 -m"));
    }
}
