//! Policies as openIMIS prices them: the product, the policy value, its dates, its activation.
//!
//! The rules are openIMIS's server rules (`openimis-be-policy_py` `policy/values.py`,
//! `openimis-be-contribution_py` `contribution/services.py`), not the legacy Android app's,
//! which computes other values (`FHIR-MAPPING.md` §3):
//!
//! - **Members** are counted by the age of majority (18) on the day the value is computed
//!   (*today*, not the enrolment date, as the server does); trimmed to the product's
//!   `memberCount`, then split by the threshold (`groupSize` of the lump sum).
//! - **Value**: the lump sum plus the members above the threshold at the adult and child
//!   premiums, or, without a lump sum, the members up to the threshold at those premiums
//!   (members above it are then not charged: the server's `L = 0, T > 0` edge); plus the
//!   general-assembly lump sum or fee per member, plus, for a new policy only, the registration
//!   lump sum or fee per member; less the enrolment discount (new policies of a product with
//!   start cycles, enrolled early enough) or the renewal discount (renewals enrolled early
//!   enough before the previous policy's expiry). Amounts are openIMIS's `decimal(18,2)`: the
//!   discounted value is rounded half to even, as Django stores it.
//! - **Dates**: start on the enrolment date (plus the administration period for a new policy)
//!   or, with start cycles, on the first cycle on or after that date less the grace period;
//!   expiry one insurance period later less a day. Months are counted as openIMIS counts them
//!   ([`super::dates`]).
//! - **Activation** ([`activation`]): payments in the order taken; the one that pays the
//!   balance activates the policy from its date or the start date, whichever is later; one
//!   that pays more activates it from its own date; less leaves it idle.
//!
//! [`Product::from_insurance_plan`] reads a product as openIMIS's FHIR module serves it (its
//! quirks included: the three period extensions share one URL and are told apart by order,
//! the two discounts likewise), and also in the named forms of the IG.

use serde_json::{Map, Value, json};
use thiserror::Error;

use super::IG;
use super::dates::Date;

/// The contribution extension of a Contract's asset (openIMIS IG).
pub const PREMIUM_EXTENSION: &str =
    "https://openimis.github.io/openimis_fhir_r4_ig/StructureDefinition/contract-premium";
/// Where a node keeps a policy's enrolment date: openIMIS reads it from the client's
/// `period.start` and serves the start date there, so a node that recomputes after a merge
/// needs it kept apart.
pub const ENROLL_DATE_EXTENSION: &str = "urn:fieldmesh:StructureDefinition/policy-enroll-date";
/// The last day a contribution can be paid for the policy (openIMIS's `last_date_for_payment`).
pub const LAST_PAYMENT_EXTENSION: &str =
    "urn:fieldmesh:StructureDefinition/policy-last-payment-date";
/// A product's payment grace period in months (openIMIS's `grace_period_payment`, a
/// `WaitingPeriod` column that its FHIR form does not carry).
pub const PAYMENT_GRACE_EXTENSION: &str =
    "urn:fieldmesh:StructureDefinition/insurance-plan-payment-grace-period";
/// openIMIS's age of majority (`core.apps.CoreConfig.age_of_majority`, default 18).
pub const AGE_OF_MAJORITY: i32 = 18;

/// An amount in hundredths, as openIMIS stores money (`decimal(18,2)`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(pub i64);

impl Money {
    /// Reads a JSON number (or a numeric string) exactly; more than two decimals are rounded
    /// half to even. `None` for anything else, a negative amount or one beyond `decimal(18,2)`.
    pub fn parse(v: &Value) -> Option<Money> {
        let text = match v {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.trim().to_string(),
            _ => return None,
        };
        Money::parse_text(&text)
    }

    fn parse_text(text: &str) -> Option<Money> {
        if text.contains(['e', 'E']) {
            let f: f64 = text.parse().ok()?;
            return (f.is_finite() && (0.0..1e16).contains(&f))
                .then(|| Money((f * 100.0).round() as i64));
        }
        let (int, frac) = text.split_once('.').unwrap_or((text, ""));
        if int.is_empty()
            || int.len() > 16
            || !int.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let units: i64 = int.parse().ok()?;
        let digits: Vec<i64> = frac.bytes().map(|b| i64::from(b - b'0')).collect();
        let cents = digits.first().copied().unwrap_or(0) * 10 + digits.get(1).copied().unwrap_or(0);
        let mut total = units.checked_mul(100)?.checked_add(cents)?;
        // Half to even on what lies beyond the hundredths.
        let rest = &digits[digits.len().min(2)..];
        if let Some((&first, tail)) = rest.split_first() {
            let above_half = first > 5 || (first == 5 && tail.iter().any(|&d| d > 0));
            let half = first == 5 && tail.iter().all(|&d| d == 0);
            if above_half || (half && total % 2 == 1) {
                total += 1;
            }
        }
        Some(Money(total))
    }

    /// The amount as a JSON number with two decimals (`1250.50`).
    pub fn to_json(self) -> Value {
        serde_json::from_str(&self.to_string()).unwrap_or(Value::Null)
    }

    fn times(self, n: u32) -> Money {
        Money(self.0 * i64::from(n))
    }
}

impl std::fmt::Display for Money {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

impl std::ops::Add for Money {
    type Output = Money;
    fn add(self, o: Money) -> Money {
        Money(self.0 + o.0)
    }
}

/// A discount: a percentage, for enrolments at least `months` before the reference date.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Discount {
    /// Percent off the value.
    pub percent: u32,
    /// How many months ahead one must enrol.
    pub months: u32,
}

