//! Business numbers: the insurance number (CHFID) and the claim code, as openIMIS checks them,
//! and the numbers central hands out.
//!
//! openIMIS validates an insurance number (`insuree/services.py`, `validate_insuree_number`) by
//! the deployment's settings: a minimum and a maximum length, and a check digit, the last digit,
//! equal to the rest of the number modulo a root (`insuree_number_modulo_root`); a root of 10
//! means the Luhn algorithm instead. A number is unique among valid insurees; a claim code among
//! valid claims (`claim/services.py`, `check_unique_claim_code`). [`NumberRule`] is that rule, so
//! that a device checks a number printed on a card exactly as the server will, without a link.
//!
//! Numbers central makes (its own, or a block leased to a device) come from a counter: the
//! `n`-th number is `n` zero-padded to the length, followed by its check digit when the rule has
//! one ([`NumberRule::make`]).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The kinds of business numbers central hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NumberKind {
    /// The insurance number of an insuree (openIMIS `chf_id`), carried by a `Patient` as an
    /// identifier typed `Code`.
    Chfid,
    /// A claim's code, carried by a `Claim` as an identifier typed `Code`.
    ClaimCode,
}

impl NumberKind {
    /// Both kinds.
    pub const ALL: [NumberKind; 2] = [NumberKind::Chfid, NumberKind::ClaimCode];

    /// The kind's name (`chfid`, `claim-code`).
    pub fn name(self) -> &'static str {
        match self {
            NumberKind::Chfid => "chfid",
            NumberKind::ClaimCode => "claim-code",
        }
    }

    /// Parses a kind's name.
    pub fn parse(s: &str) -> Option<NumberKind> {
        NumberKind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// The resource type whose business number this is.
    pub fn resource_type(self) -> &'static str {
        match self {
            NumberKind::Chfid => "Patient",
            NumberKind::ClaimCode => "Claim",
        }
    }

    /// The kind of business number a resource type carries, if any.
    pub fn of_type(ty: &str) -> Option<NumberKind> {
        NumberKind::ALL
            .into_iter()
            .find(|k| k.resource_type() == ty)
    }

    /// What a person calls it.
    pub fn label(self) -> &'static str {
        match self {
            NumberKind::Chfid => "insurance number",
            NumberKind::ClaimCode => "claim code",
        }
    }
}

/// A deployment's rule for one kind of number (openIMIS's `insuree_number_min_length`,
/// `insuree_number_max_length`, `insuree_number_modulo_root`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumberRule {
    /// Shortest valid number.
    #[serde(default)]
    pub min_length: Option<usize>,
    /// Longest valid number; also the length of the numbers central makes.
    #[serde(default)]
    pub max_length: Option<usize>,
    /// The check digit: the last digit is the rest modulo this root (2–10; 10 is Luhn).
    #[serde(default)]
    pub modulo_root: Option<u32>,
}

impl Default for NumberRule {
    /// No rule: any non-empty number (openIMIS's default settings).
    fn default() -> Self {
        Self {
            min_length: None,
            max_length: None,
            modulo_root: None,
        }
    }
}

