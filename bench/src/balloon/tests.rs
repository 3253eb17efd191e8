//! Unit tests of the balloon part's parsing and arithmetic.

use std::time::Duration;

use super::hostmem::{distinct_allocated, parse_rollup, Rollup, Snapshot};
use super::report::{self, derive, freed_mib, medians, share};
use super::round::{field_u64, Plan, Sample};
use super::{parse_args, Options};

const ROLLUP: &str = "\
5591c8a4d000-7ffd3b9f1000 ---p 00000000 00:00 0                          [rollup]
Rss:             1153740 kB
Pss:             1150123 kB
Pss_Dirty:       1149000 kB
Pss_Anon:           5120 kB
Pss_File:           3000 kB
Pss_Shmem:       1142003 kB
Shared_Clean:       2000 kB
Shared_Dirty:          0 kB
Private_Clean:      1000 kB
Private_Dirty:   1150740 kB
Referenced:      1153740 kB
Anonymous:          5120 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                 12 kB
SwapPss:              12 kB
Locked:                0 kB
";

#[test]
fn smaps_rollup_fields() {
    let r = parse_rollup(ROLLUP).unwrap();
    assert_eq!(
        r,
        Rollup { rss_kib: 1153740, pss_kib: 1150123, anonymous_kib: 5120, pss_shmem_kib: 1142003, swap_kib: 12 }
    );
    // Older kernels have no Pss_* lines: those figures stay 0.
    let old = "00400000-7fff00000000 ---p 00000000 00:00 0 [rollup]\nRss: 10 kB\nPss: 7 kB\n";
    assert_eq!(parse_rollup(old).unwrap(), Rollup { rss_kib: 10, pss_kib: 7, ..Default::default() });
}

#[test]
fn smaps_rollup_rejects_garbage() {
    assert!(parse_rollup("").unwrap_err().contains("no Rss"), "an empty file has no Rss");
    assert!(parse_rollup("Rss: lots\n").is_err());
    assert!(parse_rollup("Rss: 10 MB\n").is_err());
    assert!(parse_rollup("Rss: 10 kB extra\n").is_err());
    assert!(parse_rollup("Rss 10 kB\n").unwrap_err().contains("line 1"));
    // Unknown keys are fine, whatever their value.
    assert_eq!(parse_rollup("Rss: 1 kB\nVmFlags: rd wr\n").unwrap().rss_kib, 1);
}

#[test]
fn a_memfd_open_in_two_processes_counts_once() {
    let gib = 1u64 << 30;
    // vmm-core and balloond hold the same guest-RAM memfd; a second memfd is another file.
    assert_eq!(distinct_allocated(&[(1, 42, gib), (1, 42, gib), (1, 43, 4096)]), gib + 4096);
    // Same inode on another device is another file.
    assert_eq!(distinct_allocated(&[(1, 42, 8192), (2, 42, 8192)]), 16384);
    assert_eq!(distinct_allocated(&[]), 0);
}

#[test]
fn freed_and_share() {
    assert_eq!(freed_mib(2048 * 1024, 1024 * 1024), 1024.0);
    assert_eq!(freed_mib(1024, 2048), -1.0, "memory that grew is a negative freed figure");
    assert_eq!(share(1024.0, 1024), 1.0);
    assert_eq!(share(512.0, 1024), 0.5);
    assert_eq!(share(512.0, 0), 0.0);
}

fn snapshot(rss_kib: u64, anonymous_kib: u64, memfd_bytes: u64) -> Snapshot {
    Snapshot {
        processes: Vec::new(),
        total: Rollup { rss_kib, pss_kib: rss_kib, anonymous_kib, ..Default::default() },
        memfd_bytes,
    }
}

fn sample(ballooned_ms: f64, before_kib: u64, after_kib: u64) -> Sample {
    Sample {
        command_ms: 0.5,
        ballooned_ms,
        event_ms: ballooned_ms + 1.0,
        events: 1,
        touch_ms: 100.0,
        deflate_ms: 50.0,
        touchcheck: "TOUCHCHECK ok checked=1 zero=1".into(),
        touchcheck_ms: 10.0,
        before: snapshot(before_kib, before_kib, before_kib * 1024),
        after: snapshot(after_kib, after_kib, after_kib * 1024),
    }
}

