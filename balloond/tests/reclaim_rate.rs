//! How fast the backend gives guest RAM back, and how much of it really leaves: a memfd guest
//! RAM (BALLOOND_RATE_MIB, default 1024 MiB) is touched, then freed the way a Linux guest
//! inflates (buffers of 256 PFNs, in the reverse order the buddy allocator tends to give
//! pages) and, separately, as a worst case (every other page, so no two PFNs are
//! contiguous). Figures printed; run with `cargo test -p balloond --release --test
//! reclaim_rate -- --ignored --nocapture` (ignored by default: it touches 1 GiB).

use std::fs::File;
use std::os::fd::FromRawFd;
use std::time::Instant;

use balloond::reclaim::{allocated_bytes, discard_pfns};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

const PAGE: u64 = 4096;

fn guest(bytes: u64) -> (GuestMemoryMmap, File) {
    // SAFETY: memfd_create with a NUL-terminated name; the descriptor is owned below.
    let fd = unsafe { libc::memfd_create(c"balloond-rate".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: just created, owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(bytes).unwrap();
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        bytes as usize,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    // Touch every page (fallocate would not make them resident in the page tables; a guest
    // that used its RAM has written it).
    let chunk = vec![0x5au8; 1 << 20];
    for off in (0..bytes).step_by(chunk.len()) {
        vm_memory::Bytes::write_slice(&mem, &chunk, GuestAddress(off)).unwrap();
    }
    (mem, file)
}

fn run(name: &str, bytes: u64, pfns: Vec<u32>) {
    let (mem, file) = guest(bytes);
    let before = allocated_bytes(&file).unwrap();
    let asked = pfns.len() as u64 * PAGE;
    let t = Instant::now();
    let mut freed = 0;
    for batch in pfns.chunks(256) {
        freed += discard_pfns(&mem, batch).freed;
    }
    let secs = t.elapsed().as_secs_f64();
    let dropped = before - allocated_bytes(&file).unwrap();
    println!(
        "{name}: {} MiB asked in {} buffers of 256 PFNs: {:.1} ms ({:.0} MiB/s), {} pages punched, memfd allocation dropped {} MiB ({:.1}% of what was asked)",
        asked >> 20,
        pfns.len().div_ceil(256),
        secs * 1e3,
        (asked >> 20) as f64 / secs,
        freed,
        dropped >> 20,
        dropped as f64 * 100.0 / asked as f64
    );
    assert_eq!(dropped, asked);
}

#[test]
#[ignore = "touches 1 GiB; a measurement, run by hand"]
fn reclaim_rate() {
    let mib: u64 = std::env::var("BALLOOND_RATE_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let bytes = mib << 20;
    let pages = (bytes / PAGE) as u32;
    run("linux-like (descending runs)", bytes, (0..pages).rev().collect());
    run("scattered (every other page)", bytes, (0..pages).step_by(2).collect());
}
