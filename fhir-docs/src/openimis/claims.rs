//! Claims: openIMIS's checks of a claim (`claim/validations.py`, `validate_claim`), ported to
//! run wherever the data is: on a claim administrator's device with what it holds, and on
//! central with everything.
//!
//! [`evaluate`] takes what the checks read — the claim ([`ClaimFacts`]), the insuree, the
//! policies that cover it, the facility, its price list, the items and services the claim
//! names, and the earlier claims of the insuree ([`History`]) — and gives a [`Verdict`] in
//! openIMIS's order with its rejection reason codes:
//!
//! 1. dates: a claim without a start, or claimed before it started, is rejected (9);
//! 2. the insuree: still valid with its family (7), covered by a policy in force on the
//!    target date (21); either rejects the whole claim (its items take 7, as openIMIS's
//!    `Claim.reject` gives them);
//! 3. the claim's category against the product's maximum number of claims of that category in
//!    the policy period (11–15, 19: every line rejected);
//! 4. per item and service, stopping at the first failure: still valid (1; not yet valid: 9),
//!    in the facility's price list (2), care type (10), patient category (4), frequency (5),
//!    a product of the insuree's policies covering it (3), its waiting period (17), the
//!    quantity the product allows in the policy period (16: reduced to what is left, rejected
//!    when nothing is);
//! 5. every line rejected: the claim is rejected (1); otherwise it is checked.
//!
//! Checks whose data a node may not hold all of are [`Check`]s a verdict names as
//! provisional: a device holds the insurees of its catchment and the claims of its facility,
//! not the insuree from another district nor its claims elsewhere. Central, holding
//! everything, gives the authoritative verdict.
//!
//! **Prices.** openIMIS stores what the facility asked (`unitPrice`, `price_asked`) and values
//! claims at the price list's price (price origin `P`: the facility's override, else the item's
//! or service's price). Here too: the price list wins for what is approved, because it is the
//! tariff central agreed with the facility and a device could otherwise set its own prices;
//! the asked price is kept as sent (a line without one takes the list price, as the claims
//! app fills it), and a difference is said in the answer.
//!
//! The FHIR form of what openIMIS's FHIR API does not carry: a facility's price list is a
//! `List` ([`crate::profile::PRICE_LIST_PROFILE`]) whose `subject` is the facility and whose
//! entries name a Medication or ActivityDefinition, with the facility's own price in a
//! [`crate::profile::PRICE_OVERRIDE_EXTENSION`]; what a product covers is an
//! `InsurancePlan.coverage` of type `item` or `service` ([`COVER_SYSTEM`]) with one `benefit`
//! per item or service (`type` its code) whose `limit`s are `limitNoAdult`, `limitNoChild`
//! (quantity in the policy period), `waitingPeriodAdult`, `waitingPeriodChild` (months); the
//! product's maximum claims per category are `limit`s `maxNoConsultation`, `maxNoSurgery`,
//! `maxNoDelivery`, `maxNoAntenatal`, `maxNoHospitalization`, `maxNoVisits` of any benefit.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::IG;
use super::dates::Date;
use super::policy::{AGE_OF_MAJORITY, Money, Stage};
use crate::identifiers::OPENIMIS_IDENTIFIER_TYPES;

/// System of claim statuses in adjudications (openIMIS `CodeSystem/claim-status`).
pub const CLAIM_STATUS_SYSTEM: &str = concat!(
    "https://openimis.github.io/openimis_fhir_r4_ig",
    "/CodeSystem/claim-status"
);
/// System of rejection reasons (openIMIS `CodeSystem/claim-rejection-reasons`).
pub const REJECTION_SYSTEM: &str = concat!(
    "https://openimis.github.io/openimis_fhir_r4_ig",
    "/CodeSystem/claim-rejection-reasons"
);
/// Coverage type system of what a product covers (`item` or `service`).
pub const COVER_SYSTEM: &str = "urn:fieldmesh:CodeSystem/product-cover";
/// Extension of a ClaimResponse a device gave: the checks it could not evaluate with all the
/// data (`valueCode` per sub-extension `check`). Central's verdict carries none.
pub const PROVISIONAL_EXTENSION: &str = "urn:fieldmesh:StructureDefinition/claim-provisional";

/// Rejection reasons (openIMIS `claim/validations.py`, FHIR `claim-rejection-reasons`).
pub mod reason {
    /// Accepted.
    pub const ACCEPTED: u8 = 0;
    /// Invalid item or service (also: every line rejected).
    pub const INVALID_ITEM_OR_SERVICE: u8 = 1;
    /// Not in the facility's price list.
    pub const NOT_IN_PRICE_LIST: u8 = 2;
    /// No policy product covers it.
    pub const NO_PRODUCT_FOUND: u8 = 3;
    /// Patient category (gender, age) excluded.
    pub const CATEGORY_LIMITATION: u8 = 4;
    /// Given again too soon.
    pub const FREQUENCY_FAILURE: u8 = 5;
    /// Insuree or family no longer valid.
    pub const FAMILY: u8 = 7;
    /// Dates.
    pub const TARGET_DATE: u8 = 9;
    /// Care type (in/out-patient) of the facility.
    pub const CARE_TYPE: u8 = 10;
    /// Maximum hospital admissions.
    pub const MAX_HOSPITAL_ADMISSIONS: u8 = 11;
    /// Maximum visits.
    pub const MAX_VISITS: u8 = 12;
    /// Maximum consultations.
    pub const MAX_CONSULTATIONS: u8 = 13;
    /// Maximum surgeries.
    pub const MAX_SURGERIES: u8 = 14;
    /// Maximum deliveries.
    pub const MAX_DELIVERIES: u8 = 15;
    /// Quantity over the limit.
    pub const QTY_OVER_LIMIT: u8 = 16;
    /// Waiting period.
    pub const WAITING_PERIOD: u8 = 17;
    /// Maximum antenatal care.
    pub const MAX_ANTENATAL: u8 = 19;
    /// The claim cannot be read.
    pub const INVALID_CLAIM: u8 = 20;
    /// No policy in force.
    pub const NO_COVERAGE: u8 = 21;

