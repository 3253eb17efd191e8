//! The host's side: fio reading and writing the image file directly with the workload's block
//! size, pattern and queue depth, O_DIRECT, io_uring: the physical limit the backends are
//! measured against.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::error::BlockError;
use super::workload::Workload;

/// fio's arguments for one timed run of `w` on `image` (`size` bytes of it).
pub fn args(w: &Workload, image: &Path, size: u64, warmup: Duration, runtime: Duration) -> Vec<String> {
    vec![
        format!("--name={}", w.key),
        format!("--filename={}", image.display()),
        format!("--size={size}"),
        format!("--rw={}", w.fio_rw()),
        format!("--bs={}", w.bs),
        format!("--iodepth={}", w.qd),
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        "--numjobs=1".into(),
        "--time_based=1".into(),
        format!("--runtime={}ms", runtime.as_millis()),
        format!("--ramp_time={}ms", warmup.as_millis()),
        // Submission-to-completion percentiles, as the bench frontend measures them.
        "--lat_percentiles=1".into(),
        "--percentile_list=50:99".into(),
        // Random offsets may repeat, as the frontend's do, and differ from run to run.
        "--norandommap=1".into(),
        "--randrepeat=0".into(),
        "--output-format=json".into(),
    ]
}

/// What one fio run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FioResult {
    pub iops: f64,
    pub bytes_per_s: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub errors: u64,
    /// fio's own CPU use (user + system), percent of one CPU.
    pub cpu_percent: Option<f64>,
}

fn percentile(section: &Value, key: &str, want: &str) -> Option<f64> {
    let p = section.get(key)?.get("percentile")?.as_object()?;
    // fio writes "50.000000"; match on the number, not the spelling.
    p.iter().find(|(k, _)| k.parse::<f64>().ok() == want.parse::<f64>().ok()).and_then(|(_, v)| v.as_f64())
}

/// Reads fio's `--output-format=json` for the one job and the direction `w` uses. fio may
/// print warnings before the JSON; they are skipped.
pub fn parse(output: &str, w: &Workload) -> Result<FioResult, BlockError> {
    let start = output.find('{').ok_or_else(|| BlockError::Fio(format!("no JSON in its output: {output:.200}")))?;
    let v: Value = serde_json::from_str(&output[start..]).map_err(|e| BlockError::Fio(format!("bad JSON: {e}")))?;
    let job = v
        .get("jobs")
        .and_then(|j| j.as_array())
        .and_then(|j| j.first())
        .ok_or_else(|| BlockError::Fio("no jobs in the report".into()))?;
    let dir = match w.op {
        super::request::Op::Read => "read",
        super::request::Op::Write => "write",
    };
    let s = job.get(dir).ok_or_else(|| BlockError::Fio(format!("no '{dir}' section")))?;
    let num = |k: &str| s.get(k).and_then(Value::as_f64).ok_or_else(|| BlockError::Fio(format!("no {dir}.{k}")));
    let ns_to_us = |v: f64| v / 1000.0;
    // lat_ns with --lat_percentiles; clat_ns from fio versions that ignore it.
    let p = |want| percentile(s, "lat_ns", want).or_else(|| percentile(s, "clat_ns", want)).map(ns_to_us);
    Ok(FioResult {
        iops: num("iops")?,
        bytes_per_s: num("bw_bytes")?,
        p50_us: p("50"),
        p99_us: p("99"),
        errors: job.get("error").and_then(Value::as_u64).unwrap_or(0),
        cpu_percent: ["usr_cpu", "sys_cpu"].iter().map(|k| job.get(*k).and_then(Value::as_f64)).sum(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::workload::WORKLOADS;

    // Trimmed from fio 3.33's JSON for a randread job (the fields the bench reads, and some
    // it does not), with a warning line before it as fio prints them.
    const SAMPLE: &str = r#"fio: io_uring: warning
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "randread-4k-qd1",
      "error" : 0,
      "read" : {
        "io_bytes" : 412123136,
        "bw_bytes" : 82421350,
        "iops" : 20122.4,
        "clat_ns" : { "min" : 100, "mean" : 48000.0 },
        "lat_ns" : {
          "min" : 30000,
          "percentile" : { "50.000000" : 47104, "99.000000" : 90624 }
        }
      },
      "write" : { "iops" : 0.000000, "bw_bytes" : 0 }
    }
  ]
}"#;

    #[test]
    fn parses_iops_bandwidth_and_latency() {
        let r = parse(SAMPLE, &WORKLOADS[0]).unwrap();
        assert_eq!(r.iops, 20122.4);
        assert_eq!(r.bytes_per_s, 82421350.0);
        assert_eq!(r.p50_us, Some(47.104));
        assert_eq!(r.p99_us, Some(90.624));
        assert_eq!(r.errors, 0);
        let w = parse(SAMPLE, &WORKLOADS[2]).unwrap();
        assert_eq!((w.iops, w.p50_us), (0.0, None));
    }

    #[test]
    fn falls_back_to_completion_latency() {
        let s = SAMPLE
            .replace("\"lat_ns\"", "\"clat_ns_x\"")
            .replace("\"clat_ns\"", "\"lat_other\"")
            .replace("clat_ns_x", "clat_ns");
        let r = parse(&s, &WORKLOADS[0]).unwrap();
        assert_eq!(r.p99_us, Some(90.624));
    }

    #[test]
    fn bad_output_is_an_error() {
        assert!(parse("fio: cannot open file", &WORKLOADS[0]).is_err());
        assert!(parse("{\"jobs\": []}", &WORKLOADS[0]).is_err());
        assert!(parse("{\"jobs\": [{\"read\": {}}]}", &WORKLOADS[0]).is_err());
        assert!(parse("{ not json", &WORKLOADS[0]).is_err());
    }

    #[test]
    fn arguments_name_the_workload() {
        let a = args(&WORKLOADS[1], Path::new("/x/img"), 1 << 30, Duration::from_secs(1), Duration::from_millis(2500));
        for want in [
            "--rw=randread",
            "--bs=4096",
            "--iodepth=32",
            "--direct=1",
            "--ioengine=io_uring",
            "--filename=/x/img",
            "--size=1073741824",
            "--runtime=2500ms",
            "--ramp_time=1000ms",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} missing from {a:?}");
        }
    }
}