/// Why a number breaks the rule, with openIMIS's error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NumberError {
    /// No number (openIMIS code 2).
    #[error("the {0} is empty")]
    Empty(&'static str),
    /// Too long (openIMIS code 3).
    #[error("the {label} {number:?} has {len} characters, at most {max} are allowed")]
    TooLong {
        /// What the number is.
        label: &'static str,
        /// The number.
        number: String,
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// Too short (openIMIS code 3).
    #[error("the {label} {number:?} has {len} characters, at least {min} are needed")]
    TooShort {
        /// What the number is.
        label: &'static str,
        /// The number.
        number: String,
        /// Its length.
        len: usize,
        /// The minimum.
        min: usize,
    },
    /// The check digit is wrong (openIMIS code 4), or the number is not made of digits where a
    /// check digit is expected (openIMIS code 5).
    #[error("the {label} {number:?} fails its check digit (modulo {root}): mistyped?")]
    Checksum {
        /// What the number is.
        label: &'static str,
        /// The number.
        number: String,
        /// The modulo root.
        root: u32,
    },
}

impl NumberError {
    /// openIMIS's error code for it (`validation_code_*` in `insuree/apps.py`).
    pub fn code(&self) -> u32 {
        match self {
            NumberError::Empty(_) => 2,
            NumberError::TooLong { .. } | NumberError::TooShort { .. } => 3,
            NumberError::Checksum { .. } => 4,
        }
    }
}

/// Length of the numbers central makes when the rule sets none.
pub const DEFAULT_LENGTH: usize = 9;

impl NumberRule {
    /// A rule of exactly `length` digits with a check digit modulo `root`.
    pub fn fixed(length: usize, root: Option<u32>) -> Self {
        Self {
            min_length: Some(length),
            max_length: Some(length),
            modulo_root: root,
        }
    }

    /// Checks `number` as openIMIS does, in its order: length, then check digit.
    pub fn check(&self, kind: NumberKind, number: &str) -> Result<(), NumberError> {
        let label = kind.label();
        let len = number.chars().count();
        if number.trim().is_empty() {
            return Err(NumberError::Empty(label));
        }
        if let Some(max) = self.max_length
            && len > max
        {
            return Err(NumberError::TooLong {
                label,
                number: number.into(),
                len,
                max,
            });
        }
        if let Some(min) = self.min_length
            && len < min
        {
            return Err(NumberError::TooShort {
                label,
                number: number.into(),
                len,
                min,
            });
        }
        if let Some(root) = self.modulo_root {
            let ok = number.len() >= 2
                && number.bytes().all(|b| b.is_ascii_digit())
                && check_digit(&number[..number.len() - 1], root)
                    == number.bytes().last().map(|b| u32::from(b - b'0'));
            if !ok {
                return Err(NumberError::Checksum {
                    label,
                    number: number.into(),
                    root,
                });
            }
        }
        Ok(())
    }

    /// The length of the numbers made under this rule.
    pub fn length(&self) -> usize {
        self.max_length
            .or(self.min_length)
            .unwrap_or(DEFAULT_LENGTH)
            .max(2)
    }

    /// The `n`-th number under this rule: `n` zero-padded to the length (less the check digit)
    /// and its check digit. `None` when `n` does not fit, or when its check digit would have two
    /// digits (a root above 10): such counters are skipped, as openIMIS could not accept them.
    pub fn make(&self, n: u64) -> Option<String> {
        let body_len = self.length() - usize::from(self.modulo_root.is_some());
        let body = format!("{n:0body_len$}");
        if body.len() > body_len {
            return None;
        }
        match self.modulo_root {
            None => Some(body),
            Some(root) => {
                let digit = check_digit(&body, root)?;
                (digit < 10).then(|| format!("{body}{digit}"))
            }
        }
    }

    /// How many counters there are under this rule (`make` is `None` from there on).
    pub fn capacity(&self) -> u64 {
        let body_len = self.length() - usize::from(self.modulo_root.is_some());
        10u64.checked_pow(body_len as u32).unwrap_or(u64::MAX)
    }
}

/// The check digit of the digits `body` under `root`: `body mod root`, or the Luhn digit for
/// a root of 10 (openIMIS's `is_modulo_10_number_valid`). `None` if `body` is not all digits
/// or too long for a number.
pub fn check_digit(body: &str, root: u32) -> Option<u32> {
    if body.is_empty() || !body.bytes().all(|b| b.is_ascii_digit()) || root < 2 {
        return None;
    }
    if root == 10 {
        // openIMIS doubles the digits at even positions counted from the left (index 0, 2, …)
        // and takes 9 from those above 9; the total with the check digit is a multiple of 10.
        let sum: u32 = body
            .bytes()
            .map(|b| u32::from(b - b'0'))
            .enumerate()
            .map(|(i, d)| {
                if i % 2 == 0 {
                    d + d - 9 * u32::from(d > 4)
                } else {
                    d
                }
            })
            .sum();
        return Some((10 - sum % 10) % 10);
    }
    let value: u128 = body.parse().ok()?;
    Some((value % u128::from(root)) as u32)
}

/// `Basic.code` of a lease document.
pub const LEASE_CODE: &str = "number-lease";

/// The code system of [`LEASE_CODE`].
pub const LEASE_CODE_SYSTEM: &str = "urn:fieldmesh:CodeSystem/basic";

/// The extension of a lease document holding the lease.
pub const LEASE_EXTENSION: &str = "urn:fieldmesh:StructureDefinition/number-lease";

/// Identifier system naming the device a lease belongs to (its public key in hex): a device
/// finds its leases by `identifier=<this>|<its key>`.
pub const LEASE_HOLDER_SYSTEM: &str = "urn:fieldmesh:lease-holder";

/// A block of numbers central leased to one device: the counters `first .. first + count`
/// under `rule` ([`NumberRule::make`]). Central never hands a counter out twice; the device
/// never uses one twice. A lease is a `Basic` document central writes (see [`Lease::to_json`]),
/// synced like any other to the device's places.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Which numbers.
    pub kind: NumberKind,
    /// The device's public key, hex.
    pub holder: String,
    /// The first counter.
    pub first: u64,
    /// How many counters.
    pub count: u64,
    /// The rule the numbers are made under.
    pub rule: NumberRule,
}