    /// openIMIS's display of a reason (`ClaimResponseMapping.rejection_reason`).
    pub fn display(code: u8) -> &'static str {
        match code {
            0 => "ACCEPTED",
            1 => "INVALID ITEM OR SERVICE",
            2 => "NOT IN PRICE LIST",
            3 => "NO PRODUCT FOUND",
            4 => "CATEGORY LIMITATION",
            5 => "FREQUENCY FAILURE",
            6 => "DUPLICATED",
            7 => "FAMILY",
            8 => "DIAGNOSIS NOT IN LIST",
            9 => "TARGET DATE",
            10 => "CARE TYPE",
            11 => "MAX HOSPITAL ADMISSIONS",
            12 => "MAX VISITS",
            13 => "MAX CONSULTATIONS",
            14 => "MAX SURGERIES",
            15 => "MAX DELIVERIES",
            16 => "QTY OVER LIMIT",
            17 => "WAITING PERIOD FAIL",
            19 => "MAX ANTENATAL",
            20 => "INVALID CLAIM",
            21 => "NO COVERAGE",
            _ => "REJECTED",
        }
    }
}

/// Item (Medication) or service (ActivityDefinition).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A medical item.
    Item,
    /// A medical service.
    Service,
}

impl Kind {
    /// The resource type of its definitions.
    pub fn resource_type(self) -> &'static str {
        match self {
            Kind::Item => "Medication",
            Kind::Service => "ActivityDefinition",
        }
    }
    fn of_resource_type(ty: &str) -> Option<Kind> {
        match ty {
            "Medication" => Some(Kind::Item),
            "ActivityDefinition" => Some(Kind::Service),
            _ => None,
        }
    }
}

/// Why a Claim cannot be checked at all (the write is refused with 422).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// A line's `category.text` is neither `item` nor `service` and its reference says neither.
    #[error(
        "Claim.item[{0}]: neither an item nor a service (category.text `item` or `service`, or a reference to a Medication or ActivityDefinition)"
    )]
    LineKind(usize),
    /// A line names no item or service.
    #[error(
        "Claim.item[{0}]: names no item or service (extension claim-item-reference or productOrService.text)"
    )]
    LineTarget(usize),
    /// A line's quantity is not a positive number.
    #[error("Claim.item[{0}].quantity.value: not a positive number")]
    Quantity(usize),
    /// A line's unit price is not an amount.
    #[error("Claim.item[{0}].unitPrice.value: not an amount")]
    Price(usize),
    /// A date is not `YYYY-MM-DD` (a time after it is accepted).
    #[error("Claim.{0}: not a date")]
    Date(&'static str),
    /// Too many lines.
    #[error("Claim.item: {0} lines, more than the {MAX_LINES} a claim may have")]
    TooManyLines(usize),
    /// Two lines with one `sequence`.
    #[error("Claim.item[{0}].sequence: {1} is the sequence of an earlier line")]
    DuplicateSequence(usize, u64),
}

/// Lines a claim may have (openIMIS's claim forms hold far fewer).
pub const MAX_LINES: usize = 200;

/// One item or service line of a claim.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// Position in `Claim.item` (0-based).
    pub index: usize,
    /// `sequence`, else the position from 1.
    pub sequence: u64,
    /// Item or service.
    pub kind: Kind,
    /// The reference to its definition (the first extension's `valueReference`, as openIMIS
    /// reads it), else one by code built from `productOrService`.
    pub reference: Map<String, Value>,
    /// The code the client gave (`productOrService.text` or its first coding).
    pub code: Option<String>,
    /// `quantity.value` (1 when absent, as openIMIS's default).
    pub quantity: f64,
    /// `unitPrice.value`: the price the facility asks.
    pub asked: Option<Money>,
}

/// What the checks read of a Claim.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimFacts {
    /// The claim code (identifier typed `Code` or `MR`).
    pub code: Option<String>,
    /// `created`: the date claimed.
    pub claimed: Option<Date>,
    /// `billablePeriod.start`.
    pub from: Option<Date>,
    /// `billablePeriod.end`.
    pub to: Option<Date>,
    /// The lines.
    pub lines: Vec<Line>,
}

fn date_of(v: Option<&Value>, field: &'static str) -> Result<Option<Date>, ClaimError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Date::parse(s.get(..10).unwrap_or(s))
            .map(Some)
            .ok_or(ClaimError::Date(field)),
        Some(_) => Err(ClaimError::Date(field)),
    }
}

/// A logical reference to the item or service of `kind` with openIMIS code `code`.
pub fn code_reference(kind: Kind, code: &str) -> Map<String, Value> {
    let v = json!({"type": kind.resource_type(),
        "identifier": {"type": {"coding": [{"system": OPENIMIS_IDENTIFIER_TYPES, "code": "Code"}]}, "value": code}});
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// The claim code of a Claim: its identifier typed `Code` or `MR` (openIMIS's config says `MR`,
/// its apps and tests send `Code`).
pub fn claim_code(json: &Map<String, Value>) -> Option<String> {
    // The key the identifier index files it under: one code, whichever of openIMIS's type
    // codes (and spellings of its system) the client used.
    let code_system = crate::identifiers::IdentKey::openimis_code("").system;
    crate::identifiers::identifier_keys(json)
        .into_iter()
        .find(|k| k.system == code_system)
        .map(|k| k.value)
}

/// Where a claim stands in the order claims are checked ([`order_key`]): date claimed, claim
/// code, id.
pub type OrderKey = (String, String, String);

/// The order claims are checked in, as openIMIS checks them in the order they are submitted:
/// the date claimed, then the claim code (a device's leased codes count up), then the id. A
/// claim's history is the claims before it in this order, so every node that holds the same
/// claims gives the same verdicts, whatever order they arrived in.
pub fn order_key(json: &Map<String, Value>, id: &str) -> OrderKey {
    let created = json
        .get("created")
        .and_then(Value::as_str)
        .map(|s| s.get(..10).unwrap_or(s).to_string())
        .unwrap_or_default();
    (
        created,
        claim_code(json).unwrap_or_default(),
        id.to_string(),
    )
}

impl ClaimFacts {
    /// Reads a Claim (stored or as posted).
    pub fn parse(json: &Map<String, Value>) -> Result<ClaimFacts, ClaimError> {
        let period = json.get("billablePeriod");
        let from = date_of(period.and_then(|p| p.get("start")), "billablePeriod.start")?;
        let to = date_of(period.and_then(|p| p.get("end")), "billablePeriod.end")?;
        let claimed = date_of(json.get("created"), "created")?;
        let items = json
            .get("item")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if items.len() > MAX_LINES {
            return Err(ClaimError::TooManyLines(items.len()));
        }
        let mut lines = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let reference = item
                .get("extension")
                .and_then(|e| e.get(0))
                .and_then(|e| e.get("valueReference"))
                .and_then(Value::as_object);
            let ref_kind = reference.and_then(|r| {
                r.get("type")
                    .and_then(Value::as_str)
                    .and_then(Kind::of_resource_type)
                    .or_else(|| {
                        r.get("reference")
                            .and_then(Value::as_str)
                            .and_then(|s| s.split_once('/'))
                            .and_then(|(t, _)| Kind::of_resource_type(t))
                    })
            });
            let kind = match item.pointer("/category/text").and_then(Value::as_str) {
                Some(t) if t.eq_ignore_ascii_case("item") => Kind::Item,
                Some(t) if t.eq_ignore_ascii_case("service") => Kind::Service,
                _ => ref_kind.ok_or(ClaimError::LineKind(i))?,
            };
            let code = item
                .pointer("/productOrService/text")
                .or_else(|| item.pointer("/productOrService/coding/0/code"))
                .and_then(Value::as_str)
                .map(String::from);
            let reference = match (reference, &code) {
                (Some(r), _) => r.clone(),
                (None, Some(c)) => code_reference(kind, c),
                (None, None) => return Err(ClaimError::LineTarget(i)),
            };
            let quantity = match item.pointer("/quantity/value") {
                None | Some(Value::Null) => 1.0,
                Some(v) => v
                    .as_f64()
                    .filter(|q| q.is_finite() && *q > 0.0 && *q < 1e9)
                    .ok_or(ClaimError::Quantity(i))?,
            };
            let asked = match item.pointer("/unitPrice/value") {
                None | Some(Value::Null) => None,
                Some(v) => Some(Money::parse(v).ok_or(ClaimError::Price(i))?),
            };
            let sequence = item
                .get("sequence")
                .and_then(Value::as_u64)
                .unwrap_or(i as u64 + 1);
            if lines.iter().any(|l: &Line| l.sequence == sequence) {
                return Err(ClaimError::DuplicateSequence(i, sequence));
            }
            lines.push(Line {
                index: i,
                sequence,
                kind,
                reference,
                code,
                quantity,
                asked,
            });
        }
        Ok(ClaimFacts {
            code: claim_code(json),
            claimed,
            from,
            to,
            lines,
        })
    }

    /// The target date: the end of the stay, else the day of the visit.
    pub fn target(&self) -> Option<Date> {
        self.to.or(self.from)
    }

    /// A stay (hospitalisation): the end differs from the start.
    pub fn inpatient(&self) -> bool {
        matches!((self.from, self.to), (Some(f), Some(t)) if f != t)
    }
}

