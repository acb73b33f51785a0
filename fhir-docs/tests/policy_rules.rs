//! The policy value, dates and activation, one table row per branch of `FHIR-MAPPING.md` §3
//! (openIMIS's `policy/values.py` and `contribution/services.py`), each expected value worked out
//! by hand from the rule, not from this code's output.
#![allow(clippy::unwrap_used)]

use fieldmesh_fhir_docs::openimis::dates::Date;
use fieldmesh_fhir_docs::openimis::policy::{
    Activation, Discount, Money, Payment, Product, Stage, Terms, activation, value,
};

fn d(s: &str) -> Date {
    Date::parse(s).unwrap()
}

/// Today for every case: the age of majority falls on 2008-11-29.
const TODAY: &str = "2026-11-29";
const ADULT: &str = "1990-01-01";
const CHILD: &str = "2015-01-01";

/// 12 months, no cycles, no lump sum, adult 100.00, child 50.00, nothing else.
fn base() -> Product {
    Product {
        insurance_period: 12,
        premium_adult: Money(10_000),
        premium_child: Money(5_000),
        ..Product::default()
    }
}

fn family(adults: usize, children: usize) -> Vec<Date> {
    let mut v = vec![d(ADULT); adults];
    v.extend(vec![d(CHILD); children]);
    v
}

struct Case {
    name: &'static str,
    product: Product,
    stage: Stage,
    enroll: &'static str,
    members: Vec<Date>,
    previous_expiry: Option<&'static str>,
    value: i64,
    start: &'static str,
    expiry: &'static str,
}

fn new(name: &'static str, product: Product, members: Vec<Date>, value: i64) -> Case {
    Case {
        name,
        product,
        stage: Stage::New,
        enroll: "2026-03-10",
        members,
        previous_expiry: None,
        value,
        start: "2026-03-10",
        expiry: "2027-03-09",
    }
}

#[test]
fn value_branches() {
    let cases = vec![
        new(
            "no lump sum, no threshold: each member at their premium",
            base(),
            family(2, 3),
            35_000,
        ),
        new(
            "lump sum without threshold: the lump sum alone",
            Product {
                lump_sum: Money(100_000),
                ..base()
            },
            family(2, 3),
            100_000,
        ),
        new(
            "lump sum with threshold 3, 2 adults 3 children: 2 children above it",
            Product {
                lump_sum: Money(100_000),
                threshold: 3,
                ..base()
            },
            family(2, 3),
            100_000 + 2 * 5_000,
        ),
        new(
            "lump sum with threshold 3, 5 adults 1 child: 2 adults and the child above it",
            Product {
                lump_sum: Money(100_000),
                threshold: 3,
                ..base()
            },
            family(5, 1),
            100_000 + 2 * 10_000 + 5_000,
        ),
        new(
            "L = 0 and T > 0: only the members within the threshold are charged",
            Product {
                threshold: 3,
                ..base()
            },
            family(5, 1),
            3 * 10_000,
        ),
        new(
            "max members 4, 3 adults 3 children: 2 children trimmed",
            Product {
                max_members: 4,
                ..base()
            },
            family(3, 3),
            3 * 10_000 + 5_000,
        ),
        new(
            "max members 2, 3 adults 2 children: 1 adult and both children trimmed",
            Product {
                max_members: 2,
                ..base()
            },
            family(3, 2),
            2 * 10_000,
        ),
        new(
            "born on the majority date (today less 18 years) is a child",
            base(),
            vec![d("2008-11-29")],
            5_000,
        ),
        new(
            "born the day before it is an adult",
            base(),
            vec![d("2008-11-28")],
            10_000,
        ),
        new(
            "a child on the enrolment date but an adult today counts as an adult",
            base(),
            vec![d("2008-06-01")],
            10_000,
        ),
        new(
            "registration and general-assembly fees per member, new policy",
            Product {
                registration_fee: Money(1_000),
                general_assembly_fee: Money(500),
                ..base()
            },
            family(2, 3),
            35_000 + 5 * 1_000 + 5 * 500,
        ),
        new(
            "lump sums win over fees",
            Product {
                registration_fee: Money(1_000),
                registration_lump_sum: Money(4_000),
                general_assembly_fee: Money(500),
                general_assembly_lump_sum: Money(3_000),
                ..base()
            },
            family(2, 3),
            35_000 + 4_000 + 3_000,
        ),
        new(
            "fees count the members left after trimming, not the threshold",
            Product {
                max_members: 4,
                threshold: 2,
                lump_sum: Money(20_000),
                registration_fee: Money(1_000),
                ..base()
            },
            family(3, 3),
            // 3 adults 1 child after trimming; 1 adult and the child above the threshold.
            20_000 + 10_000 + 5_000 + 4 * 1_000,
        ),
        Case {
            name: "renewal: no registration fee, no administration period",
            stage: Stage::Renewal,
            ..new(
                "",
                Product {
                    registration_fee: Money(1_000),
                    general_assembly_fee: Money(500),
                    administration_period: 2,
                    ..base()
                },
                family(2, 3),
                35_000 + 5 * 500,
            )
        },
    ];
    check(cases);
}

