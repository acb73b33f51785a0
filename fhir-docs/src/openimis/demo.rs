//! Synthetic openIMIS data for demos, tests, benchmarks and simulations.
//!
//! [`generate`] writes realistic openIMIS data as NDJSON: a location hierarchy (a region, its
//! districts, wards and villages), health facilities, items and services with prices, a product,
//! enrolment officers, then families (a Group with a head and members, CHFIDs with the Niger check
//! digit, addresses on the hierarchy, accented and Arabic-script names), their policies (Contracts
//! with a premium extension) and claims with items and services. The same seed gives the same
//! bytes.

use std::io::Write;

use serde_json::{Value, json};

use super::IG;
use crate::profile::{PRICE_LIST_PROFILE, PRICE_OVERRIDE_EXTENSION};

/// SplitMix64: deterministic across platforms and crate upgrades, which "the same data for the
/// same seed" needs more than statistical quality.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x5EED_F1E1_D0E5_0000)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// An element of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    /// A version-4 UUID from the generator.
    pub fn uuid(&mut self) -> String {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.next_u64().to_le_bytes());
        b[8..].copy_from_slice(&self.next_u64().to_le_bytes());
        uuid::Builder::from_random_bytes(b).into_uuid().to_string()
    }
}

const FAMILY_NAMES: &[&str] = &[
    "Maïga",
    "Traoré",
    "Issoufou",
    "Abdou",
    "Moussa",
    "Hamani",
    "Mwakyusa",
    "Kimaro",
    "Ndayisaba",
    "Mutombo",
    "Nkurunziza",
    "Élodie-Gaye",
    "Boubacar",
    "Diallo",
    "Ouédraogo",
    "Kaboré",
    "عبد الله",
    "الحسن",
    "Mahamadou",
    "Sani",
    "Njoroge",
    "Mbwambo",
    "Tchoumi",
    "Ngoué",
];
const GIVEN_MALE: &[&str] = &[
    "Abdoulaye",
    "Ibrahim",
    "Moussa",
    "Jean-Baptiste",
    "Hamidou",
    "Juma",
    "Baraka",
    "Émile",
    "Aliou",
    "محمد",
    "Issa",
    "Oumarou",
    "Joseph",
    "Frédéric",
    "Amadou",
];
const GIVEN_FEMALE: &[&str] = &[
    "Aïcha",
    "Mariam",
    "Zoé",
    "Fatouma",
    "Hadiza",
    "Neema",
    "Rehema",
    "Hélène",
    "Aminata",
    "فاطمة",
    "Salamatou",
    "Ramatou",
    "Bénédicte",
    "Zawadi",
    "Aïssatou",
];
const PROFESSIONS: &[&str] = &[
    "Farmer", "Herder", "Trader", "Teacher", "Student", "Artisan",
];

fn identifier(code: &str, value: &str) -> Value {
    json!({"type": {"coding": [{"system": format!("{IG}/CodeSystem/openimis-identifiers"), "code": code}]}, "value": value})
}

fn reference(ty: &str, id: &str) -> Value {
    json!({"reference": format!("{ty}/{id}")})
}

fn money(value: &str) -> Value {
    json!({"value": value.parse::<serde_json::Number>().unwrap_or_else(|_| 0.into()), "currency": "XOF"})
}

/// A CHFID of 10 digits whose last digit is the first nine mod 7 (Niger's rule).
pub fn chfid(n: u64) -> String {
    let body = 100_000_000 + n % 900_000_000;
    format!("{body}{}", body % 7)
}

/// Reference data of a synthetic district: locations, facilities, items, services, product,
/// officers, price lists.
pub struct Reference {
    /// `(uuid, code, name, ward name, district name, region name)` of each village.
    pub villages: Vec<(String, String, String, String, String, String)>,
    /// `(uuid, code)` of each health facility.
    pub facilities: Vec<(String, String)>,
    /// `(uuid, code)` of each district.
    pub districts: Vec<(String, String)>,
    /// `(uuid, code, price)` of items (Medication).
    pub items: Vec<(String, String, String)>,
    /// `(uuid, code, price)` of services (ActivityDefinition).
    pub services: Vec<(String, String, String)>,
    /// Product uuid.
    pub product: String,
    /// Officer (Practitioner) uuids.
    pub officers: Vec<String>,
    /// `(uuid, code)` of each facility's claim administrator (Practitioner), by facility.
    pub claim_admins: Vec<(String, String)>,
    /// Every reference resource.
    pub resources: Vec<Value>,
}