fn extension<'a>(json: &'a Map<String, Value>, suffix: &str) -> Option<&'a Value> {
    json.get("extension")?.as_array()?.iter().find(|e| {
        e.get("url")
            .and_then(Value::as_str)
            .is_some_and(|u| u.ends_with(suffix))
    })
}

fn codes_of(concept: Option<&Value>) -> Vec<String> {
    concept
        .and_then(|c| c.get("coding"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("code").and_then(Value::as_str).map(String::from))
        .collect()
}

/// An item (Medication) or service (ActivityDefinition) as the checks read it.
#[derive(Debug, Clone, PartialEq)]
pub struct Medical {
    /// Its id on this node.
    pub id: String,
    /// Its code (identifier typed `Code`).
    pub code: Option<String>,
    /// Item or service.
    pub kind: Kind,
    /// Still valid (`status` not `inactive` / `entered-in-error`).
    pub valid: bool,
    /// Valid from (`effectivePeriod.start` of a service).
    pub valid_from: Option<Date>,
    /// Its price (the `unit-price` extension, under either URL openIMIS uses).
    pub price: Option<Money>,
    /// `O` out-patient, `I` in-patient, `B` both (venue `AMB` / `IMP`).
    pub care_type: char,
    /// openIMIS's patient category bitmask: 1 male, 2 female, 4 adult, 8 minor; 0 everyone.
    pub patient_category: u8,
    /// Days before it may be given again to the same insuree.
    pub frequency: Option<u32>,
    /// A service's category (openIMIS `Service.category`: S surgery, D delivery, A antenatal,
    /// H hospitalisation, C consultation, O other, V visit), from its `workflow` use context.
    pub category: Option<char>,
}

/// openIMIS's patient category bits.
pub mod category_mask {
    /// Men (and gender "other").
    pub const MALE: u8 = 1;
    /// Women.
    pub const FEMALE: u8 = 2;
    /// Adults (age of majority reached on the target date).
    pub const ADULT: u8 = 4;
    /// Minors.
    pub const MINOR: u8 = 8;
}

impl Medical {
    /// Reads a Medication or ActivityDefinition; `None` for other types.
    pub fn from_json(id: &str, json: &Map<String, Value>) -> Option<Medical> {
        let kind = Kind::of_resource_type(json.get("resourceType")?.as_str()?)?;
        let code = crate::identifiers::identifier_keys(json)
            .into_iter()
            .find(|k| k.system == crate::identifiers::IdentKey::openimis_code("").system)
            .map(|k| k.value)
            .or_else(|| {
                (kind == Kind::Service)
                    .then(|| json.get("name").and_then(Value::as_str).map(String::from))
                    .flatten()
            });
        let valid = !matches!(
            json.get("status").and_then(Value::as_str),
            Some("inactive" | "entered-in-error" | "retired")
        );
        let valid_from = json
            .get("effectivePeriod")
            .and_then(|p| p.get("start"))
            .and_then(Value::as_str)
            .and_then(|s| Date::parse(s.get(..10).unwrap_or(s)));
        let price = extension(json, "unit-price")
            .and_then(|e| e.pointer("/valueMoney/value"))
            .and_then(Money::parse);
        // Use contexts: an ActivityDefinition's `useContext`, a Medication's usage-context
        // extension (each sub-extension a `valueUsageContext`).
        let mut contexts: Vec<&Value> = json
            .get("useContext")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .collect();
        if let Some(e) = extension(json, "medication-usage-context") {
            contexts.extend(
                e.get("extension")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.get("valueUsageContext")),
            );
        }
        let (mut gender, mut age, mut venue, mut category) = (None, None, None, None);
        for c in contexts {
            let what = c
                .pointer("/code/code")
                .and_then(Value::as_str)
                .unwrap_or("");
            let codes = codes_of(c.get("valueCodeableConcept"));
            match what {
                "gender" => {
                    let mut m = 0;
                    for g in &codes {
                        m |= match g.as_str() {
                            "male" | "M" => category_mask::MALE,
                            "female" | "F" => category_mask::FEMALE,
                            _ => 0,
                        };
                    }
                    gender = Some(m);
                }
                "age" => {
                    let mut m = 0;
                    for a in &codes {
                        m |= match a.as_str() {
                            "adult" => category_mask::ADULT,
                            "child" => category_mask::MINOR,
                            _ => 0,
                        };
                    }
                    age = Some(m);
                }
                "venue" => {
                    let amb = codes.iter().any(|c| c == "AMB");
                    let imp = codes.iter().any(|c| c == "IMP");
                    venue = Some(match (amb, imp) {
                        (true, false) => 'O',
                        (false, true) => 'I',
                        _ => 'B',
                    });
                }
                "workflow" => category = codes.first().and_then(|c| c.chars().next()),
                _ => {}
            }
        }
        // openIMIS ORs the flags the contexts give (an item naming genders but no ages
        // excludes everyone, as there); none at all: 0, everyone.
        let patient_category = gender.unwrap_or(0) | age.unwrap_or(0);
        let timing = extension(json, "medication-frequency")
            .and_then(|e| e.get("valueTiming"))
            .or_else(|| json.get("timingTiming"));
        let frequency = timing
            .and_then(|t| t.pointer("/repeat/period"))
            .and_then(Value::as_f64)
            .filter(|p| *p >= 1.0 && *p < 100_000.0)
            .map(|p| p as u32);
        Some(Medical {
            id: id.to_string(),
            code,
            kind,
            valid,
            valid_from,
            price,
            care_type: venue.unwrap_or('B'),
            patient_category,
            frequency,
            category: if kind == Kind::Service {
                category
            } else {
                None
            },
        })
    }

    /// Whether a reference or code names it: its id or its code.
    fn named_by(&self, names: &[String]) -> bool {
        names
            .iter()
            .any(|n| *n == self.id || self.code.as_deref() == Some(n.as_str()))
    }
}