impl Discount {
    fn applies(self) -> bool {
        self.percent > 0 && self.months > 0
    }
}

/// An insurance product, what pricing a policy needs of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Product {
    /// Its code (the identifier typed `Code`).
    pub code: Option<String>,
    /// Its name.
    pub name: Option<String>,
    /// Months a policy covers.
    pub insurance_period: u32,
    /// Months between enrolment and the start of a new policy.
    pub administration_period: u32,
    /// Lump sum L.
    pub lump_sum: Money,
    /// Threshold T: members the lump sum covers (0: none).
    pub threshold: u32,
    /// Max members M (0: no limit).
    pub max_members: u32,
    /// Premium per adult.
    pub premium_adult: Money,
    /// Premium per child.
    pub premium_child: Money,
    /// Registration lump sum (new policies).
    pub registration_lump_sum: Money,
    /// Registration fee per member (new policies, without a lump sum).
    pub registration_fee: Money,
    /// General-assembly lump sum.
    pub general_assembly_lump_sum: Money,
    /// General-assembly fee per member (without a lump sum).
    pub general_assembly_fee: Money,
    /// Grace period of new policies, months (openIMIS `grace_period_enrolment`).
    pub grace_enrolment: u32,
    /// Grace period of renewals, months.
    pub grace_renewal: u32,
    /// Payment grace period, months (openIMIS `grace_period_payment`).
    pub grace_payment: u32,
    /// Start cycles `(day, month)`, in the product's order.
    pub cycles: Vec<(u32, u32)>,
    /// Enrolment discount.
    pub enrolment_discount: Discount,
    /// Renewal discount.
    pub renewal_discount: Discount,
    /// The dates the product can be sold.
    pub valid_from: Option<Date>,
    /// The last date it can be sold.
    pub valid_to: Option<Date>,
}

/// Why an `InsurancePlan` cannot price a policy.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProductError {
    /// No `coverage.benefit.limit` coded `period`.
    #[error("InsurancePlan has no insurance period (coverage.benefit.limit coded `period`)")]
    NoInsurancePeriod,
    /// An amount that is not a non-negative decimal.
    #[error("InsurancePlan {0} is not an amount")]
    BadAmount(String),
    /// A count or a number of months that is not a small non-negative integer.
    #[error("InsurancePlan {0} is not a whole number")]
    BadCount(String),
    /// A start cycle that is not `dd-mm`.
    #[error("InsurancePlan start cycle {0:?} is not a day and month `dd-mm`")]
    BadCycle(String),
}

fn count(v: Option<&Value>, what: &str) -> Result<u32, ProductError> {
    let Some(v) = v else { return Ok(0) };
    let f = v
        .as_f64()
        .ok_or_else(|| ProductError::BadCount(what.into()))?;
    if !(0.0..=100_000.0).contains(&f) || f.fract() != 0.0 {
        return Err(ProductError::BadCount(what.into()));
    }
    Ok(f as u32)
}

fn code_of(concept: Option<&Value>) -> Option<&str> {
    concept?
        .get("coding")?
        .as_array()?
        .iter()
        .find_map(|c| c.get("code").and_then(Value::as_str))
}

fn parse_cycle(s: &str) -> Option<(u32, u32)> {
    let (d, m) = s.trim().split_once('-')?;
    let (d, m): (u32, u32) = (d.parse().ok()?, m.parse().ok()?);
    // 29 February exists in leap years only; openIMIS would fail on it in the others.
    Date::new(2024, m, d).map(|_| (d, m))
}

