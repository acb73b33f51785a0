//! Scenarios: data files describing a field deployment, its connectivity and its faults.

use serde::{Deserialize, Serialize};

/// Network faults during sessions, as probabilities per frame.
///
/// Sessions run on an ordered, authenticated stream (Yamux over Noise over TCP or QUIC), so the
/// network cannot deliver a frame twice, out of order or from another session: Noise rejects
/// such a frame and the connection closes. Every fault therefore ends the session at the frame
/// it hits, on both sides; what each side completed before stays. The kinds are kept apart so
/// that a scenario says what it models.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// The connection drops (Wi-Fi lost, phone out of range).
    #[serde(default)]
    pub drop: f64,
    /// The network duplicates a frame (Noise refuses it: the connection closes).
    #[serde(default)]
    pub duplicate: f64,
    /// The network reorders frames (same).
    #[serde(default)]
    pub reorder: f64,
    /// A frame arrives after the receiver's frame deadline (the session ends in a timeout).
    #[serde(default)]
    pub delay: f64,
    /// A frame captured from another session is injected (Noise refuses it).
    #[serde(default)]
    pub replay: f64,
}

/// Hubs cut off from central between two days.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    /// Indexes of the hubs cut off.
    pub hubs: Vec<usize>,
    /// First day of the cut.
    pub from_day: u32,
    /// First day it is healed; `null`: never (not even in the heal phase).
    pub to_day: Option<u32>,
}

/// Officers given a new certificate naming other villages, on one day.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rescope {
    /// The day central issues the new certificates.
    pub day: u32,
    /// How many officers (the first honest ones of each hub, in turn).
    pub officers: usize,
}

/// A deployment and its month.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name (used for reports).
    pub name: String,
    /// Default seed.
    pub seed: u64,
    /// Health-facility hubs.
    pub hubs: usize,
    /// Enrolment officers' phones per hub.
    pub officers_per_hub: usize,
    /// Simulated days.
    pub days: u32,
    /// Families an officer enrols per day, on average.
    pub families_per_officer_day: f64,
    /// Probability that an officer edits an insuree of their villages on a day.
    #[serde(default)]
    pub edit_probability: f64,
    /// Probability that two officers of one hub meet on a day.
    pub meet_probability: f64,
    /// Probability that an officer passes by their hub on a day.
    pub hub_visit_probability: f64,
    /// Days between a hub's links to central, by hub (cycled): 1 = daily, 7 = weekly.
    pub hub_central_every_days: Vec<u32>,
    /// Probability that a day has no link at all.
    #[serde(default)]
    pub no_link_day_probability: f64,
    /// Probability that an officer hands a bundle to the hub by hand (no network) on a day.
    #[serde(default)]
    pub bundle_probability: f64,
    /// Message faults (not applied in the heal phase).
    #[serde(default)]
    pub faults: Faults,
    /// Probability that an officer's phone crashes on a day, losing what it had not flushed.
    #[serde(default)]
    pub crash_probability: f64,
    /// Officers whose clock is wrong: the first is 3 days behind (still valid), the next two
    /// years ahead (outside its certificate: its writes are refused).
    #[serde(default)]
    pub wrong_clock_officers: usize,
    /// Byzantine officers: they forge Locations, write outside their villages and corrupt
    /// signatures in what they send.
    #[serde(default)]
    pub byzantine_officers: usize,
    /// A partition between hubs and central.
    #[serde(default)]
    pub partition: Option<Partition>,
    /// Officers re-scoped to other villages of their district (a new certificate).
    #[serde(default)]
    pub rescope: Option<Rescope>,
    /// Probability that an officer moves an insuree of theirs to their other village on a day.
    #[serde(default)]
    pub move_probability: f64,
    /// Canary: every device keeps everything it ever held (never hands data off). The privacy
    /// and scope invariants must then fail.
    #[serde(default)]
    pub canary_hoarding_devices: bool,
    /// Central's services (canonical ids, business numbers, duplicate persons, leases) run on
    /// central after every session and bundle that reaches it. On unless set to false.
    #[serde(default = "on")]
    pub central_services: bool,
    /// Probability that an officer registers again, on a day, an insuree of its villages it
    /// holds (same name, birth date, village and card number, as a second officer would):
    /// central must flag the number and link the person.
    #[serde(default)]
    pub duplicate_probability: f64,
    /// Claims each health facility's claim administrator enters per day, on average (0: the
    /// deployment has no claim administrators). One administrator per hub, at the district's
    /// facility, its catchment the district's villages.
    #[serde(default)]
    pub claims_per_admin_day: f64,
    /// Probability that a claim is for an insuree of another district (the patient shows a
    /// card the facility's device has never seen: the claim is checked provisionally, and
    /// the facility learns central's verdict, never the insuree).
    #[serde(default)]
    pub foreign_claim_probability: f64,
    /// Rounds of full connectivity after the last day within which honest nodes must converge.
    pub heal_rounds: u32,
}

fn on() -> bool {
    true
}

impl Scenario {
    /// Reads a scenario file (JSON).
    pub fn from_file(path: &std::path::Path) -> Result<Self, crate::SimError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| crate::SimError::Scenario(format!("{}: {e}", path.display())))?;
        serde_json::from_str(&text)
            .map_err(|e| crate::SimError::Scenario(format!("{}: {e}", path.display())))
    }

    /// Number of officers.
    pub fn officers(&self) -> usize {
        self.hubs * self.officers_per_hub
    }
}