/// A health facility's care type (`organization-hf-care-type`: `O` out-patient, `I`
/// in-patient, `B` both, the default).
pub fn facility_care_type(org: &Map<String, Value>) -> char {
    extension(org, "organization-hf-care-type")
        .and_then(|e| e.pointer("/valueCodeableConcept/coding/0/code"))
        .and_then(Value::as_str)
        .and_then(|s| s.chars().next())
        .unwrap_or('B')
}

/// The names a reference gives its target: the id of a relative reference, the identifier's
/// value, the stored identity's value.
fn reference_names(r: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(s) = r.get("reference").and_then(Value::as_str)
        && let Some((_, id)) = s.rsplit_once('/')
    {
        out.push(id.to_string());
    }
    if let Some(v) = r.pointer("/identifier/value").and_then(Value::as_str) {
        out.push(v.to_string());
    }
    if let Some(v) = r
        .as_object()
        .and_then(crate::references::stored_target)
        .and_then(|t| t.get("value"))
        .and_then(Value::as_str)
    {
        out.push(v.to_string());
    }
    out
}

/// A facility's price list ([`crate::profile::PRICE_LIST_PROFILE`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PriceList {
    /// Per entry: the names of the item or service, and the facility's own price.
    pub entries: Vec<(Vec<String>, Option<Money>)>,
}

impl PriceList {
    /// Reads a price-list `List`; `None` for anything else.
    pub fn from_json(json: &Map<String, Value>) -> Option<PriceList> {
        if !is_price_list(json) {
            return None;
        }
        let entries = json
            .get("entry")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|e| e.get("deleted").and_then(Value::as_bool) != Some(true))
            .filter_map(|e| {
                let names = reference_names(e.get("item")?);
                let over = extension(e.as_object()?, "price-override")
                    .and_then(|x| x.pointer("/valueMoney/value"))
                    .and_then(Money::parse);
                (!names.is_empty()).then_some((names, over))
            })
            .collect();
        Some(PriceList { entries })
    }

    /// Whether the list holds `m`, and at what price: the facility's own, else `m`'s.
    pub fn price_of(&self, m: &Medical) -> Option<Option<Money>> {
        self.entries
            .iter()
            .find(|(names, _)| m.named_by(names))
            .map(|(_, over)| over.or(m.price))
    }
}

/// Reference-index pseudo type of price lists by the facility they are for: entries
/// `(PRICE_LIST_INDEX, "", "<system>|<value>")` of the facility's identity the `subject` names
/// ([`price_list_keys`]), so a claim's check finds its facility's list without reading every
/// document that names the facility.
pub const PRICE_LIST_INDEX: &str = "urn:fieldmesh:price-list";

/// The keys a price list is indexed under ([`PRICE_LIST_INDEX`]): its subject's stored identity.
pub fn price_list_keys(json: &Map<String, Value>) -> Vec<String> {
    if !is_price_list(json) {
        return Vec::new();
    }
    json.get("subject")
        .and_then(Value::as_object)
        .and_then(crate::references::logical_target)
        .map(|(_, k)| vec![format!("{}|{}", k.system, k.value)])
        .unwrap_or_default()
}

/// Whether a `List` is a price list.
pub fn is_price_list(json: &Map<String, Value>) -> bool {
    json.get("resourceType").and_then(Value::as_str) == Some("List")
        && json
            .get("meta")
            .and_then(|m| m.get("profile"))
            .and_then(Value::as_array)
            .is_some_and(|p| {
                p.iter()
                    .any(|p| p.as_str() == Some(crate::profile::PRICE_LIST_PROFILE))
            })
}

/// Waiting periods are read up to this many months.
pub const MAX_WAITING_MONTHS: f64 = 1200.0;

/// What a product covers of one item or service (openIMIS `ProductItem` / `ProductService`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cover {
    /// Quantity an adult may receive in the policy period.
    pub limit_adult: Option<f64>,
    /// Quantity a minor may receive in the policy period.
    pub limit_child: Option<f64>,
    /// Months after the insuree's policy took effect before an adult is covered for it.
    pub waiting_adult: Option<i32>,
    /// The same for a minor.
    pub waiting_child: Option<i32>,
}

/// What a product (InsurancePlan) covers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProductCover {
    /// By kind and the item's or service's code.
    pub covers: HashMap<(Kind, String), Cover>,
    /// Maximum claims per claim category in the policy period.
    pub maxima: HashMap<char, u32>,
}