#[test]
fn derived_figures_and_medians() {
    let mib = 1024; // KiB
    let d = derive(&sample(300.0, 1200 * mib, 200 * mib), 1024);
    assert_eq!(d.freed_rss_mib, 1000.0);
    assert_eq!(d.freed_memfd_mib, 1000.0);
    assert_eq!(d.freed_anon_mib, 1000.0);
    assert!((d.share - 1000.0 / 1024.0).abs() < 1e-12);
    assert_eq!(d.reclaim_ms, 300.0);
    assert_eq!(d.event_ms, 301.0);

    let rounds: Vec<_> = [(500.0, 900), (100.0, 1024), (300.0, 1000)]
        .iter()
        .map(|&(ms, freed)| derive(&sample(ms, 1200 * mib, (1200 - freed) * mib), 1024))
        .collect();
    let m = medians(&rounds).unwrap();
    assert_eq!((m.n, m.reclaim_ms, m.freed_rss_mib), (3, 300.0, 1000.0));
    assert!(medians(&[]).is_none());
}

#[test]
fn ratios_in_the_json_are_flotilla_over_qemu() {
    let mib = 1024;
    let plan = Options::default().plan;
    let side = |key, ms, freed: u64| report::SideResults {
        key,
        label: key.into(),
        argv: vec![],
        samples: vec![sample(ms, 1200 * mib, (1200 - freed) * mib)],
        failures: vec![],
    };
    let j = report::to_json(serde_json::json!({}), &plan, &[side("flotilla", 200.0, 1024), side("qemu", 400.0, 512)]);
    let r = &j["ratios_flotilla_over_qemu"];
    assert_eq!(r["reclaim_ms"], 0.5);
    assert_eq!(r["freed_rss_mib"], 2.0);
    assert_eq!(r["share_of_reclaim"], 2.0);
    assert_eq!(j["sides"]["qemu"]["median"]["share_of_reclaim"], 0.5);
    assert_eq!(j["plan"]["target_bytes"], 256u64 << 20);
    assert_eq!(j["plan"]["reclaim_pages"], 262144);
    // A side with no successful round has no median and no ratio.
    let mut q = side("qemu", 1.0, 1);
    q.samples.clear();
    q.failures.push("round 1: boom".into());
    let j = report::to_json(serde_json::json!({}), &plan, &[side("flotilla", 1.0, 1), q]);
    assert!(j["ratios_flotilla_over_qemu"]["reclaim_ms"].is_null());
    assert!(j["sides"]["qemu"]["median"].is_null());
    assert!(report::table(&plan, &[]).contains("reclaim 1024 MiB of a 1280 MiB guest"));
}

#[test]
fn guest_line_fields() {
    assert_eq!(field_u64("BALLOONED actual=262144", "actual"), Some(262144));
    assert_eq!(field_u64("BALLOON 00:03.0 num_pages=0 actual=0 features=0x1", "num_pages"), Some(0));
    assert_eq!(field_u64("BALLOONED actual=x", "actual"), None);
    assert_eq!(field_u64("BALLOONED", "actual"), None);
}

#[test]
fn plan_targets() {
    let p = Plan {
        mem_mib: 1280,
        touch_mib: 1100,
        reclaim_mib: 1024,
        timeout: Duration::from_secs(1),
        balloon_timeout: Duration::from_secs(1),
        walk_timeout: Duration::from_secs(1),
    };
    assert_eq!(p.target_bytes(), 256 << 20);
    assert_eq!(p.reclaim_pages(), 262144);
}

#[test]
fn arguments() {
    let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
    let o = parse_args(&[]).unwrap().unwrap();
    assert_eq!(o, Options::default());
    assert_eq!((o.rounds, o.plan.mem_mib, o.plan.reclaim_mib, o.plan.touch_mib), (3, 1280, 1024, 1100));
    let o =
        parse_args(&args("--rounds 5 --json --mem 512 --reclaim 256 --touch 300 --qemu-accel tcg")).unwrap().unwrap();
    assert_eq!((o.rounds, o.json, o.plan.mem_mib, o.plan.reclaim_mib, o.plan.touch_mib), (5, true, 512, 256, 300));
    assert_eq!(o.qemu_accel, "tcg");
    assert!(parse_args(&args("--help")).unwrap().is_none());
    for bad in [
        "--rounds 0",
        "--rounds",
        "--qemu-accel hvf",
        "--frobnicate",
        "--reclaim 1250",
        "--touch 1000",
        "--touch 1270",
        "--mem 32",
    ] {
        assert!(matches!(parse_args(&args(bad)), Err(crate::error::BenchError::Usage(_))), "{bad}");
    }
}
