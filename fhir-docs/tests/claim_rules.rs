//! The claim checks at their edges, each row worked from openIMIS's code (`claim/validations.py`,
//! `core/utils.py`), and a property: no claim an app can post makes the checks or the answer
//! panic, and every answer is well formed.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use fieldmesh_fhir_docs::openimis::claims::{
    ClaimFacts, Cover, History, Inputs, Insuree, Kind, Medical, PolicyFacts, PriceList, PriorLine,
    ProductCover, evaluate, reason,
};
use fieldmesh_fhir_docs::openimis::dates::Date;
use fieldmesh_fhir_docs::openimis::policy::{Money, Stage};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

fn d(s: &str) -> Date {
    Date::parse(s).unwrap()
}

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

/// A claim of one item line `I1` × `qty` on `day`.
fn claim(day: &str, qty: f64) -> ClaimFacts {
    ClaimFacts::parse(&obj(json!({"resourceType": "Claim", "created": day,
        "billablePeriod": {"start": day, "end": day},
        "item": [{"sequence": 1, "category": {"text": "item"}, "productOrService": {"text": "I1"},
            "quantity": {"value": qty}}]})))
    .unwrap()
}

fn item(category: u8, frequency: Option<u32>) -> Medical {
    Medical {
        id: "i1".into(),
        code: Some("I1".into()),
        kind: Kind::Item,
        valid: true,
        valid_from: None,
        price: Some(Money(15_000)),
        care_type: 'B',
        patient_category: category,
        frequency,
        category: None,
    }
}

fn policy(effective: &str, cover: Cover) -> PolicyFacts {
    let mut covers = std::collections::HashMap::new();
    covers.insert((Kind::Item, "I1".to_string()), cover);
    PolicyFacts {
        id: "p".into(),
        active: true,
        effective: Some(d(effective)),
        expiry: Some(d(effective).add_months(12)),
        stage: Stage::New,
        product: Some(ProductCover {
            covers,
            maxima: Default::default(),
        }),
    }
}

fn insuree(male: bool, birth: &str) -> Insuree {
    Insuree {
        valid: true,
        family_valid: true,
        male,
        birth: Some(d(birth)),
    }
}

fn price_list() -> PriceList {
    PriceList {
        entries: vec![(vec!["i1".into()], None)],
    }
}

fn verdict(c: &ClaimFacts, m: Medical, p: PolicyFacts, who: Insuree, history: History) -> u8 {
    let v = evaluate(&Inputs {
        claim: c,
        insuree: Some(who),
        policies: vec![p],
        facility_care_type: Some('B'),
        price_list: Some(price_list()),
        medical: vec![Some(m)],
        history,
        complete: true,
    });
    v.lines[0].reason
}

fn prior(day: &str, qty: f64) -> History {
    History {
        lines: vec![PriorLine {
            kind: Kind::Item,
            id: "i1".into(),
            target: d(day),
            quantity: qty,
        }],
        claims: vec![(d(day), 'V')],
    }
}

#[test]
fn patient_category_masks_as_core_utils_computes_them() {
    // Mask of a woman of 30: female (2) | adult (4). An item for men and women, adults and
    // minors (1|2|4|8) passes; one for adult men only (1|4) does not; one for women (2) only,
    // without an age, does not either (openIMIS ORs the flags: 2 & 6 != 6).
    let c = claim("2026-06-01", 1.0);
    let p = || policy("2026-01-01", Cover::default());
    let w = || insuree(false, "1996-01-01");
    assert_eq!(verdict(&c, item(15, None), p(), w(), History::default()), 0);
    assert_eq!(
        verdict(&c, item(1 | 4, None), p(), w(), History::default()),
        reason::CATEGORY_LIMITATION
    );
    assert_eq!(
        verdict(&c, item(2, None), p(), w(), History::default()),
        reason::CATEGORY_LIMITATION
    );
    // 0: everyone.
    assert_eq!(verdict(&c, item(0, None), p(), w(), History::default()), 0);
}

#[test]
fn the_age_of_majority_is_reached_on_the_eighteenth_birthday() {
    // An item for minors only (2|8 for a girl): the day before her 18th birthday she is a
    // minor, on the day an adult (`age(target) >= 18`).
    let p = || policy("2026-01-01", Cover::default());
    let girl = || insuree(false, "2008-06-01");
    assert_eq!(
        verdict(
            &claim("2026-05-31", 1.0),
            item(2 | 8, None),
            p(),
            girl(),
            History::default()
        ),
        0
    );
    assert_eq!(
        verdict(
            &claim("2026-06-01", 1.0),
            item(2 | 8, None),
            p(),
            girl(),
            History::default()
        ),
        reason::CATEGORY_LIMITATION
    );
}

