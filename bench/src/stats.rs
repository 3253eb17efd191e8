//! Summary statistics over a run's samples: median and p90 are what the report quotes.
//!
//! Conventions (so a reader can recompute them from the samples in the JSON):
//! - median: the middle sample of the sorted set, or the mean of the two middle ones when the
//!   count is even;
//! - p90: nearest rank, the sample at rank `ceil(0.9 * n)` (1-based) of the sorted set, so it is
//!   always one of the measured values (with 10 samples, the 9th smallest).
//! - latency series ([`latency`]): p50, p90, p99 by the same nearest rank (p50 of 2000 samples
//!   is the 1000th smallest), so each is a measured round trip.

use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub p90: f64,
    pub max: f64,
    pub mean: f64,
}

/// Summarises `samples`; `None` when there are none (or one is not a number).
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    if samples.is_empty() || samples.iter().any(|s| s.is_nan()) {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
    Some(Summary {
        n,
        min: s[0],
        median,
        p90: s[nearest_rank(n, 90) - 1],
        max: s[n - 1],
        mean: s.iter().sum::<f64>() / n as f64,
    })
}

/// The 1-based nearest rank of the `pct`th percentile among `n` sorted samples (n > 0).
fn nearest_rank(n: usize, pct: usize) -> usize {
    (pct * n).div_ceil(100).clamp(1, n)
}

/// A latency series (any unit; the report uses microseconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// Summarises a latency series; `None` when empty (or one sample is not a number).
pub fn latency(samples: &[f64]) -> Option<Latency> {
    if samples.is_empty() || samples.iter().any(|s| s.is_nan()) {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let at = |pct| s[nearest_rank(n, pct) - 1];
    Some(Latency {
        n,
        min: s[0],
        p50: at(50),
        p90: at(90),
        p99: at(99),
        max: s[n - 1],
        mean: s.iter().sum::<f64>() / n as f64,
    })
}

impl Latency {
    pub fn to_json(self, places: i32) -> Value {
        json!({
            "n": self.n,
            "p50": round(self.p50, places),
            "p90": round(self.p90, places),
            "p99": round(self.p99, places),
            "min": round(self.min, places),
            "max": round(self.max, places),
            "mean": round(self.mean, places),
        })
    }
}

/// The median of some values (`None` when there are none).
pub fn median(values: &[f64]) -> Option<f64> {
    summarize(values).map(|s| s.median)
}

/// `a / b`, or `None` when `b` is zero (a ratio the report cannot state).
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b != 0.0 && a.is_finite() && b.is_finite()).then(|| a / b)
}

/// Rounds for the report (milliseconds to the microsecond, ratios to 4 places).
pub fn round(v: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (v * f).round() / f
}

impl Summary {
    /// The summary plus the raw samples, as the JSON report carries them.
    pub fn to_json(self, samples: &[f64], places: i32) -> Value {
        json!({
            "n": self.n,
            "median": round(self.median, places),
            "p90": round(self.p90, places),
            "min": round(self.min, places),
            "max": round(self.max, places),
            "mean": round(self.mean, places),
            "samples": samples.iter().map(|s| round(*s, places)).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_count_median_is_the_middle_sample() {
        let s = summarize(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!(s.median, 3.0);
        assert_eq!(s.min, 1.0);
        assert_eq!(s.max, 5.0);
        assert_eq!(s.mean, 3.0);
        assert_eq!(s.n, 3);
    }

    #[test]
    fn even_count_median_averages_the_two_middle_samples() {
        assert_eq!(summarize(&[4.0, 1.0, 3.0, 2.0]).unwrap().median, 2.5);
    }

    #[test]
    fn p90_is_nearest_rank() {
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(summarize(&ten).unwrap().p90, 9.0);
        let eleven: Vec<f64> = (1..=11).map(f64::from).collect();
        assert_eq!(summarize(&eleven).unwrap().p90, 10.0); // ceil(9.9) = 10
        assert_eq!(summarize(&[7.0]).unwrap().p90, 7.0);
        assert_eq!(summarize(&[1.0, 2.0]).unwrap().p90, 2.0);
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(summarize(&hundred).unwrap().p90, 90.0);
    }

    #[test]
    fn unsorted_input_is_not_reordered_in_place_and_order_does_not_matter() {
        let a = [3.0, 9.0, 1.0, 7.0, 5.0];
        let b = [9.0, 7.0, 5.0, 3.0, 1.0];
        assert_eq!(summarize(&a), summarize(&b));
        assert_eq!(a, [3.0, 9.0, 1.0, 7.0, 5.0]);
    }

    #[test]
    fn nothing_to_summarise() {
        assert_eq!(summarize(&[]), None);
        assert_eq!(summarize(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn latency_percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=2000).rev().map(f64::from).collect();
        let l = latency(&v).unwrap();
        assert_eq!((l.n, l.p50, l.p90, l.p99, l.min, l.max), (2000, 1000.0, 1800.0, 1980.0, 1.0, 2000.0));
        assert_eq!(l.mean, 1000.5);
        let l = latency(&[3.0]).unwrap();
        assert_eq!((l.p50, l.p99), (3.0, 3.0));
        // 10 samples: p99 is the largest, p50 the 5th.
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        let l = latency(&ten).unwrap();
        assert_eq!((l.p50, l.p99), (5.0, 10.0));
        assert_eq!(latency(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(latency(&ten).unwrap().to_json(1)["p90"], 9.0);
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(1.0, 4.0), Some(0.25));
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(round(0.123456, 4), 0.1235);
    }

    #[test]
    fn json_carries_rounded_samples() {
        let s = [1.00049, 2.0];
        let v = summarize(&s).unwrap().to_json(&s, 3);
        assert_eq!(v["n"], 2);
        assert_eq!(v["median"], 1.5);
        assert_eq!(v["samples"][0], 1.0);
    }
}
