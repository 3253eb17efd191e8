//! Per-vCPU CPUID: KVM's supported set, with the topology made consistent (one socket, `cpus`
//! cores, one thread each) and each vCPU's APIC id filled in.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_PARAMS: u32 = 4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// Topology level types in leaves 0xB/0x1F ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` cores.
fn core_shift(n: u8) -> u32 {
    (n.max(1) as u32).next_power_of_two().trailing_zeros()
}

pub fn for_vcpu(supported: &CpuId, id: u8, cpus: u8) -> CpuId {
    let mut cpuid = supported.clone();
    let shift = core_shift(cpus);
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((id as u32) << 24) | ((cpus as u32) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if cpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
                let cache_level = (e.eax >> 5) & 7;
                let sharing = if cache_level >= 3 { (1u32 << shift) - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | (((1u32 << shift) - 1) << 26);
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                e.edx = id as u32;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = shift;
                        e.ebx = cpus as u32;
                        e.ecx = (LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ..Default::default() }
    }

    #[test]
    fn apic_id_and_topology() {
        let base = CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(4, 0)]).expect("cpuid");
        let c = for_vcpu(&base, 2, 3);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 2);
        assert_eq!((s[0].ebx >> 16) & 0xff, 3);
        assert_ne!(s[0].edx & EDX_HTT, 0);
        assert_eq!(s[1].edx, 2);
        assert_eq!(s[2].ebx, 3);
        assert_eq!(s[2].eax, 2, "3 cores need 2 bits");
        assert_eq!(s[3].eax >> 26, 3);
    }
}