impl Product {
    /// Reads a product from an `InsurancePlan` as openIMIS's FHIR module writes it, or in the
    /// IG's named forms.
    pub fn from_insurance_plan(plan: &Map<String, Value>) -> Result<Product, ProductError> {
        let mut p = Product {
            name: plan.get("name").and_then(Value::as_str).map(String::from),
            code: plan
                .get("identifier")
                .and_then(Value::as_array)
                .and_then(|ids| {
                    ids.iter()
                        .find(|i| code_of(i.get("type")) == Some("Code"))
                        .and_then(|i| i.get("value"))
                        .and_then(Value::as_str)
                        .map(String::from)
                }),
            valid_from: plan
                .get("period")
                .and_then(|p| p.get("start"))
                .and_then(Value::as_str)
                .and_then(Date::parse),
            valid_to: plan
                .get("period")
                .and_then(|p| p.get("end"))
                .and_then(Value::as_str)
                .and_then(Date::parse),
            ..Product::default()
        };
        let mut period = None;
        for coverage in plan
            .get("coverage")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for benefit in coverage
                .get("benefit")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for limit in benefit
                    .get("limit")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let value = limit.get("value").and_then(|v| v.get("value"));
                    match code_of(limit.get("code")) {
                        Some("period") => period = Some(count(value, "insurance period")?),
                        Some("memberCount") => p.max_members = count(value, "member count")?,
                        _ => {}
                    }
                }
            }
        }
        p.insurance_period = period.ok_or(ProductError::NoInsurancePeriod)?;
        for plan in plan
            .get("plan")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for cost in plan
                .get("generalCost")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(code) = code_of(cost.get("type")) else {
                    continue;
                };
                let amount = match cost.get("cost").and_then(|c| c.get("value")) {
                    Some(v) => {
                        Money::parse(v).ok_or_else(|| ProductError::BadAmount(code.into()))?
                    }
                    None => Money(0),
                };
                match code {
                    "lumpsum" => {
                        p.lump_sum = amount;
                        p.threshold = count(cost.get("groupSize"), "lump sum groupSize")?;
                    }
                    "premiumAdult" => p.premium_adult = amount,
                    "premiumChild" => p.premium_child = amount,
                    "registrationLumpsum" => p.registration_lump_sum = amount,
                    "registrationFee" => p.registration_fee = amount,
                    "generalAssemblyLumpSum" => p.general_assembly_lump_sum = amount,
                    "generalAssemblyFee" => p.general_assembly_fee = amount,
                    _ => {}
                }
            }
        }
        // openIMIS's module writes the administration period, the enrolment grace period and
        // the renewal grace period all as `insurance-plan-period`, in that order; the two
        // discounts as `insurance-plan-discount`, renewal first.
        let mut periods = 0;
        let mut discounts = 0;
        for ext in plan
            .get("extension")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let url = ext.get("url").and_then(Value::as_str).unwrap_or_default();
            let months = || count(ext.get("valueQuantity").and_then(|q| q.get("value")), url);
            let name = url.rsplit('/').next().unwrap_or_default();
            match name {
                "insurance-plan-period" => {
                    let m = months()?;
                    match periods {
                        0 => p.administration_period = m,
                        1 => p.grace_enrolment = m,
                        2 => p.grace_renewal = m,
                        _ => {}
                    }
                    periods += 1;
                }
                "insurance-plan-administration-period" => p.administration_period = months()?,
                "insurance-plan-renewal-grace-period" => p.grace_renewal = months()?,
                "insurance-plan-payment-grace-period" if url.starts_with(IG) => {
                    p.grace_enrolment = months()?
                }
                "insurance-plan-payment-grace-period" => p.grace_payment = months()?,
                "insurance-plan-start_cycle" | "insurance-plan-start-cycle" => {
                    let s = ext
                        .get("valueString")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    if !s.is_empty() {
                        p.cycles
                            .push(parse_cycle(s).ok_or_else(|| ProductError::BadCycle(s.into()))?);
                    }
                }
                "insurance-plan-discount"
                | "insurance-plan-renewal-discount"
                | "insurance-plan-enrolment-discount" => {
                    let mut d = Discount::default();
                    for part in ext
                        .get("extension")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        match part.get("url").and_then(Value::as_str) {
                            Some("Percentage") => {
                                d.percent = count(part.get("valueDecimal"), "discount percentage")?
                            }
                            Some("Period") => {
                                d.months = count(
                                    part.get("valueQuantity").and_then(|q| q.get("value")),
                                    "discount period",
                                )?
                            }
                            _ => {}
                        }
                    }
                    let renewal = match name {
                        "insurance-plan-renewal-discount" => true,
                        "insurance-plan-enrolment-discount" => false,
                        _ => {
                            discounts += 1;
                            discounts == 1
                        }
                    };
                    if renewal {
                        p.renewal_discount = d;
                    } else {
                        p.enrolment_discount = d;
                    }
                }
                _ => {}
            }
        }
        Ok(p)
    }

    /// Whether the product starts policies on fixed cycles.
    pub fn has_cycles(&self) -> bool {
        !self.cycles.is_empty()
    }
}

/// New policy (stage `N`) or renewal (`R`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// A new policy: `legalState.text` "Offered".
    New,
    /// A renewal: `legalState.text` "Renewed".
    Renewal,
}

/// What a policy's value and dates depend on.
#[derive(Debug, Clone)]
pub struct Terms<'a> {
    /// The product.
    pub product: &'a Product,
    /// New or renewal.
    pub stage: Stage,
    /// The enrolment date.
    pub enroll: Date,
    /// The day the value is computed (members' ages are taken on it, as the server does).
    pub today: Date,
    /// The birth dates of the members the policy covers.
    pub members: &'a [Date],
    /// For a renewal, the expiry date of the policy it renews.
    pub previous_expiry: Option<Date>,
}

/// The members counted, as openIMIS's `family_counts` splits them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FamilyCounts {
    /// Adults within the threshold.
    pub adults: u32,
    /// Adults above the threshold.
    pub extra_adults: u32,
    /// Children within the threshold.
    pub children: u32,
    /// Children above the threshold.
    pub extra_children: u32,
    /// Members counted after trimming to the product's maximum.
    pub total: u32,
}

/// A policy's value and dates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Valuation {
    /// The value (contribution due).
    pub value: Money,
    /// The start date.
    pub start: Date,
    /// The expiry date.
    pub expiry: Date,
    /// The last day a contribution can be paid.
    pub last_payment: Date,
    /// The members counted.
    pub counts: FamilyCounts,
    /// Members above the product's maximum (openIMIS warns, and does not charge them).
    pub above_max: u32,
}