/// Builds the reference data for `seed`: one region of two districts.
pub fn reference_data(rng: &mut Rng) -> Reference {
    reference_data_for(rng, 2)
}

/// Builds the reference data of one region of `districts` districts, each with one health
/// facility (whose address names the district) and two wards of three villages; the districts
/// and villages come in order (district `d` holds villages `6d..6d+6`). Two districts give
/// [`reference_data`].
pub fn reference_data_for(rng: &mut Rng, district_count: usize) -> Reference {
    let mut resources = Vec::new();
    let loc_type = |code: &str, display: &str| json!({"coding": [{"system": format!("{IG}/CodeSystem/location-type"), "code": code, "display": display}]});
    let region = rng.uuid();
    resources.push(json!({"resourceType": "Location", "id": region, "identifier": [identifier("Code", "R1")],
        "name": "Tahoua", "status": "active", "mode": "instance", "physicalType": loc_type("R", "Region")}));
    let mut villages = Vec::new();
    let mut facilities = Vec::new();
    let mut districts = Vec::new();
    for d in 0..district_count {
        let district = rng.uuid();
        let dname = match d {
            0 => "Birni-N'Konni".to_string(),
            1 => "Madaoua".to_string(),
            d => format!("District {}", d + 1),
        };
        let dname = dname.as_str();
        districts.push((district.clone(), format!("R1D{d}")));
        resources.push(json!({"resourceType": "Location", "id": district, "identifier": [identifier("Code", &format!("R1D{d}"))],
            "name": dname, "status": "active", "mode": "instance", "physicalType": loc_type("D", "District"),
            "partOf": reference("Location", &region)}));
        let hf = rng.uuid();
        let hf_code = format!("HF{d:03}");
        resources.push(json!({"resourceType": "Organization", "id": hf, "identifier": [identifier("Code", &hf_code)],
            "name": format!("Centre de Santé Intégré de {dname}"),
            "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/organization-type", "code": "prov"}]}],
            "address": [{"use": "work", "type": "physical", "state": "Tahoua", "district": dname,
                "extension": [{"url": format!("{IG}/StructureDefinition/address-location-reference"), "valueReference": reference("Location", &district)}]}],
            "extension": [{"url": format!("{IG}/StructureDefinition/organization-hf-level"), "valueCodeableConcept": {"coding": [{"code": "C"}]}},
                {"url": format!("{IG}/StructureDefinition/organization-hf-care-type"), "valueCodeableConcept": {"coding": [{"code": "B"}]}}]}));
        facilities.push((hf, hf_code));
        for w in 0..2 {
            let ward = rng.uuid();
            let wname = format!("{dname} Commune {}", w + 1);
            resources.push(json!({"resourceType": "Location", "id": ward, "identifier": [identifier("Code", &format!("R1D{d}W{w}"))],
                "name": wname, "status": "active", "mode": "instance", "physicalType": loc_type("W", "Municipality"),
                "partOf": reference("Location", &district)}));
            for v in 0..3 {
                let village = rng.uuid();
                let code = format!("R1D{d}W{w}V{v}");
                let vname = format!(
                    "{} {}",
                    [
                        "Tounga",
                        "Kollo",
                        "Dan Gao",
                        "Ourafane",
                        "Gidan Ider",
                        "Bagaré"
                    ][(d * 6 + w * 3 + v) % 6],
                    w * 3 + v + 1
                );
                resources.push(json!({"resourceType": "Location", "id": village, "identifier": [identifier("Code", &code)],
                    "name": vname, "status": "active", "mode": "instance", "physicalType": loc_type("V", "Village"),
                    "partOf": reference("Location", &ward)}));
                villages.push((
                    village,
                    code,
                    vname,
                    wname.clone(),
                    dname.to_string(),
                    "Tahoua".to_string(),
                ));
            }
        }
    }
    let mut items = Vec::new();
    for (i, (name, price)) in [
        ("Paracétamol 500mg", "150.00"),
        ("Amoxicilline 250mg", "450.50"),
        ("SRO sachet", "75.00"),
        ("Artéméther-luméfantrine", "1200.00"),
        ("Fer-acide folique", "90.00"),
    ]
    .iter()
    .enumerate()
    {
        let id = rng.uuid();
        let code = format!("I{:04}", i + 1);
        resources.push(json!({"resourceType": "Medication", "id": id, "identifier": [identifier("Code", &code)],
            "code": {"text": name}, "status": "active", "form": {"text": "boîte"},
            "extension": [{"url": format!("{IG}/StructureDefinition/unit-price"), "valueMoney": money(price)},
                {"url": format!("{IG}/StructureDefinition/medication-type"), "valueCodeableConcept": {"coding": [{"code": "D"}]}}]}));
        items.push((id, code, price.to_string()));
    }
    let mut services = Vec::new();
    // Services with openIMIS's use contexts: the claim category (`workflow`: C consultation,
    // D delivery, A antenatal, O other), out-patient (`AMB`) or both, and antenatal care and
    // deliveries for women only.
    for (i, (name, price, category, women)) in [
        ("Consultation générale", "500.00", "C", false),
        ("Accouchement", "5000.00", "D", true),
        ("Test de diagnostic rapide paludisme", "300.00", "O", false),
        ("Consultation prénatale", "250.00", "A", true),
        ("Pansement", "200.00", "O", false),
    ]
    .iter()
    .enumerate()
    {
        let id = rng.uuid();
        let code = format!("S{:04}", i + 1);
        let context = |kind: &str, system: &str, codes: &[&str]| {
            json!({"code": {"system": "http://terminology.hl7.org/CodeSystem/usage-context-type", "code": kind},
                "valueCodeableConcept": {"coding": codes.iter().map(|c| json!({"system": system, "code": c})).collect::<Vec<_>>()}})
        };
        let venues: &[&str] = if *category == "D" {
            &["AMB", "IMP"]
        } else {
            &["AMB"]
        };
        let genders: &[&str] = if *women {
            &["female"]
        } else {
            &["male", "female"]
        };
        resources.push(json!({"resourceType": "ActivityDefinition", "id": id, "identifier": [identifier("Code", &code)],
            "name": code, "title": name, "status": "active",
            "extension": [{"url": format!("{IG}/StructureDefinition/unit-price"), "valueMoney": money(price)}],
            "useContext": [
                context("gender", "http://hl7.org/fhir/administrative-gender", genders),
                context("age", &format!("{IG}/CodeSystem/usage-context-age-type"), &["adult", "child"]),
                context("workflow", &format!("{IG}/CodeSystem/activity-definition-usage-context-workflow-type"), &[category]),
                context("venue", "http://terminology.hl7.org/CodeSystem/v3-ActCode", venues)]}));
        services.push((id, code, price.to_string()));
    }
    let product = rng.uuid();
    resources.push(json!({"resourceType": "InsurancePlan", "id": product, "identifier": [identifier("Code", "PRD01")],
        "name": "Assurance Maladie Communautaire", "status": "active",
        "period": {"start": "2026-01-01", "end": "2030-12-31"},
        "coverage": [{"type": {"coding": [{"code": "medical"}]}, "benefit": [{"type": {"coding": [{"code": "medical"}]},
            "limit": [{"value": {"value": 12, "unit": "month"}, "code": {"coding": [{"code": "period"}]}},
                      {"value": {"value": 8, "unit": "member"}, "code": {"coding": [{"code": "memberCount"}]}},
                      {"value": {"value": 4}, "code": {"coding": [{"code": "maxNoDelivery"}]}}]}]},
            // What the product covers (fieldmesh's form, see `claims`): every item and service,
            // at most 30 of each item per policy period, deliveries after 9 months' waiting.
            {"type": {"coding": [{"system": super::claims::COVER_SYSTEM, "code": "item"}]},
             "benefit": items.iter().map(|(_, code, _)| json!({"type": {"coding": [{"code": code}]},
                "limit": [{"value": {"value": 30}, "code": {"coding": [{"code": "limitNoAdult"}]}},
                          {"value": {"value": 30}, "code": {"coding": [{"code": "limitNoChild"}]}}]})).collect::<Vec<_>>()},
            {"type": {"coding": [{"system": super::claims::COVER_SYSTEM, "code": "service"}]},
             "benefit": services.iter().map(|(_, code, _)| {
                let mut b = json!({"type": {"coding": [{"code": code}]}});
                if code == "S0002" {
                    b["limit"] = json!([{"value": {"value": 9}, "code": {"coding": [{"code": "waitingPeriodAdult"}]}}]);
                }
                b
             }).collect::<Vec<_>>()}],
        "plan": [{"generalCost": [
            {"type": {"coding": [{"code": "lumpsum"}]}, "groupSize": 4, "cost": money("10000.00")},
            {"type": {"coding": [{"code": "premiumAdult"}]}, "cost": money("2500.00")},
            {"type": {"coding": [{"code": "premiumChild"}]}, "cost": money("1250.50")},
            {"type": {"coding": [{"code": "registrationFee"}]}, "cost": money("500.00")}]}]}));
    let mut officers = Vec::new();
    for (i, (family, given)) in [("Hamani", "Oumarou"), ("Sani", "Hadiza")]
        .iter()
        .enumerate()
    {
        let id = rng.uuid();
        resources.push(json!({"resourceType": "Practitioner", "id": id, "identifier": [identifier("Code", &format!("EO{:04}", i + 1))],
            "name": [{"use": "usual", "family": family, "given": [given]}],
            "qualification": [{"code": {"coding": [{"system": format!("{IG}/CodeSystem/practitioner-qualification-type"), "code": "EO"}]}}]}));
        officers.push(id);
    }
    // Each facility's claim administrator (openIMIS: a Practitioner qualified `CA`, its
    // facility in the `reference` extension).
    let mut claim_admins = Vec::new();
    for (d, (hf, _)) in facilities.iter().enumerate() {
        let id = rng.uuid();
        let code = format!("CA{d:03}");
        resources.push(json!({"resourceType": "Practitioner", "id": id, "identifier": [identifier("Code", &code)],
            "name": [{"use": "usual", "family": "Tchoumi", "given": ["Bénédicte"]}],
            "qualification": [{"code": {"coding": [{"system": format!("{IG}/CodeSystem/practitioner-qualification-type"), "code": "CA"}]}}],
            "extension": [{"url": format!("{IG}/StructureDefinition/reference"), "valueReference": reference("Organization", hf)}]}));
        claim_admins.push((id, code));
    }
    for (hf, hf_code) in &facilities {
        let mut entries: Vec<Value> = items
            .iter()
            .map(|(id, _, _)| json!({"item": reference("Medication", id)}))
            .collect();
        entries.extend(services.iter().enumerate().map(|(i, (id, _, price))| {
            let mut e = json!({"item": reference("ActivityDefinition", id)});
            if i == 0 {
                // This facility charges its own price for consultations.
                let over: f64 = price.parse().unwrap_or(0.0) * 1.2;
                e["extension"] = json!([{"url": PRICE_OVERRIDE_EXTENSION, "valueMoney": money(&format!("{over:.2}"))}]);
            }
            e
        }));
        resources.push(
            json!({"resourceType": "List", "id": rng.uuid(), "status": "current", "mode": "working",
            "title": format!("Liste de prix {hf_code}"), "meta": {"profile": [PRICE_LIST_PROFILE]},
            "identifier": [identifier("Code", &format!("PL-{hf_code}"))],
            "subject": reference("Organization", hf), "entry": entries}),
        );
    }
    Reference {
        villages,
        facilities,
        districts,
        items,
        services,
        product,
        officers,
        claim_admins,
        resources,
    }
}

