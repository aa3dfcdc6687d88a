//! The clock: now in Unix seconds, and the UTC stamp that names log directories.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch; 0 for a clock set before 1970 (nothing dbh stamps is older).
pub fn now_secs() -> u64 {
    secs_of(SystemTime::now())
}

/// `t` in Unix seconds, 0 before the epoch.
pub fn secs_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// UTC `YYYYMMDD-HHMMSS` of now: the name of one build's directory under `logs/<target>/`. It
/// sorts by time as text.
pub fn log_stamp() -> String {
    log_stamp_of(now_secs())
}

/// [`log_stamp`] of `secs` since the epoch.
pub fn log_stamp_of(secs: u64) -> String {
    let (y, m, d, hh, mm, ss) = civil(secs);
    format!("{y:04}{m:02}{d:02}-{hh:02}{mm:02}{ss:02}")
}

/// UTC (year, month, day, hour, minute, second) of `secs` since the epoch.
pub fn civil(secs: u64) -> (i64, u32, u32, u64, u64, u64) {
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m as u32, d as u32, rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn now_is_after_this_code_was_written() {
        let a = now_secs();
        assert!(a > 1_795_000_000, "{a}");
        assert!(now_secs() >= a);
        assert_eq!(secs_of(UNIX_EPOCH - Duration::from_secs(5)), 0);
        assert_eq!(secs_of(UNIX_EPOCH + Duration::from_millis(2500)), 2);
    }

    #[test]
    fn stamps_are_utc_civil_dates() {
        assert_eq!(log_stamp_of(0), "19700101-000000");
        assert_eq!(log_stamp_of(951_782_400), "20000229-000000");
        assert_eq!(log_stamp_of(1_795_555_137), "20261124-211857");
        assert_eq!(log_stamp_of(4_102_444_799), "20991231-235959");
        let t = log_stamp();
        assert_eq!(t.len(), 15, "{t}");
        assert!(t.starts_with("20"), "{t}");
    }
}
