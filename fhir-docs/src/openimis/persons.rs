//! The same person registered twice: blocking keys for finding them without comparing every
//! pair, and names compared without accents, case or spelling marks.
//!
//! A Patient yields a few *blocking keys*; two Patients are candidates for being the same person
//! when they share one. The engine indexes the keys (as reference-index entries under
//! [`PERSON_KEY_INDEX`]), so finding a newly arrived Patient's candidates is a few index lookups,
//! whatever the number of insurees: detection is linear in the arrivals, not quadratic.
//!
//! The keys:
//! - `id:<type>|<number>`: an identity document number (openIMIS's `patient-identification`
//!   extension, its nested `number` and `type`, or an identifier typed `PPN` passport);
//! - `nbv:<family>|<given>|<birth date>|<village>`: the normalised family name, the normalised
//!   given names in alphabetical order, the birth date and the address village(s).
//!
//! [`normalise_name`] decomposes (NFKD, so NFC and NFD spellings meet), drops combining marks
//! (accents, cedillas, tildes), folds the letters of Hausa, Zarma and other West African
//! alphabets that have no decomposition (`ɓ ɗ ƙ ƴ ŋ ɲ ɛ ɔ`, the apostrophe of glottal stops)
//! and French ligatures to the Latin letters a person without that keyboard types, and
//! lowercases.

use serde_json::{Map, Value};
use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

use super::{IG, places};

/// Pseudo resource type under which the engine indexes a Patient's blocking keys (as
/// reference-index entries `(PERSON_KEY_INDEX, "", key)`).
pub const PERSON_KEY_INDEX: &str = "urn:fieldmesh:person-key";

/// The openIMIS extension carrying an identity document (`number`, `type`).
pub const IDENTIFICATION_EXTENSION: &str =
    "https://openimis.github.io/openimis_fhir_r4_ig/StructureDefinition/patient-identification";

/// A name as compared for duplicates: decomposed, without marks, special letters folded,
/// lowercase, words separated by one space.
pub fn normalise_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut space = true;
    for c in name.nfkd() {
        if is_combining_mark(c) {
            continue;
        }
        let folded: &str = match c {
            'ɓ' | 'Ɓ' => "b",
            'ɗ' | 'Ɗ' | 'đ' | 'Đ' | 'ð' | 'Ð' => "d",
            'ƙ' | 'Ƙ' => "k",
            'ƴ' | 'Ƴ' => "y",
            'ŋ' | 'Ŋ' => "ng",
            'ɲ' | 'Ɲ' => "ny",
            'ɛ' | 'Ɛ' => "e",
            'ɔ' | 'Ɔ' => "o",
            'ø' | 'Ø' => "o",
            'ł' | 'Ł' => "l",
            'ı' => "i",
            'ß' => "ss",
            'æ' | 'Æ' => "ae",
            'œ' | 'Œ' => "oe",
            // Apostrophes of glottal stops and elisions (ʼ ' ’ ‘): "Ba'are" is "Baare".
            '\'' | '\u{2019}' | '\u{2018}' | '\u{02BC}' | '`' => "",
            _ => {
                if c.is_alphanumeric() {
                    for l in c.to_lowercase() {
                        out.push(l);
                    }
                    space = false;
                } else if !space {
                    out.push(' ');
                    space = true;
                }
                continue;
            }
        };
        out.push_str(folded);
        space = folded.is_empty() && space;
    }
    if out.ends_with(' ') {
        out.pop();
    }
    out
}

/// An identity document number as compared: letters and digits only, uppercase.
fn normalise_number(number: &str) -> String {
    number
        .chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_uppercase)
        .collect()
}