fn date(rng: &mut Rng, from_year: u64, years: u64) -> String {
    format!(
        "{}-{:02}-{:02}",
        from_year + rng.below(years),
        1 + rng.below(12),
        1 + rng.below(28)
    )
}

/// What [`generate_with`] writes.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// The reference data (locations, facilities, items, services, product, officers, price
    /// lists): central's to author.
    pub reference: bool,
    /// Families, insurees and policies: an enrolment officer's.
    pub enrolment: bool,
    /// Claims: a claim administrator's.
    pub claims: bool,
    /// Place families only in these villages (codes such as `R1D0W0V0`); all when empty.
    pub villages: Vec<String>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            reference: true,
            enrolment: true,
            claims: true,
            villages: Vec::new(),
        }
    }
}

/// Writes `families` synthetic families (and the reference data first) as NDJSON to `out`.
/// Returns the number of resources written.
pub fn generate(seed: u64, families: u64, out: &mut impl Write) -> std::io::Result<u64> {
    generate_with(seed, families, &GenerateOptions::default(), out)
}

/// [`generate`] with a choice of what to write and where families live.
pub fn generate_with(
    seed: u64,
    families: u64,
    opts: &GenerateOptions,
    out: &mut impl Write,
) -> std::io::Result<u64> {
    let mut rng = Rng::new(seed);
    let refdata = reference_data(&mut rng);
    let villages: Vec<_> = refdata
        .villages
        .iter()
        .filter(|v| opts.villages.is_empty() || opts.villages.contains(&v.1))
        .cloned()
        .collect();
    if villages.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "none of the villages asked for exists (codes look like R1D0W0V0)",
        ));
    }
    let mut written = 0u64;
    let mut emit = |v: &Value, out: &mut dyn Write| -> std::io::Result<()> {
        let keep = match v["resourceType"].as_str() {
            Some("Patient" | "Group" | "Contract") => opts.enrolment,
            Some("Claim") => opts.claims,
            _ => opts.reference,
        };
        if keep {
            serde_json::to_writer(&mut *out, v)?;
            out.write_all(b"\n")?;
            written += 1;
        }
        Ok(())
    };
    for r in &refdata.resources {
        emit(r, out)?;
    }
    let mut emit_one = |v: &Value| emit(v, out);
    write_families(
        &refdata,
        &mut rng,
        families,
        &villages,
        &seed.to_string(),
        seed.wrapping_mul(7919) % 1_000_000,
        &mut emit_one,
    )?;
    Ok(written)
}

