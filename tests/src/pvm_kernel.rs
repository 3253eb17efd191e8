//! The kvm_pvm test kernel (`tests/kit/build-pvm-kernel.sh`: Debian's linux-source-6.12 from
//! `tinyconfig` plus `tests/kit/pvm-kernel/`), built on first use and cached by the script; this
//! module runs it once per process. Also the root disk its tests boot from: an MBR partition
//! table the host writes, one ext4 partition holding `/sbin/init`.
//!
//! That init is a few bytes of machine code that spin in user mode (`pause; jmp`) without one
//! system call: kvm_pvm cannot run a guest's system calls (../shared/LINUX-ON-KVM-PVM.md), so a
//! real init would die at once and panic the kernel; this one leaves the kernel alive and
//! working (its interrupts, timers and worker threads) after `Run /sbin/init`.

use crate::linux_kit::{printed, run_kit_script};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// A cold build: the source package (154 MB) and about 6 minutes of compiling on 2 cores.
const BUILD_TIMEOUT: Duration = Duration::from_secs(1500);

#[derive(Debug, Clone)]
pub struct PvmKernel {
    /// The ELF with a PVH entry note.
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub system_map: PathBuf,
    pub kver: String,
}

impl PvmKernel {
    /// Its System.map, read once per call.
    pub fn system_map(&self) -> Result<SystemMap, String> {
        SystemMap::read(&self.system_map)
    }
}

/// A kernel's System.map: its symbols and their addresses, sorted by address.
#[derive(Debug, Clone)]
pub struct SystemMap {
    /// (address, `nm` type letter, name).
    symbols: Vec<(u64, char, String)>,
}

impl SystemMap {
    pub fn read(path: &Path) -> Result<SystemMap, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let mut symbols: Vec<(u64, char, String)> = text
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let addr = u64::from_str_radix(w.next()?, 16).ok()?;
                let kind = w.next()?.chars().next()?;
                Some((addr, kind, w.next()?.to_string()))
            })
            .collect();
        symbols.sort();
        Ok(SystemMap { symbols })
    }

    /// A symbol's address.
    pub fn symbol(&self, name: &str) -> Result<u64, String> {
        self.symbols.iter().find(|(_, _, n)| n == name).map(|(a, _, _)| *a).ok_or(format!("no {name} in System.map"))
    }

    /// The kernel text's bounds (`_stext`, `_etext`).
    pub fn text(&self) -> Result<std::ops::Range<u64>, String> {
        Ok(self.symbol("_stext")?..self.symbol("_etext")?)
    }

    /// `symbol+0xoff` for an address within 1 MiB past a text symbol (`t`/`T`), else None.
    pub fn symbolize(&self, pc: u64) -> Option<String> {
        let i = self.symbols.partition_point(|(a, _, _)| *a <= pc);
        let (a, _, name) = self.symbols[..i].iter().rev().find(|(_, k, _)| matches!(k, 't' | 'T'))?;
        (pc - a < 0x10_0000).then(|| format!("{name}+{:#x}", pc - a))
    }
}

/// The kernel; the build script runs at most once per process.
pub fn kernel() -> Result<PvmKernel, String> {
    static KERNEL: OnceLock<Result<PvmKernel, String>> = OnceLock::new();
    KERNEL.get_or_init(build).clone()
}

fn build() -> Result<PvmKernel, String> {
    let started = std::time::Instant::now();
    let out = run_kit_script("build-pvm-kernel.sh", BUILD_TIMEOUT)?;
    let get = |key: &str| printed(&out, key);
    let k = PvmKernel {
        vmlinux: get("PVM_VMLINUX=")?.into(),
        bzimage: get("PVM_BZIMAGE=")?.into(),
        system_map: get("PVM_SYSTEM_MAP=")?.into(),
        kver: get("PVM_KVER=")?,
    };
    eprintln!("kvm_pvm test kernel {} ready in {:.1?}", k.kver, started.elapsed());
    Ok(k)
}

