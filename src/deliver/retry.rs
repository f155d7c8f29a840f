//! When to try a failed notification again.
//!
//! Attempt 1 is immediate; after the n-th failure the n-th delay of the schedule applies, with
//! ±20 % jitter so that notifications that failed together (an endpoint outage) do not all come
//! back together. A `Retry-After` from a 429/503 replaces the scheduled delay. When the schedule
//! is exhausted the notification is parked as dead.
//!
//! ```text
//! attempt 1 ─5s─ 2 ─5m─ 3 ─30m─ 4 ─2h─ 5 ─5h─ 6 ─10h─ 7 ─14h─ 8 ─20h─ 9 ─24h─ 10 → dead
//! ```

use std::time::{Duration, SystemTime};

/// Jitter is uniform in [1 - JITTER, 1 + JITTER) times the scheduled delay.
const JITTER: f64 = 0.2;

/// A `Retry-After: 0` (or a date in the past) must not turn into a tight retry loop.
const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);
/// A Retry-After is honoured up to this long, or up to the schedule's largest delay if that
/// is longer: an endpoint cannot park a notification indefinitely.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Delays after each failed attempt; attempt 1 is immediate. Default: 5s, 5m, 30m, 2h, 5h, 10h,
/// 14h, 20h, 24h (so 10 attempts in all).
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySchedule {
    delays: Vec<Duration>,
}

impl RetrySchedule {
    pub fn new(delays: Vec<Duration>) -> Self {
        RetrySchedule { delays }
    }

    /// The default schedule of the design: about three days from first to last attempt.
    pub fn standard() -> Self {
        const MIN: u64 = 60;
        const HOUR: u64 = 60 * MIN;
        RetrySchedule::new(
            [
                5,
                5 * MIN,
                30 * MIN,
                2 * HOUR,
                5 * HOUR,
                10 * HOUR,
                14 * HOUR,
                20 * HOUR,
                24 * HOUR,
            ]
            .into_iter()
            .map(Duration::from_secs)
            .collect(),
        )
    }

    pub fn delays(&self) -> &[Duration] {
        &self.delays
    }

    /// The first attempt plus one retry per delay.
    pub fn max_attempts(&self) -> u32 {
        u32::try_from(self.delays.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1)
    }

    /// Delay before the next attempt after `failed_attempts` failures, or `None` when the
    /// schedule is exhausted (the notification is dead). Zero failures means the first attempt,
    /// which is immediate.
    ///
    /// `retry_after` (from a 429/503) replaces the scheduled delay, clamped to
    /// [1 s, the larger of 1 h and the schedule's largest delay], and is not jittered: the
    /// endpoint asked for a time, and jitter could make us come back before it. An empty
    /// schedule means no retries, whatever `retry_after` says.
    pub fn next_delay(
        &self,
        failed_attempts: u32,
        retry_after: Option<Duration>,
    ) -> Option<Duration> {
        let Some(index) = failed_attempts.checked_sub(1) else {
            return Some(Duration::ZERO);
        };
        let scheduled = *self.delays.get(usize::try_from(index).ok()?)?;
        match retry_after {
            Some(requested) => {
                // The schedule is not empty here, so there is a largest delay.
                let longest = self.delays.iter().max().copied().unwrap_or(scheduled);
                Some(
                    requested
                        .max(MIN_RETRY_AFTER)
                        .min(longest.max(MAX_RETRY_AFTER)),
                )
            }
            None => Some(jittered(scheduled)),
        }
    }
}

impl Default for RetrySchedule {
    fn default() -> Self {
        RetrySchedule::standard()
    }
}

fn jittered(delay: Duration) -> Duration {
    let factor = 1.0 - JITTER + 2.0 * JITTER * fastrand::f64();
    // Delays come from configuration: one near Duration::MAX would overflow, and an overflowing
    // Duration::mul_f64 panics. Falling back to the unjittered delay is harmless.
    Duration::try_from_secs_f64(delay.as_secs_f64() * factor).unwrap_or(delay)
}