impl ProductCover {
    /// Reads an InsurancePlan.
    pub fn from_insurance_plan(plan: &Map<String, Value>) -> ProductCover {
        let mut out = ProductCover::default();
        for cov in plan
            .get("coverage")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let kind = match codes_of(cov.get("type")).first().map(String::as_str) {
                Some("item") => Some(Kind::Item),
                Some("service") => Some(Kind::Service),
                _ => None,
            };
            for b in cov
                .get("benefit")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let mut cover = Cover::default();
                for l in b
                    .get("limit")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let Some(code) = codes_of(l.get("code")).into_iter().next() else {
                        continue;
                    };
                    let Some(v) = l.pointer("/value/value").and_then(Value::as_f64) else {
                        continue;
                    };
                    if !(0.0..1e9).contains(&v) {
                        continue;
                    }
                    // Months beyond a century mean nothing and would cost the month arithmetic.
                    let months = v.min(MAX_WAITING_MONTHS) as i32;
                    match code.as_str() {
                        "limitNoAdult" => cover.limit_adult = Some(v),
                        "limitNoChild" => cover.limit_child = Some(v),
                        "waitingPeriodAdult" => cover.waiting_adult = Some(months),
                        "waitingPeriodChild" => cover.waiting_child = Some(months),
                        other => {
                            let cat = match other {
                                "maxNoConsultation" => 'C',
                                "maxNoSurgery" => 'S',
                                "maxNoDelivery" => 'D',
                                "maxNoAntenatal" => 'A',
                                "maxNoHospitalization" => 'H',
                                "maxNoVisits" => 'V',
                                _ => continue,
                            };
                            out.maxima.insert(cat, v as u32);
                        }
                    }
                }
                if let Some(kind) = kind
                    && let Some(code) = codes_of(b.get("type")).into_iter().next()
                {
                    out.covers.insert((kind, code), cover);
                }
            }
        }
        out
    }

    fn cover_of(&self, m: &Medical) -> Option<&Cover> {
        [m.code.as_deref(), Some(m.id.as_str())]
            .into_iter()
            .flatten()
            .find_map(|k| self.covers.get(&(m.kind, k.to_string())))
    }
}

/// The insuree as the checks read it.
#[derive(Debug, Clone, PartialEq)]
pub struct Insuree {
    /// Still valid (`active` not false).
    pub valid: bool,
    /// Belongs to a family that is still valid.
    pub family_valid: bool,
    /// Gender male or other (openIMIS's mask counts "other" with men).
    pub male: bool,
    /// Birth date.
    pub birth: Option<Date>,
}

impl Insuree {
    /// Reads a Patient; `family_valid` is the caller's to decide (its family may lie elsewhere).
    pub fn from_patient(json: &Map<String, Value>, family_valid: bool) -> Insuree {
        Insuree {
            valid: json.get("active").and_then(Value::as_bool) != Some(false),
            family_valid,
            male: matches!(
                json.get("gender").and_then(Value::as_str),
                Some("male" | "other")
            ),
            birth: json
                .get("birthDate")
                .and_then(Value::as_str)
                .and_then(Date::parse),
        }
    }

    /// Adult on `day`: the age of majority reached.
    pub fn adult_on(&self, day: Date) -> bool {
        self.birth
            .is_some_and(|b| b <= day.years_before(AGE_OF_MAJORITY))
    }

    fn mask_on(&self, day: Date) -> u8 {
        (if self.male {
            category_mask::MALE
        } else {
            category_mask::FEMALE
        }) | if self.adult_on(day) {
            category_mask::ADULT
        } else {
            category_mask::MINOR
        }
    }
}

/// A policy covering the insuree.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyFacts {
    /// Its id here.
    pub id: String,
    /// Active (or expired since): it was paid.
    pub active: bool,
    /// Effective date.
    pub effective: Option<Date>,
    /// Expiry date.
    pub expiry: Option<Date>,
    /// New or renewal.
    pub stage: Stage,
    /// What its product covers (`None`: the product is not held).
    pub product: Option<ProductCover>,
}

impl PolicyFacts {
    fn in_force(&self, day: Date) -> bool {
        self.active
            && self.effective.is_some_and(|e| e <= day)
            && self.expiry.is_some_and(|x| x >= day)
    }
}

/// A line of an earlier claim of the insuree that passed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriorLine {
    /// Item or service.
    pub kind: Kind,
    /// Its definition's id.
    pub id: String,
    /// The earlier claim's target date.
    pub target: Date,
    /// Quantity approved.
    pub quantity: f64,
}

/// The earlier claims of the insuree that were checked (status above entered), other than the
/// one being checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// Their lines that passed.
    pub lines: Vec<PriorLine>,
    /// Their target dates and categories.
    pub claims: Vec<(Date, char)>,
}

/// A check whose data a node may not hold in full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    /// The insuree and its family (7): not held here.
    Insuree,
    /// Policies in force (21), the product (3), waiting periods (17).
    Coverage,
    /// Patient category (4): the insuree's gender and age are not held here.
    PatientCategory,
    /// Frequency (5), quantity limits (16), claims per category (11–15, 19): claims at other
    /// facilities are not held here.
    History,
}

impl Check {
    /// Its name in the answer.
    pub fn name(self) -> &'static str {
        match self {
            Check::Insuree => "insuree",
            Check::Coverage => "coverage",
            Check::PatientCategory => "patient-category",
            Check::History => "history",
        }
    }
}

/// What [`evaluate`] reads.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// The claim.
    pub claim: &'a ClaimFacts,
    /// The insuree, if held.
    pub insuree: Option<Insuree>,
    /// The insuree's policies (meaningful when the insuree is held).
    pub policies: Vec<PolicyFacts>,
    /// The facility's care type, if the facility is held.
    pub facility_care_type: Option<char>,
    /// The facility's price list, if held.
    pub price_list: Option<PriceList>,
    /// Per line (same order), its item or service, if held.
    pub medical: Vec<Option<Medical>>,
    /// The earlier checked claims of the insuree held here.
    pub history: History,
    /// Whether this node holds every claim of every insuree (central): the history is complete.
    pub complete: bool,
}

/// The verdict on one line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineVerdict {
    /// `sequence` of the line.
    pub sequence: u64,
    /// Item or service.
    pub kind: Kind,
    /// Its definition's id, when held.
    pub id: Option<String>,
    /// Rejection reason (0: passed).
    pub reason: u8,
    /// Quantity provided.
    pub quantity: f64,
    /// Quantity approved when the product's limit reduced it.
    pub approved: Option<f64>,
    /// Price asked, in hundredths.
    pub asked: Option<i64>,
    /// Price-list price, in hundredths.
    pub price: Option<i64>,
}

impl LineVerdict {
    /// The quantity that counts: approved, else provided.
    pub fn counted(&self) -> f64 {
        self.approved.unwrap_or(self.quantity)
    }
}

