//! Rate limiting for log lines a guest can trigger at will (hostile PFN lists, malformed
//! chains): at most `burst` lines per window; what is held back is counted and reported with
//! the first line of the next window, so nothing goes unnoticed and nothing floods the log.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct RateLimit {
    burst: u32,
    window: Duration,
    state: Mutex<State>,
}

struct State {
    window_start: Option<Instant>,
    emitted: u32,
    suppressed: u64,
}

impl RateLimit {
    pub const fn new(burst: u32, window: Duration) -> RateLimit {
        RateLimit { burst, window, state: Mutex::new(State { window_start: None, emitted: 0, suppressed: 0 }) }
    }

    /// Whether a line may be logged now. `Some(n)`: yes, and `n` lines were held back since the
    /// last one logged (say so in the line); `None`: hold this one back.
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let expired = s.window_start.is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if expired {
            s.window_start = Some(now);
            s.emitted = 0;
        }
        if s.emitted < self.burst {
            s.emitted += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_holds_back_and_reports_the_count() {
        let rl = RateLimit::new(2, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(rl.check_at(t0), Some(0));
        assert_eq!(rl.check_at(t0), Some(0));
        assert_eq!(rl.check_at(t0), None);
        assert_eq!(rl.check_at(t0 + Duration::from_millis(500)), None);
        // Next window: the two held back are reported once.
        assert_eq!(rl.check_at(t0 + Duration::from_secs(1)), Some(2));
        assert_eq!(rl.check_at(t0 + Duration::from_secs(1)), Some(0));
    }
}
