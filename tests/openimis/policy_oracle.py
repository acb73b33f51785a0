"""Policy values computed by openIMIS's own code, as a fixture for fieldmesh's tests.

Runs inside the openIMIS backend of ../shared/tools/openimis-local (its Django shell; the
database need not hold anything): builds random products (unsaved `product.models.Product`),
families and policies, prices them with openIMIS's `policy/values.py` (`set_start_date`,
`set_expiry_date`, `set_value`), encodes each product with openIMIS's FHIR module
(`InsurancePlanConverter.to_fhir_obj`), and prints one JSON case per line:

    {"product": <InsurancePlan as openIMIS serves it>, "stage": "N"|"R", "enroll": "YYYY-MM-DD",
     "today": "YYYY-MM-DD", "members": ["YYYY-MM-DD", ...], "previous_expiry": null|"YYYY-MM-DD",
     "value": "123.45", "start": "YYYY-MM-DD", "expiry": "YYYY-MM-DD"}

The product's payment grace period (`grace_period_payment`, which openIMIS's FHIR form does not
carry) is added as fieldmesh's extension. Regenerate the fixture with:

    bash ../shared/tools/openimis-local/start.sh
    source ../shared/tools/openimis-local/env.sh
    (cd $OI_HOME/project && $OI_HOME/venv/bin/python manage.py shell \
        -c "exec(open('$PWD/tests/openimis/policy_oracle.py').read())") | grep '^{' \
        > fhir-docs/tests/fixtures/policy-values-openimis.ndjson
"""
import datetime as py
import json
import random
from decimal import Decimal, ROUND_HALF_EVEN
from types import SimpleNamespace

from core import datetime as cdt
from policy.models import Policy
from policy.values import set_start_date, set_expiry_date, set_value
from product.models import Product
from api_fhir_r4.converters import InsurancePlanConverter

CASES = 250
rng = random.Random(20261129)


def money(lo, hi):
    return Decimal(rng.randrange(lo * 100, hi * 100)) / 100


def maybe(p, f):
    return f() if rng.random() < p else None


def cycle():
    month = rng.randrange(1, 13)
    day = rng.randrange(1, [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][month - 1] + 1)
    return "%02d-%02d" % (day, month)


def product():
    cycles = sorted({cycle() for _ in range(rng.randrange(1, 5))}) if rng.random() < 0.5 else []
    rng.shuffle(cycles)
    cycles += [None] * (4 - len(cycles))
    return Product(
        code="P%03d" % rng.randrange(1000),
        name="Oracle product",
        date_from=py.datetime(2020, 1, 1),
        date_to=py.datetime(2035, 12, 31),
        insurance_period=rng.choice([3, 6, 12, 12, 18, 24, 36]),
        administration_period=rng.choice([0, 0, 1, 2, 3]),
        lump_sum=rng.choice([Decimal(0), money(50, 500)]),
        max_members=rng.randrange(1, 10),
        threshold=rng.choice([None, 0, 1, 2, 3, 4, 6]),
        premium_adult=rng.choice([None, money(5, 80)]),
        premium_child=rng.choice([None, money(2, 40)]),
        registration_lump_sum=rng.choice([None, Decimal(0), money(5, 50)]),
        registration_fee=rng.choice([None, money(1, 10)]),
        general_assembly_lump_sum=rng.choice([None, Decimal(0), money(5, 50)]),
        general_assembly_fee=rng.choice([None, money(1, 10)]),
        grace_period_enrolment=rng.choice([0, 0, 1, 2, 3]),
        grace_period_renewal=rng.choice([0, 1, 2]),
        grace_period_payment=rng.choice([0, 1, 2, 3]),
        start_cycle_1=cycles[0],
        start_cycle_2=cycles[1],
        start_cycle_3=cycles[2],
        start_cycle_4=cycles[3],
        enrolment_discount_perc=rng.choice([0, 5, 10, 15, 25, 33]),
        enrolment_discount_period=rng.choice([0, 1, 2, 3]),
        renewal_discount_perc=rng.choice([0, 5, 10, 15, 25, 33]),
        renewal_discount_period=rng.choice([0, 1, 2, 3]),
        max_installments=1,
        audit_user_id=1,
    )


def day(d):
    return d.strftime("%Y-%m-%d")


today = py.date.today()
majority = py.date(today.year - 18, today.month, min(today.day, 28))
out = []
for _ in range(CASES):
    prod = product()
    plan = json.loads(InsurancePlanConverter.to_fhir_obj(prod).json())
    plan.setdefault("extension", []).append({
        "url": "urn:fieldmesh:StructureDefinition/insurance-plan-payment-grace-period",
        "valueQuantity": {"value": prod.grace_period_payment, "unit": "months"},
    })
    stage = rng.choice(["N", "N", "R"])
    enroll = py.date(2023, 1, 1) + py.timedelta(days=rng.randrange(0, 1400))
    if rng.random() < 0.2:  # month ends, where openIMIS's month arithmetic shows
        enroll = py.date(enroll.year, enroll.month, 1) + py.timedelta(days=-1)
    members = []
    for _ in range(rng.randrange(1, 12)):
        if rng.random() < 0.15:  # around the age of majority
            dob = majority + py.timedelta(days=rng.randrange(-2, 3))
        else:
            dob = py.date(1950, 1, 1) + py.timedelta(days=rng.randrange(0, 27000))
        members.append(dob)
    prev = None
    if stage == "R":
        prev = enroll + py.timedelta(days=rng.randrange(-120, 120))
    policy = Policy(stage=stage, enroll_date=cdt.date.from_ad_date(enroll), product=prod)
    set_start_date(policy)
    set_expiry_date(policy)
    people = [SimpleNamespace(dob=m, relationship=None) for m in members]
    prev_policy = SimpleNamespace(expiry_date=cdt.date.from_ad_date(prev)) if prev else None
    set_value(policy, people, prev_policy, None)
    value = Decimal(policy.value).quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)
    print(json.dumps({
        "product": plan, "stage": stage, "enroll": day(enroll), "today": day(today),
        "members": [day(m) for m in members], "previous_expiry": day(prev) if prev else None,
        "value": str(value), "exact": str(policy.value),
        "start": day(policy.start_date), "expiry": day(policy.expiry_date),
    }, sort_keys=True))