#[test]
fn frequency_counts_a_line_exactly_frequency_days_before() {
    // `d >= target - frequency days`: 7 days before is too soon, 8 is not.
    let p = || policy("2026-01-01", Cover::default());
    let w = || insuree(false, "1990-01-01");
    let c = claim("2026-06-10", 1.0);
    assert_eq!(
        verdict(&c, item(0, Some(7)), p(), w(), prior("2026-06-03", 1.0)),
        reason::FREQUENCY_FAILURE
    );
    assert_eq!(
        verdict(&c, item(0, Some(7)), p(), w(), prior("2026-06-02", 1.0)),
        0
    );
}

#[test]
fn the_waiting_period_ends_on_the_day_months_after_the_policy_took_effect() {
    // New policy effective 2026-01-31, 1 month's waiting: openIMIS's month adds the days of
    // January (31): 2026-03-03. Before it: 17; on it: passes.
    let cover = Cover {
        waiting_adult: Some(1),
        ..Cover::default()
    };
    let w = || insuree(false, "1990-01-01");
    assert_eq!(
        verdict(
            &claim("2026-03-02", 1.0),
            item(0, None),
            policy("2026-01-31", cover),
            w(),
            History::default()
        ),
        reason::WAITING_PERIOD
    );
    assert_eq!(
        verdict(
            &claim("2026-03-03", 1.0),
            item(0, None),
            policy("2026-01-31", cover),
            w(),
            History::default()
        ),
        0
    );
    // A renewal has no waiting period.
    let mut renewal = policy("2026-01-31", cover);
    renewal.stage = Stage::Renewal;
    assert_eq!(
        verdict(
            &claim("2026-02-01", 1.0),
            item(0, None),
            renewal,
            w(),
            History::default()
        ),
        0
    );
}

#[test]
fn the_limit_reduces_the_quantity_to_what_is_left() {
    let cover = Cover {
        limit_adult: Some(5.0),
        ..Cover::default()
    };
    let w = insuree(true, "1990-01-01");
    let c = claim("2026-06-10", 4.0);
    let v = evaluate(&Inputs {
        claim: &c,
        insuree: Some(w),
        policies: vec![policy("2026-01-01", cover)],
        facility_care_type: None,
        price_list: Some(price_list()),
        medical: vec![Some(item(0, None))],
        history: prior("2026-05-01", 3.0),
        complete: true,
    });
    // 3 before, 4 asked, 5 allowed: 2 approved.
    assert_eq!((v.lines[0].reason, v.lines[0].approved), (0, Some(2.0)));
    // Before the policy took effect, an earlier line does not count.
    let v = evaluate(&Inputs {
        claim: &c,
        insuree: Some(insuree(true, "1990-01-01")),
        policies: vec![policy("2026-01-01", cover)],
        facility_care_type: None,
        price_list: Some(price_list()),
        medical: vec![Some(item(0, None))],
        history: prior("2025-12-01", 3.0),
        complete: true,
    });
    assert_eq!((v.lines[0].reason, v.lines[0].approved), (0, None));
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e20f64..1e20).prop_map(|f| json!(f)),
        "[0-9a-zA-Z/#:. -]{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("2026-02-29"),
            Just("2026-06-01"),
            Just("1900-01-01T00:00:00"),
            Just("")
        ]
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("value".to_string()),
                    Just("text".to_string()),
                    Just("reference".to_string()),
                    Just("sequence".to_string()),
                    "[a-z]{1,6}",
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Whatever an app posts as a claim's dates and lines, reading it either fails with an
    /// error or gives facts whose checks and answer are well formed.
    #[test]
    fn no_claim_makes_the_checks_panic(
        created in any_json(), period in any_json(),
        lines in prop::collection::vec((any_json(), any_json(), any_json(), any_json()), 0..6),
    ) {
        let items: Vec<Value> = lines.iter().map(|(q, p, cat, seq)| json!({
            "sequence": seq, "category": {"text": cat}, "productOrService": {"text": "I1"},
            "quantity": {"value": q}, "unitPrice": {"value": p}})).collect();
        let c = obj(json!({"resourceType": "Claim", "created": created, "billablePeriod": period,
            "item": items}));
        if let Ok(facts) = ClaimFacts::parse(&c) {
            let n = facts.lines.len();
            let v = evaluate(&Inputs {
                claim: &facts,
                insuree: Some(insuree(true, "1990-01-01")),
                policies: vec![policy("2026-01-01", Cover { limit_adult: Some(2.0), waiting_adult: Some(1200), ..Cover::default() })],
                facility_care_type: Some('O'),
                price_list: Some(price_list()),
                medical: vec![Some(item(15, Some(3))); n],
                history: prior("2026-05-01", 1.0),
                complete: false,
            });
            prop_assert_eq!(v.lines.len(), n);
            let r = v.claim_response("r", "c", &c, d("2026-06-01"), "test");
            for t in r["total"].as_array().unwrap() {
                prop_assert!(t["amount"]["value"].as_f64().unwrap() >= 0.0, "{}", r);
            }
            prop_assert_eq!(r["item"].as_array().unwrap().len(), n);
        }
    }
}