/// The blocking keys of a Patient (see the module docs). Empty for other types.
pub fn blocking_keys(ty: &str, json: &Map<String, Value>) -> Vec<String> {
    let mut keys = Vec::new();
    if ty != "Patient" {
        return keys;
    }
    // Identity documents.
    for e in json
        .get("extension")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if e.get("url").and_then(Value::as_str) != Some(IDENTIFICATION_EXTENSION) {
            continue;
        }
        let mut number = None;
        let mut kind = String::new();
        for sub in e
            .get("extension")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            match sub.get("url").and_then(Value::as_str) {
                Some("number") => number = sub.get("valueString").and_then(Value::as_str),
                Some("type") => {
                    kind = sub
                        .pointer("/valueCodeableConcept/coding/0/code")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                }
                _ => {}
            }
        }
        if let Some(n) = number.map(normalise_number).filter(|n| !n.is_empty()) {
            keys.push(format!("id:{}|{n}", kind.to_uppercase()));
        }
    }
    for i in json
        .get("identifier")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let passport = i
            .pointer("/type/coding")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|c| {
                c.get("code").and_then(Value::as_str) == Some("PPN")
                    && c.get("system")
                        .and_then(Value::as_str)
                        .is_none_or(|s| s.starts_with(IG) || s.contains("v2-0203"))
            });
        if passport
            && let Some(n) = i
                .get("value")
                .and_then(Value::as_str)
                .map(normalise_number)
                .filter(|n| !n.is_empty())
        {
            keys.push(format!("id:P|{n}"));
        }
    }
    // Name, birth date and village.
    let birth = json.get("birthDate").and_then(Value::as_str);
    let villages = places("Patient", json).unwrap_or_default();
    if let Some(birth) = birth
        && !villages.is_empty()
    {
        for name in json
            .get("name")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let family = name
                .get("family")
                .and_then(Value::as_str)
                .map(normalise_name)
                .unwrap_or_default();
            let mut given: Vec<String> = name
                .get("given")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .flat_map(|g| {
                    normalise_name(g)
                        .split(' ')
                        .map(String::from)
                        .collect::<Vec<_>>()
                })
                .filter(|g| !g.is_empty())
                .collect();
            given.sort();
            if family.is_empty() && given.is_empty() {
                continue;
            }
            keys.push(format!(
                "nbv:{family}|{}|{birth}|{}",
                given.join(" "),
                villages.join(",")
            ));
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_meet_across_accents_case_and_normal_forms() {
        // French, NFC and NFD.
        let nfc = "Aïcha Ouédraogo";
        let nfd: String = nfc.nfd().collect();
        assert_ne!(nfc, nfd);
        assert_eq!(normalise_name(nfc), normalise_name(&nfd));
        assert_eq!(normalise_name(nfc), "aicha ouedraogo");
        assert_eq!(normalise_name("AÏCHA  OUÉDRAOGO "), "aicha ouedraogo");
        assert_eq!(
            normalise_name("Françoise Lefèvre-Cœur"),
            "francoise lefevre coeur"
        );
        // Hausa: hooked letters and the glottal apostrophe.
        assert_eq!(normalise_name("Ɗan Ƙasa"), normalise_name("Dan Kasa"));
        assert_eq!(normalise_name("Ɓello"), "bello");
        assert_eq!(normalise_name("Ƴar'Adua"), "yaradua");
        assert_eq!(normalise_name("Yar’adua"), "yaradua");
        // Zarma: open vowels and the velar nasal.
        assert_eq!(normalise_name("Hamsɛ Ŋoɔ"), normalise_name("Hamse Ngoo"));
        assert_eq!(normalise_name("Ɲalla"), "nyalla");
    }

    fn patient(family: &str, given: &[&str], birth: &str, village: &str) -> Map<String, Value> {
        json!({"resourceType": "Patient", "birthDate": birth,
            "name": [{"family": family, "given": given}],
            "address": [{"extension": [{"url": super::super::LOCATION_EXTENSION,
                "valueReference": {"type": "Location", "identifier": {"system": "s", "value": village}}}]}]})
        .as_object()
        .cloned()
        .unwrap_or_default()
    }

    #[test]
    fn the_same_person_spelt_two_ways_shares_a_key() {
        let a = patient("Ouédraogo", &["Aïcha", "Mariama"], "1990-03-24", "V1");
        let b = patient("OUEDRAOGO", &["Mariama", "Aicha"], "1990-03-24", "V1");
        let ka = blocking_keys("Patient", &a);
        assert_eq!(ka, blocking_keys("Patient", &b));
        assert_eq!(
            ka,
            vec!["nbv:ouedraogo|aicha mariama|1990-03-24|V1".to_string()]
        );
        // Another birth date or village: another person.
        let c = patient("Ouédraogo", &["Aïcha", "Mariama"], "1990-03-25", "V1");
        let d = patient("Ouédraogo", &["Aïcha", "Mariama"], "1990-03-24", "V2");
        assert_ne!(ka, blocking_keys("Patient", &c));
        assert_ne!(ka, blocking_keys("Patient", &d));
    }

    #[test]
    fn identity_documents_are_keys() {
        let mut a = patient("X", &["Y"], "2000-01-01", "V1");
        a.insert(
            "extension".into(),
            json!([{"url": IDENTIFICATION_EXTENSION, "extension": [
            {"url": "number", "valueString": "pass b-1"},
            {"url": "type", "valueCodeableConcept": {"coding": [{"code": "P"}]}}]}]),
        );
        a.insert("identifier".into(), json!([{"type": {"coding": [{"system": format!("{IG}/CodeSystem/openimis-identifiers"), "code": "PPN"}]}, "value": "PASSB1"}]));
        let keys = blocking_keys("Patient", &a);
        assert!(keys.contains(&"id:P|PASSB1".to_string()), "{keys:?}");
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert!(blocking_keys("Group", &a).is_empty());
    }
}