/// openIMIS's `family_counts`: adults are those born before the day `today` less the age of
/// majority. (The server's "other" members, not related to the head, are always counted as
/// related: it compares the relation object with 7, never true.)
pub fn family_counts(product: &Product, members: &[Date], today: Date) -> FamilyCounts {
    let majority = today.years_before(AGE_OF_MAJORITY);
    let mut adults = members.iter().filter(|b| **b < majority).count() as u32;
    let mut children = members.len() as u32 - adults;
    let m = product.max_members;
    if m > 0 {
        let over_adults = adults.saturating_sub(m);
        let over_children = (adults + children).saturating_sub(over_adults + m);
        adults -= over_adults;
        children -= over_children;
    }
    let (mut extra_adults, mut extra_children) = (0, 0);
    let t = product.threshold;
    if t > 0 {
        extra_adults = adults.saturating_sub(t);
        extra_children = (children + adults).saturating_sub(extra_adults + t);
    }
    FamilyCounts {
        adults: adults - extra_adults,
        extra_adults,
        children: children - extra_children,
        extra_children,
        total: adults + children,
    }
}

/// The start date: openIMIS's `set_start_date`.
pub fn start_date(product: &Product, stage: Stage, enroll: Date) -> Date {
    let mut reference = enroll;
    if stage == Stage::New && product.administration_period > 0 {
        reference = reference.add_months(product.administration_period as i32);
    }
    let Some(&(first_day, first_month)) = product.cycles.first() else {
        return reference;
    };
    let grace = match stage {
        Stage::New => product.grace_enrolment,
        Stage::Renewal => product.grace_renewal,
    };
    let from = reference.add_months(-(grace as i32));
    product
        .cycles
        .iter()
        .filter_map(|&(d, m)| Date::new(from.year(), m, d))
        .find(|c| from <= *c)
        .or_else(|| Date::new(from.year() + 1, first_month, first_day))
        // 29 February in a year without one: openIMIS fails; take the day before.
        .unwrap_or_else(|| Date::new(from.year() + 1, first_month, 28).unwrap_or(from))
}

/// The expiry date: openIMIS's `set_expiry_date` (whole years as years).
pub fn expiry_date(product: &Product, start: Date) -> Date {
    let months = product.insurance_period;
    let end = if months.is_multiple_of(12) {
        start.add_years((months / 12) as i32)
    } else {
        start.add_months(months as i32)
    };
    end.add_days(-1)
}

/// The last day a contribution can be paid: openIMIS's `last_date_for_payment`.
pub fn last_payment_date(
    product: &Product,
    stage: Stage,
    enroll: Date,
    start: Date,
    expiry: Date,
) -> Date {
    let grace = match stage {
        Stage::New => product.grace_enrolment,
        Stage::Renewal => product.grace_renewal,
    };
    let last = if product.has_cycles() {
        start.add_months(grace as i32)
    } else {
        match stage {
            Stage::New => enroll.add_months(product.grace_payment as i32),
            Stage::Renewal => expiry.add_days(1).add_months(product.grace_payment as i32),
        }
    };
    last.add_days(-1)
}

/// `value` less `percent` %, rounded half to even to the hundredth.
fn discounted(value: Money, percent: u32) -> Money {
    let num = value.0 * i64::from(100u32.saturating_sub(percent));
    let (q, r) = (num.div_euclid(100), num.rem_euclid(100));
    Money(if r > 50 || (r == 50 && q % 2 == 1) {
        q + 1
    } else {
        q
    })
}

/// Prices a policy: openIMIS's `policy_values` (value, start and expiry dates) and its last
/// payment date.
pub fn value(terms: &Terms<'_>) -> Valuation {
    let p = terms.product;
    let start = start_date(p, terms.stage, terms.enroll);
    let expiry = expiry_date(p, start);
    let c = family_counts(p, terms.members, terms.today);
    let contributions = if p.lump_sum.0 != 0 {
        p.lump_sum + p.premium_adult.times(c.extra_adults) + p.premium_child.times(c.extra_children)
    } else {
        p.premium_adult.times(c.adults) + p.premium_child.times(c.children)
    };
    let assembly = if p.general_assembly_lump_sum.0 != 0 {
        p.general_assembly_lump_sum
    } else {
        p.general_assembly_fee.times(c.total)
    };
    let registration = match terms.stage {
        Stage::Renewal => Money(0),
        Stage::New if p.registration_lump_sum.0 != 0 => p.registration_lump_sum,
        Stage::New => p.registration_fee.times(c.total),
    };
    let mut value = contributions + assembly + registration;
    match terms.stage {
        Stage::New => {
            let d = p.enrolment_discount;
            if d.applies() && p.has_cycles() && terms.enroll <= start.add_months(-(d.months as i32))
            {
                value = discounted(value, d.percent);
            }
        }
        Stage::Renewal => {
            let d = p.renewal_discount;
            if let Some(prev) = terms.previous_expiry
                && d.applies()
                && terms.enroll <= prev.add_days(1).add_months(-(d.months as i32))
            {
                value = discounted(value, d.percent);
            }
        }
    }
    let above_max = if p.max_members > 0 {
        (terms.members.len() as u32).saturating_sub(p.max_members)
    } else {
        0
    };
    Valuation {
        value,
        start,
        expiry,
        last_payment: last_payment_date(p, terms.stage, terms.enroll, start, expiry),
        counts: c,
        above_max,
    }
}

/// A contribution paid for a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    /// The amount.
    pub amount: Money,
    /// The day it was paid.
    pub date: Date,
    /// Its receipt number (unique within the product).
    pub receipt: String,
}

/// Whether a policy is active, and from when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activation {
    /// Paid in full.
    pub active: bool,
    /// The effective date, once active.
    pub effective: Option<Date>,
    /// What was paid in all.
    pub paid: Money,
}