impl Lease {
    /// The lease as the `Basic` document central writes, held at `places` (logical references
    /// to the holder's places: the lease reaches the device where it works).
    pub fn to_json(&self, places: &[Value]) -> serde_json::Map<String, Value> {
        let mut ext = vec![serde_json::json!({"url": LEASE_EXTENSION, "extension": [
            {"url": "kind", "valueCode": self.kind.name()},
            {"url": "holder", "valueString": self.holder},
            {"url": "first", "valueString": self.first.to_string()},
            {"url": "count", "valueString": self.count.to_string()},
            {"url": "rule", "valueString": serde_json::to_string(&self.rule).unwrap_or_default()},
        ]})];
        for p in places {
            ext.push(serde_json::json!({"url": super::PLACE_EXTENSION, "valueReference": p}));
        }
        let last = self.first + self.count.saturating_sub(1);
        serde_json::json!({
            "resourceType": "Basic",
            "code": {"coding": [{"system": LEASE_CODE_SYSTEM, "code": LEASE_CODE}],
                     "text": format!("{} {} to {} leased to device {}", self.kind.label(),
                        self.rule.make(self.first).unwrap_or_default(),
                        self.rule.make(last).unwrap_or_default(),
                        &self.holder[..self.holder.len().min(16)])},
            "identifier": [
                {"system": LEASE_HOLDER_SYSTEM, "value": self.holder},
                {"system": "urn:fieldmesh:lease", "value": format!("{}:{}", self.kind.name(), self.first)},
            ],
            "extension": ext,
        })
        .as_object()
        .cloned()
        .unwrap_or_default()
    }

    /// Reads a lease document (`None` if `json` is not one, or is malformed).
    pub fn from_json(json: &serde_json::Map<String, Value>) -> Option<Lease> {
        let coded = json
            .get("code")?
            .get("coding")?
            .as_array()?
            .iter()
            .any(|c| c.get("code").and_then(Value::as_str) == Some(LEASE_CODE));
        if !coded {
            return None;
        }
        let ext = json
            .get("extension")?
            .as_array()?
            .iter()
            .find(|e| e.get("url").and_then(Value::as_str) == Some(LEASE_EXTENSION))?;
        let subs = ext.get("extension")?.as_array()?;
        let sub = |url: &str| {
            subs.iter()
                .find(|s| s.get("url").and_then(Value::as_str) == Some(url))
                .and_then(|s| s.get("valueString").or_else(|| s.get("valueCode")))
                .and_then(Value::as_str)
        };
        Some(Lease {
            kind: NumberKind::parse(sub("kind")?)?,
            holder: sub("holder")?.to_string(),
            first: sub("first")?.parse().ok()?,
            count: sub("count")?.parse().ok()?,
            rule: serde_json::from_str(sub("rule")?).ok()?,
        })
    }