/// The verdict on a claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Rejected as a whole (openIMIS status 1), else checked (4).
    pub rejected: bool,
    /// Claim-level reasons (dates, insuree, coverage, category maxima, all lines rejected).
    pub errors: Vec<u8>,
    /// Per line.
    pub lines: Vec<LineVerdict>,
    /// The claim's target date.
    pub target: Option<Date>,
    /// The claim's category.
    pub category: char,
    /// Checks evaluated with data the node may not hold in full.
    pub provisional: Vec<Check>,
}

impl Verdict {
    /// The verdict on a claim that cannot be read at all (central's answer to one a device
    /// should have refused): rejected, openIMIS's "invalid claim" (20).
    pub fn invalid() -> Verdict {
        Verdict {
            rejected: true,
            errors: vec![reason::INVALID_CLAIM],
            lines: Vec::new(),
            target: None,
            category: 'V',
            provisional: Vec::new(),
        }
    }
}

const CATEGORY_ORDER: [char; 7] = ['S', 'D', 'A', 'H', 'C', 'O', 'V'];

/// openIMIS's `get_claim_category`: the first of surgery, delivery, antenatal,
/// hospitalisation (also any stay), consultation, other among the claim's services, else visit.
/// (openIMIS's FHIR API never sets a claim's category explicitly.)
pub fn claim_category(claim: &ClaimFacts, services: &[Option<char>]) -> char {
    let mut present: Vec<char> = services.iter().flatten().copied().collect();
    if claim.inpatient() {
        present.push('H');
    }
    CATEGORY_ORDER
        .into_iter()
        .find(|c| present.contains(c))
        .unwrap_or('V')
}

fn category_reason(c: char) -> Option<u8> {
    Some(match c {
        'C' => reason::MAX_CONSULTATIONS,
        'S' => reason::MAX_SURGERIES,
        'D' => reason::MAX_DELIVERIES,
        'A' => reason::MAX_ANTENATAL,
        'H' => reason::MAX_HOSPITAL_ADMISSIONS,
        'V' => reason::MAX_VISITS,
        _ => return None,
    })
}