/// openIMIS's `premium_updated` over the payments in the order they were taken (by date; the
/// stored order among those of one day, the same on every replica after a merge): a payment
/// equal to the balance left activates the policy from its date or the start date, whichever
/// is later; more than the balance activates it from the payment's date (also a payment taken
/// after the policy was paid in full, as on the server); less leaves it as it was.
pub fn activation(value: Money, start: Date, payments: &[Payment]) -> Activation {
    let mut order: Vec<&Payment> = payments.iter().collect();
    order.sort_by_key(|p| p.date);
    let mut paid = Money(0);
    let mut out = Activation {
        active: false,
        effective: None,
        paid: Money(0),
    };
    for p in order {
        let balance = value.0 - paid.0;
        if p.amount.0 == balance {
            out.active = true;
            out.effective = Some(p.date.max(start));
        } else if p.amount.0 > balance {
            out.active = true;
            out.effective = Some(p.date);
        }
        paid = paid + p.amount;
    }
    out.paid = paid;
    out
}

/// Why a Contract cannot be priced.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ContractError {
    /// No enrolment date (`term[0].asset[0].period[0].start`).
    #[error(
        "Contract.term[0].asset[0].period[0].start (the enrolment date) is missing or not a date"
    )]
    NoEnrollDate,
    /// An enrolment date after today (openIMIS: `policy.enroll_date_in_the_future`).
    #[error(
        "Contract enrolment date {0} is in the future (openIMIS: policy.enroll_date_in_the_future)"
    )]
    EnrollInFuture(Date),
    /// No product (`term[0].asset[0].valuedItem[0].entityReference`).
    #[error("Contract.term[0].asset[0].valuedItem[0].entityReference (the product) is missing")]
    NoProduct,
    /// No family (`subject[0]`).
    #[error("Contract.subject[0] (the family) is missing")]
    NoSubject,
    /// A contribution without a valid amount, date or receipt.
    #[error("Contract contribution {index} (contract-premium): {why}")]
    BadPayment {
        /// Its position among the contributions.
        index: usize,
        /// What is wrong.
        why: &'static str,
    },
}

/// The first asset of the first term.
fn asset(json: &Map<String, Value>) -> Option<&Map<String, Value>> {
    json.get("term")?.get(0)?.get("asset")?.get(0)?.as_object()
}

fn asset_mut(json: &mut Map<String, Value>) -> Option<&mut Map<String, Value>> {
    json.get_mut("term")?
        .get_mut(0)?
        .get_mut("asset")?
        .get_mut(0)?
        .as_object_mut()
}

fn extension_value<'a>(obj: &'a Map<String, Value>, url: &str) -> Option<&'a Value> {
    obj.get("extension")?
        .as_array()?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(url))
}

