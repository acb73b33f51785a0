//! Calendar dates with openIMIS's own arithmetic.
//!
//! openIMIS does not add months as most libraries do. Its `datetimedelta(months=n)`
//! (`openimis-be-core_py` `core/datetimes/shared.py`) adds, per month, the number of days of the
//! month the date is in (`_add_month`), or subtracts those of the month before (`_sub_month`):
//! 31 January + 1 month is 2 March (3 March in a common year), not 29 February. Years replace the
//! year, and 29 February becomes 28 February plus the years. Ages use `dateutil`'s
//! `relativedelta` instead (29 February − 18 years is 28 February). A node that prices a policy
//! must count alike, or its dates differ from the server's by a day or two near month ends.

use std::fmt;

/// A day of the Gregorian calendar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date {
    year: i32,
    month: u32,
    day: u32,
}

/// Whether `year` is a leap year.
pub fn is_leap(year: i32) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

/// The number of days of `month` (1–12) in `year`.
pub fn days_in_month(year: i32, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

impl Date {
    /// The date `year-month-day`, if it exists.
    pub fn new(year: i32, month: u32, day: u32) -> Option<Date> {
        ((1..=12).contains(&month) && day >= 1 && day <= days_in_month(year, month))
            .then_some(Date { year, month, day })
    }

    /// Parses `YYYY-MM-DD`, also the date part of a FHIR dateTime (`2020-01-01T00:00:00`,
    /// with or without a zone, as openIMIS sends them).
    pub fn parse(s: &str) -> Option<Date> {
        let day_part = s.get(..10)?;
        if s.len() > 10 && !s[10..].starts_with('T') {
            return None;
        }
        let mut it = day_part.split('-');
        let (y, m, d) = (it.next()?, it.next()?, it.next()?);
        if y.len() != 4 || m.len() != 2 || d.len() != 2 {
            return None;
        }
        Date::new(y.parse().ok()?, m.parse().ok()?, d.parse().ok()?)
    }

    /// The year.
    pub fn year(self) -> i32 {
        self.year
    }

    /// The month, 1–12.
    pub fn month(self) -> u32 {
        self.month
    }

    /// The day of the month.
    pub fn day(self) -> u32 {
        self.day
    }

    /// Days since 1970-01-01 (negative before).
    pub fn days(self) -> i64 {
        // Howard Hinnant's days_from_civil.
        let y = i64::from(self.year) - i64::from(self.month <= 2);
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let m = i64::from(self.month);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// The date `days` after 1970-01-01.
    pub fn from_days(days: i64) -> Date {
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
        Date { year, month, day }
    }

    /// The date of a Unix time (seconds), in UTC.
    pub fn from_unix(secs: i64) -> Date {
        Date::from_days(secs.div_euclid(86_400))
    }

    /// The date `n` days later (earlier if negative).
    pub fn add_days(self, n: i64) -> Date {
        Date::from_days(self.days() + n)
    }

    /// openIMIS's `date + datetimedelta(months=n)`: per month forward, the days of the current
    /// month; per month back, the days of the month before.
    pub fn add_months(self, n: i32) -> Date {
        let mut d = self;
        for _ in 0..n.unsigned_abs() {
            d = if n > 0 {
                d.add_days(i64::from(days_in_month(d.year, d.month)))
            } else {
                let (y, m) = if d.month == 1 {
                    (d.year - 1, 12)
                } else {
                    (d.year, d.month - 1)
                };
                d.add_days(-i64::from(days_in_month(y, m)))
            };
        }
        d
    }

    /// openIMIS's `date + datetimedelta(years=n)`: the same day `n` years on; 29 February
    /// becomes 28 February plus the years.
    pub fn add_years(self, n: i32) -> Date {
        Date::new(self.year + n, self.month, self.day)
            .unwrap_or_else(|| self.add_days(-1).add_years(n))
    }

    /// `dateutil`'s `date - relativedelta(years=n)` (how openIMIS dates the age of majority):
    /// the same day `n` years before, clamped to the month's end.
    pub fn years_before(self, n: i32) -> Date {
        let year = self.year - n;
        Date {
            year,
            month: self.month,
            day: self.day.min(days_in_month(year, self.month)),
        }
    }
}

impl serde::Serialize for Date {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Date {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Date, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Date::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("not a date: {s}")))
    }
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Date {
        Date::parse(s).unwrap_or_else(|| panic!("{s}"))
    }

    #[test]
    fn months_are_added_as_openimis_adds_them() {
        // Checked against openIMIS 1.x's core.datetimedelta in a Django shell.
        assert_eq!(d("2024-01-31").add_months(1), d("2024-03-02"));
        assert_eq!(d("2024-03-31").add_months(-1), d("2024-03-02"));
        assert_eq!(d("2023-01-31").add_months(1), d("2023-03-03"));
        assert_eq!(d("2024-01-15").add_months(12), d("2025-01-15"));
        assert_eq!(d("2024-02-29").add_years(1), d("2025-02-28"));
        assert_eq!(d("2024-02-29").add_years(4), d("2028-02-29"));
        assert_eq!(d("2024-02-29").years_before(18), d("2006-02-28"));
        assert_eq!(d("2024-06-20").add_months(0), d("2024-06-20"));
    }

    #[test]
    fn days_round_trip_and_parse_is_strict() {
        for n in [-800_000, -1, 0, 1, 19_000, 60_000, 2_000_000] {
            assert_eq!(Date::from_days(n).days(), n);
        }
        assert_eq!(d("1970-01-01").days(), 0);
        assert_eq!(d("2021-06-20T00:00:00").to_string(), "2021-06-20");
        assert_eq!(Date::parse("2021-02-30"), None);
        assert_eq!(Date::parse("2021-6-20"), None);
        assert_eq!(Date::parse("2021-06-20x"), None);
    }
}