/// A static x86-64 ELF executable whose code is `1: pause; jmp 1b`: no system call, ever.
pub fn spinning_init() -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    const CODE_AT: u64 = 64 + 56;
    let code: [u8; 4] = [0xf3, 0x90, 0xeb, 0xfc];
    let total = CODE_AT + code.len() as u64;
    let mut e = Vec::with_capacity(total as usize);
    // ELF header.
    e.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    e.extend_from_slice(&[0; 8]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(BASE + CODE_AT).to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // program headers
    e.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    e.extend_from_slice(&0u32.to_le_bytes());
    e.extend_from_slice(&64u16.to_le_bytes());
    e.extend_from_slice(&56u16.to_le_bytes());
    e.extend_from_slice(&1u16.to_le_bytes());
    e.extend_from_slice(&64u16.to_le_bytes());
    e.extend_from_slice(&0u16.to_le_bytes());
    e.extend_from_slice(&0u16.to_le_bytes());
    // One PT_LOAD of the whole file, read + execute.
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&5u32.to_le_bytes());
    e.extend_from_slice(&0u64.to_le_bytes());
    e.extend_from_slice(&BASE.to_le_bytes());
    e.extend_from_slice(&BASE.to_le_bytes());
    e.extend_from_slice(&total.to_le_bytes());
    e.extend_from_slice(&total.to_le_bytes());
    e.extend_from_slice(&0x1000u64.to_le_bytes());
    e.extend_from_slice(&code);
    e
}

/// Where the root partition starts (the usual 1 MiB alignment) and its MBR type (Linux).
pub const PARTITION_START: u64 = 1 << 20;
const PARTITION_TYPE_LINUX: u8 = 0x83;

/// Writes a raw disk of `size` bytes at `path`: an MBR with one Linux partition from 1 MiB to
/// the end, holding an ext4 file system (mke2fs, populated from a directory) with the spinning
/// `/sbin/init` and a `/flotilla-root` marker file holding `marker`.
pub fn root_disk(path: &Path, size: u64, marker: &str) -> Result<(), String> {
    let sectors = size / 512;
    let first = PARTITION_START / 512;
    if sectors <= first + 2048 {
        return Err(format!("a root disk of {size} bytes is too small"));
    }
    let tree = path.with_extension("root");
    let _ = std::fs::remove_dir_all(&tree);
    let io = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| format!("{what}: {e}")
    };
    std::fs::create_dir_all(tree.join("sbin")).map_err(io("creating the root tree"))?;
    let init = tree.join("sbin/init");
    std::fs::write(&init, spinning_init()).map_err(io("writing /sbin/init"))?;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).map_err(io("chmod /sbin/init"))?;
    std::fs::write(tree.join("flotilla-root"), marker).map_err(io("writing the marker"))?;
    let mut f = std::fs::File::create(path).map_err(io("creating the disk"))?;
    f.set_len(size).map_err(io("sizing the disk"))?;
    let mut mbr = [0u8; 512];
    let count = u32::try_from(sectors - first).map_err(|_| "disk too big for an MBR".to_string())?;
    let entry = &mut mbr[0x1be..0x1ce];
    // CHS fields: the "beyond 8 GiB" values every LBA-aware reader ignores.
    entry[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[4] = PARTITION_TYPE_LINUX;
    entry[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[8..12].copy_from_slice(&(first as u32).to_le_bytes());
    entry[12..16].copy_from_slice(&count.to_le_bytes());
    mbr[0x1b8..0x1bc].copy_from_slice(&0x464c_4f54u32.to_le_bytes()); // disk signature "FLOT"
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    f.write_all(&mbr).map_err(io("writing the MBR"))?;
    drop(f);
    let kib = (u64::from(count) * 512) / 1024;
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-E"])
        .arg(format!("offset={PARTITION_START}"))
        .arg("-d")
        .arg(&tree)
        .arg(path)
        .arg(format!("{kib}k"))
        .output()
        .map_err(io("running mke2fs (e2fsprogs)"))?;
    let _ = std::fs::remove_dir_all(&tree);
    if !out.status.success() {
        return Err(format!("mke2fs failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_map_names_text_addresses_and_finds_symbols() {
        let dir = std::env::temp_dir().join(format!("pvm-system-map-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("System.map");
        std::fs::write(
            &path,
            "ffffffff81000000 T _stext\nffffffff81000100 t do_one\nffffffff81000180 D some_data\n\
             ffffffff81800000 T _etext\nffffffff82000000 D linux_banner\n",
        )
        .unwrap();
        let map = SystemMap::read(&path).unwrap();
        assert_eq!(map.text().unwrap(), 0xffff_ffff_8100_0000..0xffff_ffff_8180_0000);
        assert_eq!(map.symbol("linux_banner").unwrap(), 0xffff_ffff_8200_0000);
        assert!(map.symbol("nosuch").is_err());
        // The data symbol in between is skipped: the nearest text symbol names the address.
        assert_eq!(map.symbolize(0xffff_ffff_8100_01a0).as_deref(), Some("do_one+0xa0"));
        assert_eq!(map.symbolize(0x40_0078), None);
        assert_eq!(map.symbolize(0xffff_ffff_8200_0010), None, "more than 1 MiB past _etext");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