/// The stage a Contract declares (`legalState.text` "Renewed" is a renewal).
pub fn stage_of(json: &Map<String, Value>) -> Stage {
    let text = json
        .get("legalState")
        .and_then(|s| s.get("text"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    if text.eq_ignore_ascii_case("renewed") {
        Stage::Renewal
    } else {
        Stage::New
    }
}

/// The enrolment date of a Contract: the one kept by a node that priced it, else the client's
/// `period.start` (openIMIS reads the enrolment date there).
pub fn enroll_date_of(json: &Map<String, Value>) -> Option<Date> {
    let asset = asset(json)?;
    extension_value(asset, ENROLL_DATE_EXTENSION)
        .and_then(|e| e.get("valueDate"))
        .and_then(Value::as_str)
        .or_else(|| asset.get("period")?.get(0)?.get("start")?.as_str())
        .and_then(Date::parse)
}

/// The stored reference to the product of a Contract.
pub fn product_reference(json: &Map<String, Value>) -> Option<&Map<String, Value>> {
    asset(json)?
        .get("valuedItem")?
        .get(0)?
        .get("entityReference")?
        .as_object()
}

/// The stored reference to the family (or head) a Contract covers.
pub fn subject_reference(json: &Map<String, Value>) -> Option<&Map<String, Value>> {
    json.get("subject")?.get(0)?.as_object()
}

/// The stored references to the insurees a Contract names as covered (`typeReference`).
pub fn covered_references(json: &Map<String, Value>) -> Vec<&Map<String, Value>> {
    asset(json)
        .and_then(|a| a.get("typeReference"))
        .and_then(Value::as_array)
        .map(|l| l.iter().filter_map(Value::as_object).collect())
        .unwrap_or_default()
}

/// The contributions of a Contract (its `contract-premium` extensions), in stored order.
pub fn payments_of(json: &Map<String, Value>) -> Result<Vec<Payment>, ContractError> {
    let Some(exts) = asset(json)
        .and_then(|a| a.get("extension"))
        .and_then(Value::as_array)
    else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (index, ext) in exts
        .iter()
        .filter(|e| e.get("url").and_then(Value::as_str) == Some(PREMIUM_EXTENSION))
        .enumerate()
    {
        let part = |name: &str| {
            ext.get("extension")
                .and_then(Value::as_array)
                .and_then(|l| {
                    l.iter()
                        .find(|p| p.get("url").and_then(Value::as_str) == Some(name))
                })
        };
        let bad = |why| ContractError::BadPayment { index, why };
        let amount = part("amount")
            .and_then(|p| p.get("valueMoney"))
            .and_then(|m| m.get("value"))
            .and_then(Money::parse)
            .ok_or_else(|| bad("its amount (valueMoney.value) is missing or not an amount"))?;
        let date = part("date")
            .and_then(|p| p.get("valueDate"))
            .and_then(Value::as_str)
            .and_then(Date::parse)
            .ok_or_else(|| bad("its date (valueDate) is missing or not a date"))?;
        let receipt = part("receipt")
            .and_then(|p| p.get("valueString"))
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .ok_or_else(|| bad("its receipt (valueString) is missing"))?;
        out.push(Payment {
            amount,
            date,
            receipt: receipt.to_string(),
        });
    }
    Ok(out)
}

/// A value a node replaced in what the client sent, reported back to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaced {
    /// The FHIRPath of the element.
    pub path: &'static str,
    /// What the client sent (none: it sent nothing).
    pub sent: Option<String>,
    /// What the rules give.
    pub now: String,
}

fn set_ext(asset: &mut Map<String, Value>, url: &str, value: Value) {
    let list = asset
        .entry("extension")
        .or_insert_with(|| Value::Array(Vec::new()));
    if !list.is_array() {
        *list = Value::Array(Vec::new());
    }
    if let Some(list) = list.as_array_mut() {
        match list
            .iter_mut()
            .find(|e| e.get("url").and_then(Value::as_str) == Some(url))
        {
            Some(e) => e["valueDate"] = value,
            None => list.push(json!({"url": url, "valueDate": value})),
        }
    }
}

/// Writes the priced values into a Contract (value, period, use period, status, the kept
/// enrolment date and the last payment date), keeping every other field, and returns what
/// differed from what it held. The status keeps the client's spelling (openIMIS writes
/// "Offered"/"Policy", FHIR "offered"/"policy").
pub fn apply(
    json: &mut Map<String, Value>,
    enroll: Date,
    v: &Valuation,
    a: &Activation,
) -> Vec<Replaced> {
    let mut replaced = Vec::new();
    let old_status = json.get("status").and_then(Value::as_str).map(String::from);
    let capital = old_status
        .as_deref()
        .is_some_and(|s| s.starts_with(|c: char| c.is_ascii_uppercase()));
    let status = match (a.active, capital) {
        (true, true) => "Policy",
        (true, false) => "policy",
        (false, true) => "Offered",
        (false, false) => "offered",
    };
    if !old_status
        .as_deref()
        .is_some_and(|s| s.eq_ignore_ascii_case(status))
    {
        replaced.push(Replaced {
            path: "Contract.status",
            sent: old_status,
            now: status.to_string(),
        });
        json.insert("status".into(), Value::String(status.into()));
    }
    let Some(asset) = asset_mut(json) else {
        return replaced;
    };
    let mut date = |asset: &mut Map<String, Value>, field: &str, idx: &str, path, d: Date| {
        let list = asset
            .entry(field)
            .or_insert_with(|| Value::Array(vec![json!({})]));
        if !list.get(0).is_some_and(Value::is_object) {
            *list = Value::Array(vec![json!({})]);
        }
        let Some(period) = list.get_mut(0).and_then(Value::as_object_mut) else {
            return;
        };
        let sent = period.get(idx).and_then(Value::as_str).map(String::from);
        if sent.as_deref().and_then(Date::parse) != Some(d) {
            replaced.push(Replaced {
                path,
                sent,
                now: d.to_string(),
            });
            period.insert(idx.into(), Value::String(d.to_string()));
        }
    };
    date(
        asset,
        "period",
        "start",
        "Contract.term[0].asset[0].period[0].start",
        v.start,
    );
    date(
        asset,
        "period",
        "end",
        "Contract.term[0].asset[0].period[0].end",
        v.expiry,
    );
    date(
        asset,
        "usePeriod",
        "start",
        "Contract.term[0].asset[0].usePeriod[0].start",
        a.effective.unwrap_or(v.start),
    );
    date(
        asset,
        "usePeriod",
        "end",
        "Contract.term[0].asset[0].usePeriod[0].end",
        v.expiry,
    );
    set_ext(
        asset,
        ENROLL_DATE_EXTENSION,
        Value::String(enroll.to_string()),
    );
    set_ext(
        asset,
        LAST_PAYMENT_EXTENSION,
        Value::String(v.last_payment.to_string()),
    );
    let items = asset
        .entry("valuedItem")
        .or_insert_with(|| Value::Array(vec![json!({})]));
    if let Some(item) = items.get_mut(0).and_then(Value::as_object_mut) {
        let net = item.entry("net").or_insert_with(|| json!({}));
        if !net.is_object() {
            *net = json!({});
        }
        let sent = net.get("value");
        if sent.and_then(Money::parse) != Some(v.value) {
            replaced.push(Replaced {
                path: "Contract.term[0].asset[0].valuedItem[0].net.value",
                sent: sent.map(|s| s.to_string()),
                now: v.value.to_string(),
            });
            net["value"] = v.value.to_json();
        }
    }
    replaced
}

/// Coverage `status` of a policy on `today`: openIMIS serves Idle as `draft` and Active as
/// `active`; a policy past its expiry is `cancelled` here (openIMIS marks it Expired in a
/// batch, served as `active`, its mapping's slip).
pub fn coverage_status(a: &Activation, v_expiry: Option<Date>, today: Date) -> &'static str {
    match (a.active, v_expiry) {
        (true, Some(e)) if today > e => "cancelled",
        (true, _) => "active",
        (false, _) => "draft",
    }
}