/// Runs openIMIS's checks (see the module's documentation).
pub fn evaluate(inputs: &Inputs<'_>) -> Verdict {
    let claim = inputs.claim;
    let mut provisional = Vec::new();
    if !inputs.complete {
        provisional.push(Check::History);
    }
    if inputs.insuree.is_none() && !inputs.complete {
        provisional.extend([Check::Insuree, Check::Coverage, Check::PatientCategory]);
    }
    // openIMIS derives the category from the claim's services that are in the facility's
    // price list (valid on the target date).
    let services: Vec<Option<char>> = inputs
        .medical
        .iter()
        .map(|m| {
            m.as_ref()
                .filter(|m| {
                    m.valid
                        && claim
                            .target()
                            .is_none_or(|t| m.valid_from.is_none_or(|f| f <= t))
                        && inputs
                            .price_list
                            .as_ref()
                            .is_some_and(|p| p.price_of(m).is_some())
                })
                .and_then(|m| m.category)
        })
        .collect();
    let category = claim_category(claim, &services);
    let mut lines: Vec<LineVerdict> = claim
        .lines
        .iter()
        .zip(inputs.medical.iter().chain(std::iter::repeat(&None)))
        .map(|(l, m)| LineVerdict {
            sequence: l.sequence,
            kind: l.kind,
            id: m.as_ref().map(|m| m.id.clone()),
            reason: 0,
            quantity: l.quantity,
            approved: None,
            asked: l.asked.map(|a| a.0),
            price: None,
        })
        .collect();
    let target = claim.target();
    let reject_all = |lines: &mut Vec<LineVerdict>, code: u8| {
        for l in lines.iter_mut() {
            l.reason = code;
        }
    };
    let finish = |lines: Vec<LineVerdict>, errors: Vec<u8>, provisional: Vec<Check>| Verdict {
        rejected: true,
        errors,
        lines,
        target,
        category,
        provisional,
    };
    // 1. Dates.
    let (Some(from), Some(target)) = (claim.from, target) else {
        reject_all(&mut lines, reason::TARGET_DATE);
        return finish(lines, vec![reason::TARGET_DATE], provisional);
    };
    if claim.claimed.is_some_and(|c| c < from) {
        reject_all(&mut lines, reason::TARGET_DATE);
        return finish(lines, vec![reason::TARGET_DATE], provisional);
    }
    // 2. The insuree and its coverage on the target date. A node holding everything that does
    // not hold the insuree: no such insuree (openIMIS cannot enter the claim).
    if inputs.complete && inputs.insuree.is_none() {
        reject_all(&mut lines, reason::FAMILY);
        return finish(lines, vec![reason::FAMILY], provisional);
    }
    let in_force: Vec<&PolicyFacts> = inputs
        .policies
        .iter()
        .filter(|p| p.in_force(target))
        .collect();
    if let Some(ins) = &inputs.insuree {
        let mut errors = Vec::new();
        if !ins.valid || !ins.family_valid {
            errors.push(reason::FAMILY);
        }
        if in_force.is_empty() {
            errors.push(reason::NO_COVERAGE);
        }
        if !errors.is_empty() {
            reject_all(&mut lines, reason::FAMILY);
            return finish(lines, errors, provisional);
        }
    }
    // 3. Claims of this category in the policy period, against the product's maximum: with one
    // policy its failure rejects the claim; with several, the policy is set aside.
    let mut policies = in_force.clone();
    let mut category_error = None;
    if inputs.insuree.is_some() {
        let single = policies.len() == 1;
        policies.retain(|p| {
            let Some(max) = p.product.as_ref().and_then(|c| c.maxima.get(&category)) else {
                return true;
            };
            let (Some(eff), Some(exp)) = (p.effective, p.expiry) else {
                return true;
            };
            let count = inputs
                .history
                .claims
                .iter()
                .filter(|(d, c)| (*c == category) && eff <= *d && *d <= exp)
                .count();
            if count as u32 >= *max {
                if single {
                    category_error = category_reason(category);
                }
                return false;
            }
            true
        });
    }
    if let Some(code) = category_error {
        reject_all(&mut lines, code);
        return finish(lines, vec![code], provisional);
    }
    let inpatient = claim.inpatient();
    let adult = inputs.insuree.as_ref().map(|i| i.adult_on(target));
    // openIMIS reads the earlier claims of the period its valid policies span (the earliest
    // effective date to the latest expiry); a device that does not hold the insuree, all it has.
    let window = if inputs.insuree.is_some() {
        let from = policies
            .iter()
            .filter_map(|p| p.effective)
            .min()
            .unwrap_or(target);
        let to = policies
            .iter()
            .filter_map(|p| p.expiry)
            .max()
            .unwrap_or(target);
        Some((from, to))
    } else {
        None
    };
    // 4. Each line.
    for (i, line) in claim.lines.iter().enumerate() {
        let v = &mut lines[i];
        let Some(m) = inputs.medical.get(i).and_then(Option::as_ref) else {
            // Names nothing this node knows: not a valid item or service.
            v.reason = reason::INVALID_ITEM_OR_SERVICE;
            continue;
        };
        if m.kind != line.kind || !m.valid {
            v.reason = reason::INVALID_ITEM_OR_SERVICE;
            continue;
        }
        if m.valid_from.is_some_and(|f| f > target) {
            v.reason = reason::TARGET_DATE;
            continue;
        }
        match inputs.price_list.as_ref().and_then(|p| p.price_of(m)) {
            None => {
                v.reason = reason::NOT_IN_PRICE_LIST;
                continue;
            }
            Some(price) => {
                v.price = price.map(|p| p.0);
                if v.asked.is_none() {
                    v.asked = v.price;
                }
            }
        }
        let hf = inputs.facility_care_type.unwrap_or('B');
        // openIMIS: out-patient facility and a stay or an in-patient item; in-patient facility
        // and an out-patient item.
        if (hf == 'O' && (inpatient || m.care_type == 'I')) || (hf == 'I' && m.care_type == 'O') {
            v.reason = reason::CARE_TYPE;
            continue;
        }
        if let Some(ins) = &inputs.insuree
            && m.patient_category != 0
        {
            let mask = ins.mask_on(target);
            if m.patient_category & mask != mask {
                v.reason = reason::CATEGORY_LIMITATION;
                continue;
            }
        }
        let prior: Vec<&PriorLine> = inputs
            .history
            .lines
            .iter()
            .filter(|p| p.kind == m.kind && p.id == m.id)
            .filter(|p| window.is_none_or(|(from, to)| from <= p.target && p.target <= to))
            .collect();
        if let Some(days) = m.frequency {
            let since = target.add_days(-i64::from(days));
            if prior.iter().any(|p| p.target >= since) {
                v.reason = reason::FREQUENCY_FAILURE;
                continue;
            }
        }
        let Some(adult) = adult else {
            // The insuree is not held: product, waiting period and limits are central's.
            continue;
        };
        let mut found = false;
        // Policies in the order openIMIS takes them: effective date plus waiting period.
        let mut covering: Vec<(&PolicyFacts, &Cover)> = policies
            .iter()
            .filter_map(|p| Some((*p, p.product.as_ref()?.cover_of(m)?)))
            .collect();
        covering.sort_by_key(|(p, c)| {
            let wait = if adult {
                c.waiting_adult
            } else {
                c.waiting_child
            };
            p.effective.map(|e| e.add_months(wait.unwrap_or(0)))
        });
        for (p, cover) in covering {
            found = true;
            let Some(effective) = p.effective else {
                continue;
            };
            // Waiting period (the insuree's policy taking effect with the policy's).
            if p.stage == Stage::New {
                let wait = if adult {
                    cover.waiting_adult
                } else {
                    cover.waiting_child
                };
                if let Some(w) = wait.filter(|w| *w > 0)
                    && target < effective.add_months(w)
                {
                    v.reason = reason::WAITING_PERIOD;
                }
            }
            // Quantity in the policy period.
            let limit = if adult {
                cover.limit_adult
            } else {
                cover.limit_child
            };
            if let (Some(limit), Some(expiry)) = (limit, p.expiry) {
                let before: f64 = prior
                    .iter()
                    .filter(|l| effective <= l.target && l.target <= expiry)
                    .map(|l| l.quantity)
                    .sum();
                if before + v.counted() > limit {
                    if before < limit {
                        v.approved = Some(limit - before);
                    } else {
                        v.reason = reason::QTY_OVER_LIMIT;
                    }
                }
            }
        }
        if !found {
            v.reason = reason::NO_PRODUCT_FOUND;
        }
    }
    // 5. Every line rejected: the claim is.
    let all_rejected = lines.iter().all(|l| l.reason != 0);
    Verdict {
        rejected: all_rejected,
        errors: if all_rejected {
            vec![reason::INVALID_ITEM_OR_SERVICE]
        } else {
            Vec::new()
        },
        lines,
        target: Some(target),
        category,
        provisional,
    }
}

fn concept(system: &str, code: &str, display: &str) -> Value {
    json!({"coding": [{"system": system, "code": code, "display": display}]})
}

fn status_concept(status: u8) -> Value {
    let display = match status {
        1 => "rejected",
        2 => "entered",
        4 => "checked",
        8 => "processed",
        _ => "valuated",
    };
    concept(CLAIM_STATUS_SYSTEM, &status.to_string(), display)
}

fn money(cents: i64, currency: &str) -> Value {
    json!({"value": Money(cents).to_json(), "currency": currency})
}

/// An amount times a quantity, in hundredths (saturating: amounts and quantities are bounded
/// when read, their products are not).
fn times(cents: i64, qty: f64) -> i64 {
    (cents as f64 * qty).round() as i64
}