#[test]
fn date_branches() {
    let cases = vec![
        Case {
            enroll: "2026-01-15",
            start: "2026-03-15", // + 31 days (January) + 28 (February)
            expiry: "2027-03-14",
            ..new(
                "administration period of 2 months",
                Product {
                    administration_period: 2,
                    ..base()
                },
                family(1, 0),
                10_000,
            )
        },
        Case {
            enroll: "2026-01-31",
            start: "2026-03-03", // openIMIS adds January's 31 days
            expiry: "2027-03-02",
            ..new(
                "administration period from a month end",
                Product {
                    administration_period: 1,
                    ..base()
                },
                family(1, 0),
                10_000,
            )
        },
        Case {
            enroll: "2026-01-31",
            start: "2026-01-31",
            expiry: "2026-08-02", // Mar 3, Apr 3, May 3, Jun 3, Jul 3, Aug 3, less a day
            ..new(
                "6 months counted in month lengths",
                Product {
                    insurance_period: 6,
                    ..base()
                },
                family(1, 0),
                10_000,
            )
        },
        Case {
            enroll: "2026-07-20",
            start: "2026-07-01", // July 20 less June's 30 days is June 20: July 1 is on or after it
            expiry: "2027-06-30",
            ..new(
                "cycles with an enrolment grace of 1 month",
                Product {
                    cycles: vec![(1, 1), (1, 7)],
                    grace_enrolment: 1,
                    ..base()
                },
                family(1, 0),
                10_000,
            )
        },
        Case {
            enroll: "2026-07-20",
            start: "2027-01-01", // no cycle left in 2026: the first cycle of the next year
            expiry: "2027-12-31",
            ..new(
                "cycles without grace",
                Product {
                    cycles: vec![(1, 1), (1, 7)],
                    ..base()
                },
                family(1, 0),
                10_000,
            )
        },
        Case {
            enroll: "2026-03-01",
            start: "2026-10-01", // the first cycle as configured that is on or after, not the earliest
            expiry: "2027-09-30",
            ..new(
                "cycles out of calendar order",
                Product {
                    cycles: vec![(1, 10), (1, 4)],
                    ..base()
                },
                family(1, 0),
                10_000,
            )
        },
        Case {
            enroll: "2026-02-10",
            start: "2026-04-01", // + 28 days is March 10, no cycle on or after it but April 1
            expiry: "2027-03-31",
            ..new(
                "administration period before the cycles",
                Product {
                    cycles: vec![(1, 4)],
                    administration_period: 1,
                    ..base()
                },
                family(1, 0),
                10_000,
            )
        },
        Case {
            name: "renewal with a renewal grace of 2 months",
            stage: Stage::Renewal,
            previous_expiry: Some("2026-12-31"),
            enroll: "2027-02-10",
            start: "2027-01-01", // Feb 10 less 31 (January) less 31 (December) is Dec 10, 2026
            expiry: "2027-12-31",
            ..new(
                "",
                Product {
                    cycles: vec![(1, 1)],
                    grace_renewal: 2,
                    grace_enrolment: 0,
                    ..base()
                },
                family(1, 0),
                10_000,
            )
        },
    ];
    check(cases);
}