/// The `Coverage` openIMIS serves for a policy (read-only, derived from the Contract):
/// identifier the policy's, status, the head as policy holder, beneficiary and payor, the
/// period, the product as `class` plan, and the enrolment and effective dates as its two
/// `coverage-date` extensions (its double slash kept, as openIMIS writes it).
pub fn coverage(
    contract_id: &str,
    contract: &Map<String, Value>,
    product: Option<&Product>,
    head: Option<&Map<String, Value>>,
    today: Date,
) -> Value {
    let asset = asset(contract);
    let period = asset.and_then(|a| a.get("period")).and_then(|p| p.get(0));
    let use_period = asset
        .and_then(|a| a.get("usePeriod"))
        .and_then(|p| p.get(0));
    let get = |p: Option<&Value>, k: &str| {
        p.and_then(|p| p.get(k))
            .and_then(Value::as_str)
            .and_then(Date::parse)
    };
    let start = get(period, "start");
    let expiry = get(period, "end");
    let effective = get(use_period, "start");
    let active = contract
        .get("status")
        .and_then(Value::as_str)
        .is_some_and(|s| s.eq_ignore_ascii_case("policy"));
    let a = Activation {
        active,
        effective,
        paid: Money(0),
    };
    let mut out = json!({
        "resourceType": "Coverage",
        "id": contract_id,
        "identifier": [{"type": {"coding": [{"system": crate::identifiers::OPENIMIS_IDENTIFIER_TYPES, "code": "UUID"}]},
                        "value": contract_id}],
        "status": coverage_status(&a, expiry, today),
    });
    let mut ext = Vec::new();
    for d in [enroll_date_of(contract), effective.filter(|_| active)]
        .into_iter()
        .flatten()
    {
        ext.push(json!({"url": format!("{IG}//StructureDefinition/coverage-date"), "valueDate": d.to_string()}));
    }
    if !ext.is_empty() {
        out["extension"] = Value::Array(ext);
    }
    if let Some(head) = head {
        out["policyHolder"] = Value::Object(head.clone());
        out["beneficiary"] = Value::Object(head.clone());
        out["payor"] = json!([head]);
    }
    let mut p = Map::new();
    if let Some(s) = start {
        p.insert("start".into(), Value::String(s.to_string()));
    }
    if let Some(e) = expiry {
        p.insert("end".into(), Value::String(e.to_string()));
    }
    if !p.is_empty() {
        out["period"] = Value::Object(p);
    }
    if let Some(product) = product {
        let mut class = json!({"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/coverage-class",
            "code": "plan", "display": "Plan"}]}});
        class["value"] = json!(product.code.clone().unwrap_or_default());
        if let Some(name) = &product.name {
            class["name"] = json!(name);
        }
        out["class"] = json!([class]);
    }
    out
}

/// Reference-index pseudo type of a contribution's receipt within its product: entries
/// `(RECEIPT_INDEX, "", "<product>|<receipt>")` ([`receipt_keys`]), so a receipt used twice is
/// found by one lookup (openIMIS: receipt unique per product).
pub const RECEIPT_INDEX: &str = "urn:fieldmesh:premium-receipt";

/// The receipt keys of a Contract's contributions: the product it names (the identity its stored
/// reference carries) and each receipt.
pub fn receipt_keys(json: &Map<String, Value>) -> Vec<String> {
    let Some((_, product)) = product_reference(json).and_then(crate::references::logical_target)
    else {
        return Vec::new();
    };
    let mut out: Vec<String> = payments_of(json)
        .unwrap_or_default()
        .into_iter()
        .map(|p| format!("{}|{}", product.value, p.receipt))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What pricing a Contract reads besides the Contract: the node's store.
pub trait Lookup {
    /// The id and stored JSON of the resource a stored (logical) reference points at, if this
    /// node holds it.
    fn resolve(&mut self, reference: &Map<String, Value>) -> Option<(String, Map<String, Value>)>;
    /// The Contracts (id and stored JSON) that reference the resource `ty/id`.
    fn contracts_naming(&mut self, ty: &str, id: &str) -> Vec<(String, Map<String, Value>)>;
}

/// What pricing a Contract did.
#[derive(Debug, Clone, Default)]
pub struct Priced {
    /// The values replaced in what was sent.
    pub replaced: Vec<Replaced>,
    /// What the officer should know (not priced here and why, members above the maximum, a
    /// payment after the last payment date).
    pub warnings: Vec<String>,
    /// The value and dates, when the node could price it.
    pub valuation: Option<Valuation>,
}

fn birth_date(patient: &Map<String, Value>) -> Option<Date> {
    patient
        .get("birthDate")
        .and_then(Value::as_str)
        .and_then(Date::parse)
}

fn same_target(a: Option<&Map<String, Value>>, b: Option<&Map<String, Value>>) -> bool {
    let key = |r: Option<&Map<String, Value>>| r.and_then(crate::references::logical_target);
    key(a).is_some() && key(a) == key(b)
}

/// The birth dates of the members a Contract covers: those it names (`typeReference`), else
/// every member of its family (openIMIS's `get_members`); an error names what is not held.
fn members(json: &Map<String, Value>, lookup: &mut dyn Lookup) -> Result<Vec<Date>, String> {
    let mut refs: Vec<Map<String, Value>> = covered_references(json).into_iter().cloned().collect();
    if refs.is_empty() {
        let subject = subject_reference(json).ok_or("names no family")?;
        let (_, family) = lookup
            .resolve(subject)
            .ok_or("its family (subject) is not held on this device")?;
        if family.get("resourceType").and_then(Value::as_str) == Some("Patient") {
            return birth_date(&family)
                .map(|b| vec![b])
                .ok_or_else(|| "the insuree has no birthDate".to_string());
        }
        refs = family
            .get("member")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|m| m.get("inactive").and_then(Value::as_bool) != Some(true))
            .filter_map(|m| m.get("entity").and_then(Value::as_object).cloned())
            .collect();
        if refs.is_empty() {
            return Err("its family has no members".into());
        }
    }
    refs.iter()
        .map(|r| {
            let (id, patient) = lookup
                .resolve(r)
                .ok_or_else(|| "a member it covers is not held on this device".to_string())?;
            birth_date(&patient).ok_or_else(|| format!("insuree {id} has no birthDate"))
        })
        .collect()
}