/// A village: `(uuid, code, name, ward name, district name, region name)`.
pub type Village = (String, String, String, String, String, String);

/// Writes `families` families living in `villages` (of `refdata`) through `emit`: each a Group,
/// its insurees, a policy with its contribution, and a claim for every third. `tag` makes receipt
/// and claim codes unique; CHFIDs count up from `insuree_no`.
pub fn write_families(
    refdata: &Reference,
    rng: &mut Rng,
    families: u64,
    villages: &[Village],
    tag: &str,
    mut insuree_no: u64,
    emit: &mut dyn FnMut(&Value) -> std::io::Result<()>,
) -> std::io::Result<()> {
    for f in 0..families {
        let village = rng.pick(villages).clone();
        let group = rng.uuid();
        let family_name = *rng.pick(FAMILY_NAMES);
        let size = 1 + rng.below(7);
        let address = |use_: &str| {
            json!({"use": use_, "type": "physical", "city": village.2, "municipality": village.3,
            "district": village.4, "state": village.5,
            "extension": [{"url": format!("{IG}/StructureDefinition/address-municipality"), "valueString": village.3},
                          {"url": format!("{IG}/StructureDefinition/address-location-reference"), "valueReference": reference("Location", &village.0)}]})
        };
        let mut members = Vec::new();
        let mut head_chfid = String::new();
        let mut head_id = String::new();
        for m in 0..size {
            insuree_no += 1;
            let id = rng.uuid();
            let number = chfid(insuree_no);
            let male = rng.below(2) == 0;
            let given = if male {
                *rng.pick(GIVEN_MALE)
            } else {
                *rng.pick(GIVEN_FEMALE)
            };
            let birth = if m == 0 {
                date(rng, 1960, 40)
            } else {
                date(rng, 1975, 50)
            };
            let mut patient = json!({"resourceType": "Patient", "id": id,
                "identifier": [identifier("Code", &number)],
                "name": [{"use": "usual", "family": family_name, "given": [given]}],
                "gender": if male { "male" } else { "female" }, "birthDate": birth,
                "maritalStatus": {"coding": [{"system": "http://hl7.org/fhir/valueset-marital-status.html", "code": *rng.pick(&["M", "S", "W"])}]},
                "address": [address("home")],
                "extension": [
                    {"url": format!("{IG}/StructureDefinition/patient-is-head"), "valueBoolean": m == 0},
                    {"url": format!("{IG}/StructureDefinition/patient-group-reference"), "valueReference": reference("Group", &group)},
                    {"url": format!("{IG}/StructureDefinition/patient-card-issued"), "valueBoolean": rng.below(3) > 0},
                    {"url": format!("{IG}/StructureDefinition/patient-profession"), "valueCodeableConcept": {"coding": [{"code": *rng.pick(PROFESSIONS)}]}}]});
            if rng.below(3) == 0 {
                patient["telecom"] = json!([{"system": "phone", "value": format!("+227 9{} {:02} {:02} {:02}", rng.below(10), rng.below(100), rng.below(100), rng.below(100))}]);
            }
            if m > 0 {
                patient["contact"] = json!([{"relationship": [{"coding": [{"system": format!("{IG}/CodeSystem/patient-contact-relationship"), "code": *rng.pick(&["1", "2", "3", "4"])}]}]}]);
            } else {
                head_chfid = number.clone();
                head_id = id.clone();
            }
            members.push((id, patient));
        }
        let group_res = json!({"resourceType": "Group", "id": group, "identifier": [identifier("Code", &head_chfid)],
            "type": "person", "actual": true, "name": family_name, "quantity": size,
            "member": members.iter().map(|(id, _)| json!({"entity": reference("Patient", id)})).collect::<Vec<_>>(),
            "extension": [{"url": format!("{IG}/StructureDefinition/group-address"), "valueAddress": address("home")},
                          {"url": format!("{IG}/StructureDefinition/group-poverty-status"), "valueBoolean": rng.below(4) == 0},
                          {"url": format!("{IG}/StructureDefinition/group-type"), "valueCodeableConcept": {"coding": [{"code": "H"}]}}]});
        emit(&group_res)?;
        for (_, p) in &members {
            emit(p)?;
        }
        // Policy with its contribution: lump sum for up to 4 members, adults above it
        // (enrolled January to October 2026, before the simulations' first day).
        let enrolled = format!("2026-{:02}-{:02}", 1 + rng.below(10), 1 + rng.below(28));
        let extra = size.saturating_sub(4);
        let value = format!("{}.00", 10_000 + extra * 2_500 + size * 500);
        let officer = rng.pick(&refdata.officers).clone();
        emit(
            &json!({"resourceType": "Contract", "id": rng.uuid(), "status": "offered",
            "identifier": [identifier("Code", &format!("POL-{head_chfid}"))],
            "subject": [reference("Group", &group)], "author": reference("Practitioner", &officer),
            "scope": {"coding": [{"system": format!("{IG}/CodeSystem/contract-scope"), "code": "informal"}]},
            "legalState": {"text": "Offered"},
            "term": [{"offer": {"party": [{"reference": [reference("Patient", &head_id)], "role": {"coding": [{"code": "beneficiary"}]}}]},
                "asset": [{"typeReference": members.iter().map(|(id, _)| reference("Patient", id)).collect::<Vec<_>>(),
                    "period": [{"start": enrolled}], "usePeriod": [{"start": enrolled}],
                    "valuedItem": [{"entityReference": reference("InsurancePlan", &refdata.product), "net": money(&value)}],
                    "extension": [{"url": format!("{IG}/StructureDefinition/contract-premium"), "extension": [
                        {"url": "payer", "valueCodeableConcept": {"coding": [{"code": "beneficiary"}]}},
                        {"url": "category", "valueCodeableConcept": {"coding": [{"code": "C"}]}},
                        {"url": "amount", "valueMoney": money(&value)},
                        {"url": "receipt", "valueString": format!("RC-{tag}-{f}")},
                        {"url": "date", "valueDate": enrolled},
                        {"url": "type", "valueCodeableConcept": {"coding": [{"code": "C"}]}}]}]}]}]}),
        )?;
        if f % 3 == 0 {
            let (hf, hf_code) = rng.pick(&refdata.facilities).clone();
            let (patient_id, _) = rng.pick(&members).clone();
            let day = date(rng, 2026, 1);
            let mut lines = Vec::new();
            let mut total = 0f64;
            for seq in 1..=1 + rng.below(3) {
                let (kind, list) = if rng.below(2) == 0 {
                    ("item", &refdata.items)
                } else {
                    ("service", &refdata.services)
                };
                let (id, code, price) = rng.pick(list).clone();
                let qty = 1 + rng.below(3);
                total += price.parse::<f64>().unwrap_or(0.0) * qty as f64;
                let target = if kind == "item" {
                    "Medication"
                } else {
                    "ActivityDefinition"
                };
                lines.push(json!({"sequence": seq, "category": {"text": kind}, "productOrService": {"text": code},
                    "quantity": {"value": qty}, "unitPrice": money(&price),
                    "extension": [{"url": format!("{IG}/StructureDefinition/claim-item-reference"), "valueReference": reference(target, &id)}]}));
            }
            emit(
                &json!({"resourceType": "Claim", "id": rng.uuid(), "status": "active", "use": "claim",
                "identifier": [identifier("Code", &format!("CLM-{hf_code}-{tag}-{f}"))],
                "type": {"coding": [{"system": format!("{IG}/CodeSystem-claim-visit-type.html"), "code": "O", "display": "Other"}]},
                "patient": reference("Patient", &patient_id), "provider": reference("Organization", &hf),
                "created": day, "billablePeriod": {"start": day, "end": day},
                "diagnosis": [{"sequence": 1, "diagnosisCodeableConcept": {"coding": [{"system": format!("{IG}/CodeSystem/diagnosis-ICD10-level1"), "code": "B54"}]}}],
                "total": money(&format!("{total:.2}")), "item": lines}),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes_and_all_valid() {
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        generate(7, 30, &mut a).unwrap();
        generate(7, 30, &mut b).unwrap();
        generate(8, 30, &mut c).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let text = String::from_utf8(a).unwrap();
        let mut types = std::collections::BTreeSet::new();
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            crate::profile::validate(&v, None).unwrap_or_else(|e| panic!("{e}: {line}"));
            types.insert(v["resourceType"].as_str().unwrap().to_string());
        }
        for t in [
            "Patient",
            "Group",
            "Contract",
            "Claim",
            "Location",
            "Organization",
            "Medication",
            "ActivityDefinition",
            "InsurancePlan",
            "Practitioner",
            "List",
        ] {
            assert!(types.contains(t), "{t} missing");
        }
    }

    #[test]
    fn parts_and_villages_can_be_chosen() {
        let mut out = Vec::new();
        let opts = GenerateOptions {
            reference: false,
            claims: false,
            villages: vec!["R1D0W0V1".into()],
            ..Default::default()
        };
        generate_with(3, 20, &opts, &mut out).unwrap();
        let village = reference_data(&mut Rng::new(3)).villages[1].0.clone();
        let text = String::from_utf8(out).unwrap();
        assert!(text.lines().count() > 40);
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            let ty = v["resourceType"].as_str().unwrap();
            assert!(["Patient", "Group", "Contract"].contains(&ty), "{ty}");
            if ty == "Patient" {
                assert!(line.contains(&format!("Location/{village}")), "{line}");
            }
        }
        let bad = GenerateOptions {
            villages: vec!["nowhere".into()],
            ..Default::default()
        };
        assert!(generate_with(3, 1, &bad, &mut Vec::new()).is_err());
    }

    #[test]
    fn chfids_carry_the_check_digit() {
        let c = chfid(42);
        assert_eq!(c.len(), 10);
        let body: u64 = c[..9].parse().unwrap();
        assert_eq!(c[9..].parse::<u64>().unwrap(), body % 7);
    }
}