#[test]
fn discount_branches() {
    let cycles = Product {
        cycles: vec![(1, 7)],
        enrolment_discount: Discount {
            percent: 10,
            months: 1,
        },
        renewal_discount: Discount {
            percent: 20,
            months: 2,
        },
        ..base()
    };
    let cases = vec![
        Case {
            enroll: "2026-05-15",
            start: "2026-07-01",
            expiry: "2027-06-30",
            // July 1 less June's 30 days is June 1: May 15 is on or before it.
            ..new(
                "enrolment discount, early enough",
                cycles.clone(),
                family(2, 3),
                31_500,
            )
        },
        Case {
            enroll: "2026-06-15",
            start: "2026-07-01",
            expiry: "2027-06-30",
            ..new(
                "enrolment discount, too late",
                cycles.clone(),
                family(2, 3),
                35_000,
            )
        },
        new(
            "enrolment discount needs cycles",
            Product {
                enrolment_discount: Discount {
                    percent: 10,
                    months: 1,
                },
                ..base()
            },
            family(2, 3),
            35_000,
        ),
        Case {
            name: "renewal discount, early enough",
            stage: Stage::Renewal,
            previous_expiry: Some("2026-06-30"),
            enroll: "2026-04-20", // July 1 less 30 (June) less 31 (May) is May 1
            start: "2026-07-01",
            expiry: "2027-06-30",
            ..new("", cycles.clone(), family(2, 3), 28_000)
        },
        Case {
            name: "renewal discount, too late",
            stage: Stage::Renewal,
            previous_expiry: Some("2026-06-30"),
            enroll: "2026-05-02",
            start: "2026-07-01",
            expiry: "2027-06-30",
            ..new("", cycles.clone(), family(2, 3), 35_000)
        },
        Case {
            enroll: "2026-05-15",
            start: "2026-07-01",
            expiry: "2027-06-30",
            // 100.30 less 5 % is 95.285: rounded half to even, as Django stores decimal(18,2).
            ..new(
                "a discounted value is rounded half to even",
                Product {
                    premium_adult: Money(10_030),
                    enrolment_discount: Discount {
                        percent: 5,
                        months: 1,
                    },
                    ..cycles.clone()
                },
                family(1, 0),
                9_528,
            )
        },
    ];
    check(cases);
}

fn check(cases: Vec<Case>) {
    let today = d(TODAY);
    for c in cases {
        let v = value(&Terms {
            product: &c.product,
            stage: c.stage,
            enroll: d(c.enroll),
            today,
            members: &c.members,
            previous_expiry: c.previous_expiry.map(d),
        });
        assert_eq!(
            (v.value, v.start, v.expiry),
            (Money(c.value), d(c.start), d(c.expiry)),
            "{}",
            c.name
        );
    }
}

#[test]
fn max_members_above_is_reported() {
    let p = Product {
        max_members: 2,
        ..base()
    };
    let members = family(3, 2);
    let v = value(&Terms {
        product: &p,
        stage: Stage::New,
        enroll: d("2026-03-10"),
        today: d(TODAY),
        members: &members,
        previous_expiry: None,
    });
    assert_eq!(v.above_max, 3);
}

#[test]
fn last_payment_dates() {
    let terms = |p: &Product, stage, enroll: &str, previous: Option<&str>| {
        let members = family(1, 0);
        value(&Terms {
            product: p,
            stage,
            enroll: d(enroll),
            today: d(TODAY),
            members: &members,
            previous_expiry: previous.map(d),
        })
        .last_payment
    };
    let free = Product {
        grace_payment: 1,
        ..base()
    };
    // No cycles, new: enrolment + 1 month (January's 31 days) less a day.
    assert_eq!(
        terms(&free, Stage::New, "2026-01-15", None),
        d("2026-02-14")
    );
    // No cycles, renewal: expiry + 1 day + 1 month less a day. Expiry of a renewal enrolled
    // 2026-01-01 is 2026-12-31; January 1 + 31 days is February 1.
    assert_eq!(
        terms(&free, Stage::Renewal, "2026-01-01", Some("2025-12-31")),
        d("2027-01-31")
    );
    // Cycles: start + the enrolment grace less a day.
    let cycles = Product {
        cycles: vec![(1, 7)],
        grace_enrolment: 1,
        ..base()
    };
    assert_eq!(
        terms(&cycles, Stage::New, "2026-05-01", None),
        d("2026-07-31")
    );
}

#[test]
fn activation_branches() {
    let value = Money(35_000);
    let start = d("2026-07-01");
    let pay = |amount: i64, date: &str, receipt: &str| Payment {
        amount: Money(amount),
        date: d(date),
        receipt: receipt.into(),
    };
    let idle = Activation {
        active: false,
        effective: None,
        paid: Money(20_000),
    };
    // Paid in full before the start: effective on the start date.
    assert_eq!(
        activation(value, start, &[pay(35_000, "2026-06-20", "R1")]).effective,
        Some(start)
    );
    // Paid in two parts: effective when the second pays the balance, after the start.
    let two = activation(
        value,
        start,
        &[
            pay(15_000, "2026-07-10", "R2"),
            pay(20_000, "2026-06-20", "R1"),
        ],
    );
    assert_eq!(
        (two.active, two.effective, two.paid),
        (true, Some(d("2026-07-10")), value)
    );
    // A partial payment leaves it idle.
    assert_eq!(
        activation(value, start, &[pay(20_000, "2026-06-20", "R1")]),
        idle
    );
    // More than the value: effective on the payment's own date, even before the start.
    assert_eq!(
        activation(value, start, &[pay(40_000, "2026-06-20", "R1")]).effective,
        Some(d("2026-06-20"))
    );
}
