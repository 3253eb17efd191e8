//! The boot vCPU's initial state for each [`BootEntry`]: segment registers, GDT, page tables for
//! the 64-bit entry, FPU, the MSRs the boot protocols expect and the LAPIC's LINT pins.

use crate::boot::BootEntry;
use crate::layout;
use crate::memory::GuestMemory;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, Msrs, kvm_msr_entry};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("{0}: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("writing boot tables to guest memory: {0}")]
    Memory(String),
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// GDT: null, 64-bit code (0x08), 32-bit code (0x10), data (0x18), TSS (0x20).
fn gdt() -> [u64; 5] {
    [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x0000_8b00_0000_0067,
    ]
}

fn segment(entry: u64, index: u16) -> kvm_segment {
    let limit_raw = (entry & 0xffff) | ((entry >> 32) & 0xf_0000);
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base: 0,
        limit: if g == 1 { ((limit_raw as u32) << 12) | 0xfff } else { limit_raw as u32 },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn write_gdt(mem: &GuestMemory) -> Result<(), RegsError> {
    for (i, e) in gdt().iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::BOOT_GDT_START + i as u64 * 8))
            .map_err(|e| RegsError::Memory(e.to_string()))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START)).map_err(|e| RegsError::Memory(e.to_string()))
}

/// Identity map of the first GiB with 2 MiB pages, for the 64-bit Linux entry.
fn write_page_tables(mem: &GuestMemory) -> Result<(), RegsError> {
    let w = |v: u64, a: u64| mem.write_obj(v, GuestAddress(a)).map_err(|e| RegsError::Memory(e.to_string()));
    w(layout::PDPTE_START | 0x03, layout::PML4_START)?;
    w(layout::PDE_START | 0x03, layout::PDPTE_START)?;
    for i in 0..512u64 {
        w((i << 21) | 0x83, layout::PDE_START + i * 8)?;
    }
    Ok(())
}

/// Puts `vcpu` (the boot CPU) in the state `entry` requires.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, mem: &GuestMemory, entry: BootEntry) -> Result<(), RegsError> {
    write_gdt(mem)?;
    let table = gdt();
    let mut sregs = vcpu.get_sregs().map_err(|e| RegsError::Kvm("KVM_GET_SREGS", e))?;
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 0;
    sregs.tr = segment(table[4], 4);
    let mut regs = kvm_regs { rflags: 0x2, ..Default::default() };
    match entry {
        BootEntry::Pvh { entry, start_info } => {
            let data = segment(table[3], 3);
            set_segments(&mut sregs, segment(table[2], 2), data);
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = start_info;
        }
        BootEntry::Linux64 { entry, zero_page } => {
            write_page_tables(mem)?;
            let data = segment(table[3], 3);
            set_segments(&mut sregs, segment(table[1], 1), data);
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsi = zero_page;
            regs.rsp = layout::BOOT_STACK_POINTER;
            regs.rbp = layout::BOOT_STACK_POINTER;
        }
    }
    vcpu.set_sregs(&sregs).map_err(|e| RegsError::Kvm("KVM_SET_SREGS", e))?;
    vcpu.set_regs(&regs).map_err(|e| RegsError::Kvm("KVM_SET_REGS", e))?;
    setup_fpu_msrs_lapic(vcpu)
}

fn set_segments(sregs: &mut kvm_sregs, code: kvm_segment, data: kvm_segment) {
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
}

/// FPU, MSRs and LAPIC LINT pins: needed on every vCPU.
pub fn setup_fpu_msrs_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(|e| RegsError::Kvm("KVM_SET_FPU", e))?;
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_MISC_ENABLE,
        data: MISC_ENABLE_FAST_STRING,
        ..Default::default()
    }])
    .map_err(|_| RegsError::Memory("MSR list".into()))?;
    vcpu.set_msrs(&msrs).map_err(|e| RegsError::Kvm("KVM_SET_MSRS", e))?;
    setup_lint(vcpu)
}

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// LINT0 = ExtINT (the 8259 behind it), LINT1 = NMI, as a PC's firmware leaves them.
fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(|e| RegsError::Kvm("KVM_GET_LAPIC", e))?;
    let regs = &mut lapic.regs;
    let mut set = |off: usize, mode: u32| {
        let bytes: Vec<u8> = regs[off..off + 4].iter().map(|b| *b as u8).collect();
        let v = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as _;
        }
    };
    set(APIC_LVT_LINT0, APIC_MODE_EXTINT);
    set(APIC_LVT_LINT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(|e| RegsError::Kvm("KVM_SET_LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode() {
        let t = gdt();
        let cs64 = segment(t[1], 1);
        assert_eq!((cs64.l, cs64.db, cs64.type_, cs64.selector), (1, 0, 0xb, 0x08));
        let cs32 = segment(t[2], 2);
        assert_eq!((cs32.l, cs32.db, cs32.limit, cs32.g), (0, 1, 0xffff_ffff, 1));
        let tss = segment(t[4], 4);
        assert_eq!((tss.s, tss.type_, tss.limit), (0, 0xb, 0x67));
    }
}