impl Verdict {
    /// The ClaimResponse openIMIS gives for a claim with this verdict (its
    /// `ClaimResponseConverter`): `outcome` complete when rejected, partial when checked; per
    /// line the claim-item reference and adjudications — `entered` at the asked price and
    /// `checked` at the price-list price with the approved quantity for a line that passed,
    /// `rejected` with its reason otherwise; totals per status; the claim-level reasons in
    /// `error`. A provisional verdict says so ([`PROVISIONAL_EXTENSION`], `disposition`).
    /// `by` names who gave it.
    pub fn claim_response(
        &self,
        id: &str,
        claim_id: &str,
        claim: &Map<String, Value>,
        created: Date,
        by: &str,
    ) -> Value {
        let currency = claim
            .get("total")
            .and_then(|t| t.get("currency"))
            .and_then(Value::as_str)
            .filter(|c| c.len() <= 8)
            .unwrap_or("XOF");
        let claim_items = claim
            .get("item")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let mut items = Vec::new();
        let mut notes = Vec::new();
        let (mut entered, mut checked) = (0i64, 0i64);
        for (i, l) in self.lines.iter().enumerate() {
            let asked = l.asked.unwrap_or(0);
            entered = entered.saturating_add(times(asked, l.quantity));
            let reason_concept = concept(
                REJECTION_SYSTEM,
                &l.reason.to_string(),
                reason::display(l.reason),
            );
            let adjudication = if l.reason == 0 && !self.rejected {
                let price = l.price.unwrap_or(asked);
                checked = checked.saturating_add(times(price, l.counted()));
                vec![
                    json!({"category": status_concept(2), "reason": reason_concept,
                           "amount": money(asked, currency), "value": l.quantity}),
                    json!({"category": status_concept(4), "reason": reason_concept,
                           "amount": money(price, currency), "value": l.counted()}),
                ]
            } else {
                vec![
                    json!({"category": status_concept(1), "reason": reason_concept,
                            "amount": money(asked, currency), "value": l.quantity}),
                ]
            };
            let mut item = json!({"itemSequence": l.sequence, "adjudication": adjudication});
            if let Some(ext) = claim_items
                .get(i)
                .and_then(|c| c.get("extension"))
                .and_then(|e| e.get(0))
            {
                item["extension"] = json!([{"url": format!("{IG}/StructureDefinition/claim-item-reference"),
                    "valueReference": ext.get("valueReference").cloned().unwrap_or(Value::Null)}]);
            }
            let mut said = Vec::new();
            if l.reason == 0
                && let (Some(a), Some(p)) = (l.asked, l.price)
                && a != p
            {
                said.push(format!(
                    "line {}: asked {} {currency}, the facility's price list gives {} {currency}: \
                     the price list's price is approved",
                    l.sequence,
                    Money(a),
                    Money(p)
                ));
            }
            if let Some(a) = l.approved.filter(|_| l.reason == 0) {
                said.push(format!(
                    "line {}: quantity {} reduced to {a}, what the product still allows in the policy period",
                    l.sequence, l.quantity
                ));
            }
            if !said.is_empty() {
                let numbers: Vec<usize> = (0..said.len()).map(|k| notes.len() + k + 1).collect();
                item["noteNumber"] = json!(numbers);
                for text in said {
                    notes.push(json!({"number": notes.len() + 1, "type": "display", "text": text}));
                }
            }
            items.push(item);
        }
        let mut total =
            vec![json!({"category": status_concept(2), "amount": money(entered, currency)})];
        if !self.rejected {
            total.push(json!({"category": status_concept(4), "amount": money(checked, currency)}));
        }
        let mut out = json!({
            "resourceType": "ClaimResponse",
            "id": id,
            "status": "active",
            "use": "claim",
            "created": created.to_string(),
            "insurer": {"reference": "openIMIS"},
            "request": {"reference": format!("Claim/{claim_id}")},
            "outcome": if self.rejected { "complete" } else { "partial" },
            "item": items,
            "total": total,
        });
        for (field, from) in [
            ("type", "type"),
            ("patient", "patient"),
            ("requestor", "enterer"),
        ] {
            if let Some(v) = claim.get(from) {
                out[field] = v.clone();
            }
        }
        if let Some(code) = claim_code(claim) {
            out["identifier"] = json!([{"type": {"coding": [{"system": OPENIMIS_IDENTIFIER_TYPES, "code": "Code"}]}, "value": code}]);
        }
        if !self.errors.is_empty() {
            out["error"] = Value::Array(
                self.errors
                    .iter()
                    .map(|c| json!({"code": concept(REJECTION_SYSTEM, &c.to_string(), reason::display(*c))}))
                    .collect(),
            );
        }
        let status = if self.rejected { "rejected" } else { "checked" };
        if self.provisional.is_empty() {
            out["disposition"] = json!(format!("{status} by {by}"));
        } else {
            let names: Vec<&str> = self.provisional.iter().map(|c| c.name()).collect();
            out["disposition"] = json!(format!(
                "provisionally {status} by {by} from what it holds ({} checked with what this \
                 device holds only); central adjudicates the claim when it arrives",
                names.join(", ")
            ));
            out["extension"] = json!([{"url": PROVISIONAL_EXTENSION, "extension":
                self.provisional.iter().map(|c| json!({"url": "check", "valueCode": c.name()})).collect::<Vec<_>>()}]);
        }
        if !notes.is_empty() {
            out["processNote"] = Value::Array(notes);
        }
        out
    }

    /// Reads the verdict back from a ClaimResponse this module wrote (for the history of later
    /// claims): each line's reason and counted quantity.
    pub fn from_claim_response(json: &Map<String, Value>, claim: &ClaimFacts) -> Option<Verdict> {
        let rejected = json.get("outcome").and_then(Value::as_str) == Some("complete")
            && json.get("error").is_some();
        let mut lines = Vec::new();
        for item in json.get("item")?.as_array()? {
            let seq = item.get("itemSequence").and_then(Value::as_u64)?;
            let line = claim.lines.iter().find(|l| l.sequence == seq)?;
            let adj = item.get("adjudication")?.as_array()?;
            let last = adj.last()?;
            let reason: u8 = last
                .pointer("/reason/coding/0/code")
                .and_then(Value::as_str)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let counted = last
                .get("value")
                .and_then(Value::as_f64)
                .unwrap_or(line.quantity);
            lines.push(LineVerdict {
                sequence: seq,
                kind: line.kind,
                id: None,
                reason,
                quantity: line.quantity,
                approved: (counted != line.quantity).then_some(counted),
                asked: line.asked.map(|a| a.0),
                price: None,
            });
        }
        Some(Verdict {
            rejected,
            errors: Vec::new(),
            lines,
            target: claim.target(),
            category: 'V',
            provisional: Vec::new(),
        })
    }
}

impl History {
    /// Adds an earlier claim with its verdict: nothing when it was rejected; its lines that
    /// passed, with the definitions `ids` (per line) they named.
    pub fn add(
        &mut self,
        claim: &ClaimFacts,
        verdict: &Verdict,
        category: char,
        ids: &[Option<String>],
    ) {
        if verdict.rejected {
            return;
        }
        let Some(target) = claim.target() else {
            return;
        };
        self.claims.push((target, category));
        for (i, line) in claim.lines.iter().enumerate() {
            let Some(v) = verdict.lines.iter().find(|v| v.sequence == line.sequence) else {
                continue;
            };
            let id = v.id.clone().or_else(|| ids.get(i).cloned().flatten());
            if let (0, Some(id)) = (v.reason, id) {
                self.lines.push(PriorLine {
                    kind: line.kind,
                    id,
                    target,
                    quantity: v.counted(),
                });
            }
        }
    }
}