/// Parses a `Retry-After` header value: delta-seconds or an HTTP-date (a date in the past gives
/// zero). `None` when unparsable, in which case the schedule applies.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Only digits, so parsing fails only on overflow: that means "very long", which the
        // schedule's clamp turns into its largest delay.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(
        date.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn standard_schedule_has_ten_attempts() {
        let schedule = RetrySchedule::standard();
        assert_eq!(schedule.max_attempts(), 10);
        assert_eq!(schedule.delays().len(), 9);
        assert_eq!(schedule.delays()[0], secs(5));
        assert_eq!(schedule.delays()[8], secs(24 * 3600));
        let total: Duration = schedule.delays().iter().sum();
        assert_eq!(
            total,
            secs(5 + 5 * 60 + 30 * 60 + (2 + 5 + 10 + 14 + 20 + 24) * 3600)
        );
        assert_eq!(RetrySchedule::default(), schedule);
    }

    #[test]
    fn first_attempt_is_immediate() {
        assert_eq!(
            RetrySchedule::standard().next_delay(0, None),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn jitter_stays_within_twenty_percent_and_spreads() {
        let schedule = RetrySchedule::standard();
        for (i, &base) in schedule.delays().iter().enumerate() {
            let failed = u32::try_from(i).unwrap() + 1;
            let low = base.mul_f64(0.8);
            let high = base.mul_f64(1.2);
            let samples: Vec<Duration> = (0..2_000)
                .map(|_| schedule.next_delay(failed, None).unwrap())
                .collect();
            for &d in &samples {
                assert!(
                    low <= d && d <= high,
                    "attempt {failed}: {d:?} outside {low:?}..{high:?}"
                );
            }
            // Jitter that never moves is no jitter: both halves of the range are used.
            assert!(samples.iter().any(|&d| d < base.mul_f64(0.9)));
            assert!(samples.iter().any(|&d| d > base.mul_f64(1.1)));
        }
    }

    #[test]
    fn exhaustion_means_dead() {
        let schedule = RetrySchedule::standard();
        assert!(schedule.next_delay(9, None).is_some());
        assert_eq!(schedule.next_delay(10, None), None);
        assert_eq!(schedule.next_delay(10, Some(secs(7))), None);
        assert_eq!(schedule.next_delay(u32::MAX, None), None);

        let none = RetrySchedule::new(vec![]);
        assert_eq!(none.max_attempts(), 1);
        assert_eq!(none.next_delay(0, None), Some(Duration::ZERO));
        assert_eq!(none.next_delay(1, None), None);
        assert_eq!(none.next_delay(1, Some(secs(5))), None);
    }

    #[test]
    fn retry_after_replaces_the_delay_without_jitter() {
        let schedule = RetrySchedule::standard();
        assert_eq!(schedule.next_delay(1, Some(secs(7))), Some(secs(7)));
        assert_eq!(schedule.next_delay(5, Some(secs(7))), Some(secs(7)));
    }

    #[test]
    fn retry_after_is_clamped() {
        let schedule = RetrySchedule::new(vec![secs(10), secs(3600), secs(60)]);
        assert_eq!(schedule.next_delay(1, Some(Duration::ZERO)), Some(secs(1)));
        assert_eq!(
            schedule.next_delay(1, Some(Duration::from_millis(10))),
            Some(secs(1))
        );
        // The ceiling is the larger of an hour and the largest delay.
        assert_eq!(schedule.next_delay(1, Some(secs(86_400))), Some(secs(3600)));
        assert_eq!(
            schedule.next_delay(3, Some(Duration::MAX)),
            Some(secs(3600))
        );
        let long = RetrySchedule::new(vec![secs(10), secs(7200)]);
        assert_eq!(long.next_delay(1, Some(secs(86_400))), Some(secs(7200)));

        // A short schedule still honours what the endpoint asked for, up to an hour.
        let fast = RetrySchedule::new(vec![Duration::from_millis(50)]);
        assert_eq!(fast.next_delay(1, Some(secs(30))), Some(secs(30)));
        assert_eq!(fast.next_delay(1, Some(secs(7200))), Some(secs(3600)));
    }

    #[test]
    fn huge_configured_delays_do_not_panic() {
        let schedule = RetrySchedule::new(vec![Duration::MAX]);
        let delay = schedule.next_delay(1, None).unwrap();
        assert!(delay >= Duration::MAX.mul_f64(0.79));
    }

    #[test]
    fn parses_delta_seconds() {
        assert_eq!(parse_retry_after("7"), Some(secs(7)));
        assert_eq!(parse_retry_after(" 120 "), Some(secs(120)));
        assert_eq!(parse_retry_after("0"), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("99999999999999999999999"),
            Some(secs(u64::MAX))
        );
    }

    #[test]
    fn rejects_garbage() {
        for value in [
            "",
            "  ",
            "-5",
            "1.5",
            "+3",
            "7s",
            "soon",
            "Wed, 99 Oct 2015 07:28:00 GMT",
        ] {
            assert_eq!(parse_retry_after(value), None, "{value:?}");
        }
    }

    #[test]
    fn parses_http_dates() {
        let in_two_minutes = SystemTime::now() + secs(120);
        let parsed = parse_retry_after(&httpdate::fmt_http_date(in_two_minutes)).unwrap();
        // HTTP-dates have whole-second precision and a little time passes while parsing.
        assert!(secs(115) <= parsed && parsed <= secs(120), "{parsed:?}");

        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
    }
}