/// The expiry of the policy a renewal renews: the latest of the family's other policies of the
/// same product.
fn previous_expiry(
    own_id: &str,
    json: &Map<String, Value>,
    lookup: &mut dyn Lookup,
) -> Option<Date> {
    let subject = subject_reference(json)?;
    let (family_id, family) = lookup.resolve(subject)?;
    let ty = family
        .get("resourceType")
        .and_then(Value::as_str)?
        .to_string();
    lookup
        .contracts_naming(&ty, &family_id)
        .into_iter()
        .filter(|(id, other)| {
            id != own_id && same_target(product_reference(json), product_reference(other))
        })
        .filter_map(|(_, other)| {
            asset(&other)?
                .get("period")?
                .get(0)?
                .get("end")?
                .as_str()
                .and_then(Date::parse)
        })
        .max()
}

/// Prices the Contract `json` (document `own_id`) on `today` from what `lookup` holds, writes the
/// value, dates and status into it ([`apply`]) and says what it replaced. A Contract whose
/// product or members this node does not hold is kept as sent, with a warning: central prices
/// it when it arrives there.
pub fn price_contract(
    json: &mut Map<String, Value>,
    own_id: &str,
    today: Date,
    lookup: &mut dyn Lookup,
) -> Result<Priced, ContractError> {
    let enroll = enroll_date_of(json).ok_or(ContractError::NoEnrollDate)?;
    let payments = payments_of(json)?;
    let product_ref = product_reference(json).ok_or(ContractError::NoProduct)?;
    subject_reference(json).ok_or(ContractError::NoSubject)?;
    let mut out = Priced::default();
    let later = "the value, dates and status are kept as sent; central computes them when the \
                 policy reaches it";
    let product = match lookup.resolve(product_ref) {
        Some((_, plan)) => match Product::from_insurance_plan(&plan) {
            Ok(p) => p,
            Err(e) => {
                out.warnings
                    .push(format!("the product cannot price a policy ({e}): {later}"));
                return Ok(out);
            }
        },
        None => {
            out.warnings
                .push(format!("the product is not held on this device: {later}"));
            return Ok(out);
        }
    };
    let members = match members(json, lookup) {
        Ok(m) => m,
        Err(why) => {
            out.warnings.push(format!("the policy {why}: {later}"));
            return Ok(out);
        }
    };
    let stage = stage_of(json);
    let previous = match stage {
        Stage::Renewal => {
            let p = previous_expiry(own_id, json, lookup);
            if p.is_none() {
                out.warnings.push(
                    "a renewal, but no earlier policy of this family and product is held here: \
                     no renewal discount"
                        .into(),
                );
            }
            p
        }
        Stage::New => None,
    };
    let v = value(&Terms {
        product: &product,
        stage,
        enroll,
        today,
        members: &members,
        previous_expiry: previous,
    });
    if v.above_max > 0 {
        out.warnings.push(format!(
            "{} members, the product covers at most {} (openIMIS: \
             policy.validation.members_count_above_max): the value counts {}",
            members.len(),
            product.max_members,
            product.max_members
        ));
    }
    for p in payments.iter().filter(|p| p.date > v.last_payment) {
        out.warnings.push(format!(
            "contribution {} was paid on {}, after the last payment date {}",
            p.receipt, p.date, v.last_payment
        ));
    }
    let a = activation(v.value, v.start, &payments);
    out.replaced = apply(json, enroll, &v, &a);
    out.valuation = Some(v);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_read_exactly_and_rounded_half_to_even() {
        let m = |s: &str| Money::parse(&serde_json::from_str(s).unwrap_or(Value::Null));
        assert_eq!(m("10000"), Some(Money(1_000_000)));
        assert_eq!(m("10000.0"), Some(Money(1_000_000)));
        assert_eq!(m("1250.5"), Some(Money(125_050)));
        assert_eq!(m("0.125"), Some(Money(12)));
        assert_eq!(m("0.135"), Some(Money(14)));
        assert_eq!(m("0.1251"), Some(Money(13)));
        assert_eq!(m("\"12.30\""), Some(Money(1230)));
        assert_eq!(m("-1"), None);
        assert_eq!(m("\"abc\""), None);
        assert_eq!(Money(125_050).to_string(), "1250.50");
        assert_eq!(discounted(Money(10030), 5), Money(9528)); // 95.285 → 95.28
        assert_eq!(discounted(Money(10010), 5), Money(9510)); // 95.095 → 95.10
    }
}