    /// The `i`-th number of the lease, if `i` is within it and makes a valid number.
    pub fn number(&self, i: u64) -> Option<String> {
        (i < self.count)
            .then(|| self.rule.make(self.first.checked_add(i)?))
            .flatten()
    }

    /// Whether the number `n` is one of this lease's.
    pub fn contains(&self, n: &str) -> bool {
        let body = match self.rule.modulo_root {
            Some(_) if n.len() >= 2 => &n[..n.len() - 1],
            Some(_) => return false,
            None => n,
        };
        body.parse::<u64>().is_ok_and(|c| {
            c >= self.first
                && c - self.first < self.count
                && self.rule.make(c).as_deref() == Some(n)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_checks_as_openimis_does() {
        // Root 7: 12345678 = 7 × 1763668 + 2.
        let rule = NumberRule::fixed(9, Some(7));
        assert!(rule.check(NumberKind::Chfid, "123456782").is_ok());
        assert!(matches!(
            rule.check(NumberKind::Chfid, "123456785"),
            Err(NumberError::Checksum { .. })
        ));
        assert!(matches!(
            rule.check(NumberKind::Chfid, "12345678"),
            Err(NumberError::TooShort { .. })
        ));
        assert!(matches!(
            rule.check(NumberKind::Chfid, "1234567820"),
            Err(NumberError::TooLong { .. })
        ));
        assert!(matches!(
            rule.check(NumberKind::Chfid, "12345678X"),
            Err(NumberError::Checksum { .. })
        ));
        assert_eq!(rule.check(NumberKind::Chfid, "").unwrap_err().code(), 2);
        // No rule: anything but nothing.
        assert!(
            NumberRule::default()
                .check(NumberKind::Chfid, "A-1")
                .is_ok()
        );
    }

    #[test]
    fn luhn_for_a_root_of_ten() {
        let rule = NumberRule::fixed(9, Some(10));
        // Computed by hand: digits 9 9 2 0 0 5 4 8 at positions 0..7; doubled at even
        // positions: 9→9, 2→4, 0→0, 4→8; sum = 9+9+4+0+0+5+8+8 = 43; check = 7.
        assert_eq!(check_digit("99200548", 10), Some(7));
        assert!(rule.check(NumberKind::Chfid, "992005487").is_ok());
        assert!(rule.check(NumberKind::Chfid, "992005485").is_err());
    }

    #[test]
    fn made_numbers_pass_the_rule() {
        for rule in [
            NumberRule::fixed(9, Some(7)),
            NumberRule::fixed(9, Some(10)),
            NumberRule::fixed(8, None),
            NumberRule::fixed(6, Some(13)),
        ] {
            let mut made = 0;
            for n in [0, 1, 42, 99_999, 1_234_567] {
                if let Some(number) = rule.make(n) {
                    rule.check(NumberKind::Chfid, &number).unwrap();
                    made += 1;
                }
            }
            assert!(made > 0, "{rule:?}");
        }
        assert_eq!(NumberRule::fixed(3, Some(7)).make(100), None);
        assert_eq!(NumberRule::fixed(3, Some(7)).make(12), Some("125".into()));
    }

    #[test]
    fn a_lease_round_trips_and_knows_its_numbers() {
        let lease = Lease {
            kind: NumberKind::Chfid,
            holder: "ab".repeat(32),
            first: 1000,
            count: 50,
            rule: NumberRule::fixed(9, Some(7)),
        };
        let json = lease
            .to_json(&[serde_json::json!({"type": "Location", "identifier": {"value": "V1"}})]);
        assert_eq!(Lease::from_json(&json), Some(lease.clone()));
        let n = lease.number(3).unwrap();
        assert!(lease.contains(&n));
        assert!(!lease.contains(&lease.rule.make(1050).unwrap()));
        assert_eq!(lease.number(50), None);
        assert_eq!(
            crate::openimis::places("Basic", &json),
            Some(vec!["V1".to_string()])
        );
    }
}
