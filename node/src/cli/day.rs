//! `fieldmesh demo run`: a day in the field, with every node a process of its own on loopback.
//!
//! Morning at the district office, every device syncs through the hub (reference data, numbers
//! leased by central, the facility's price list). The two enrolment officers go to their
//! villages without a network: each registers a family, enrols it and takes the contribution,
//! priced on the phone. They meet at the market and sync phone to phone. Officer-2 reaches the
//! hub, which relays everything to central: central gives canonical ids and checks every
//! policy. The facility's claim administrator receives the new family, loses its link, enters a
//! claim offline and gets a provisional answer; when the link is back, central adjudicates and
//! its verdict reaches the facility. Officer-1 comes back in the evening. Each step prints a
//! table; the last shows what every node holds, also written to `<out>/day.json`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fieldmesh_fhir_docs::openimis::IG;
use fieldmesh_fhir_docs::openimis::demo::Village;
use fieldmesh_fhir_docs::openimis::policy::PREMIUM_EXTENSION;
use serde_json::{Value, json};

/// How long a step may wait for the network to bring something.
const WAIT: Duration = Duration::from_secs(90);

/// The resource types the closing table counts.
const COUNTED: &[(&str, &str)] = &[
    ("Patient", "insurees"),
    ("Group", "families"),
    ("Contract", "policies"),
    ("Claim", "claims"),
    ("ClaimResponse", "verdicts"),
    ("List", "price lists"),
    ("Location", "locations"),
];

struct Member {
    data: PathBuf,
    http: SocketAddr,
    p2p: u16,
    peer_id: String,
    token: String,
    role: String,
}

/// The deployment's nodes and the processes running them.
pub(crate) struct Field {
    members: BTreeMap<String, Member>,
    running: BTreeMap<String, Child>,
    log: PathBuf,
    agent: ureq::Agent,
    /// When the last process was started: what a step's time is counted from.
    last_start: Instant,
}

impl Drop for Field {
    fn drop(&mut self) {
        for (_, mut c) in std::mem::take(&mut self.running) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

/// Prints a table: a title, a header row and aligned columns.
fn table(title: &str, headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    println!("\n{title}");
    let line = |cells: Vec<String>| {
        let mut s = String::from("  ");
        for (i, c) in cells.iter().enumerate() {
            let pad = widths.get(i).copied().unwrap_or(0);
            s.push_str(c);
            if i + 1 < cells.len() {
                s.push_str(&" ".repeat(pad.saturating_sub(c.chars().count()) + 2));
            }
        }
        println!("{}", s.trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    line(widths.iter().map(|w| "─".repeat(*w)).collect());
    for r in rows {
        line(r.clone());
    }
}

impl Field {
    pub(crate) fn new(deployment: &Value, out: &Path) -> Result<Self> {
        let mut members = BTreeMap::new();
        for n in deployment["nodes"].as_array().into_iter().flatten() {
            let name = text(&n["name"]);
            let data = PathBuf::from(text(&n["data_dir"]));
            let http: SocketAddr = text(&n["http"])
                .parse()
                .with_context(|| format!("deployment.json: {name}'s http address"))?;
            let dir = fieldmesh_node::config::DataDir::open(&data)?;
            members.insert(
                name,
                Member {
                    token: dir.token()?,
                    p2p: http
                        .port()
                        .checked_add(1000)
                        .context("the demo's ports must be below 64536")?,
                    http,
                    peer_id: text(&n["peer_id"]),
                    role: n["scope"]["roles"]
                        .get(0)
                        .map(text)
                        .unwrap_or_else(|| text(&n["role"])),
                    data,
                },
            );
        }
        Ok(Self {
            members,
            running: BTreeMap::new(),
            log: out.join("fieldmesh.log"),
            last_start: Instant::now(),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(30)))
                .build()
                .into(),
        })
    }

    fn member(&self, name: &str) -> Result<&Member> {
        self.members
            .get(name)
            .with_context(|| format!("the deployment has no node {name}"))
    }

    /// The libp2p address `name` listens on.
    fn addr(&self, name: &str) -> Result<String> {
        let m = self.member(name)?;
        Ok(format!("/ip4/127.0.0.1/tcp/{}/p2p/{}", m.p2p, m.peer_id))
    }

    /// Starts `name` as a process of its own (`fieldmesh run`), knowing only `peers`, and waits
    /// until its API answers.
    pub(crate) fn start(&mut self, name: &str, peers: &[&str]) -> Result<()> {
        if self.running.contains_key(name) {
            self.stop(name)?;
        }
        let m = self.member(name)?;
        let exe = std::env::current_exe().context("cannot find the fieldmesh binary")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(exe);
        cmd.args(["run", "--data"])
            .arg(&m.data)
            .args(["--http", &m.http.to_string()])
            .args(["--listen", &format!("/ip4/127.0.0.1/tcp/{}", m.p2p)])
            .arg("--no-mdns")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        for p in peers {
            cmd.args(["--peer", &self.addr(p)?]);
        }
        self.last_start = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        self.running.insert(name.to_string(), child);
        let t = Instant::now();
        while self.get(name, "/status").is_err() {
            if let Some(c) = self.running.get_mut(name)
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!(
                    "{name} exited at start ({status}); see {}",
                    self.log.display()
                );
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("{name} did not answer within 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops `name` (SIGTERM: it finishes what it writes), waiting for it to exit.
    pub(crate) fn stop(&mut self, name: &str) -> Result<()> {
        let Some(mut child) = self.running.remove(name) else {
            return Ok(());
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Waits for the running nodes (`--serve`): until they stop, or Ctrl-C.
    pub(crate) fn serve(&mut self) -> Result<()> {
        for (_, c) in self.running.iter_mut() {
            c.wait()?;
        }
        Ok(())
    }

    fn url(&self, name: &str, path: &str) -> Result<String> {
        Ok(format!("http://{}{path}", self.member(name)?.http))
    }

    pub(crate) fn get(&self, name: &str, path: &str) -> Result<(u16, Value)> {
        let m = self.member(name)?;
        let mut r = self
            .agent
            .get(self.url(name, path)?)
            .header("Authorization", &format!("Bearer {}", m.token))
            .call()?;
        let status = r.status().as_u16();
        let body = r.body_mut().read_json::<Value>().unwrap_or(Value::Null);
        Ok((status, body))
    }

    fn send(&self, method: &str, name: &str, path: &str, body: &Value) -> Result<(u16, Value)> {
        let m = self.member(name)?;
        let auth = format!("Bearer {}", m.token);
        let url = self.url(name, path)?;
        let req = match method {
            "PUT" => self.agent.put(url),
            _ => self.agent.post(url),
        };
        let mut r = req
            .header("Authorization", &auth)
            .header("Content-Type", "application/fhir+json")
            .send_json(body)?;
        let status = r.status().as_u16();
        let body = r.body_mut().read_json::<Value>().unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// Whether `name` holds `ty/id`.
    fn holds(&self, name: &str, ty: &str, id: &str) -> bool {
        self.get(name, &format!("/fhir/{ty}/{id}"))
            .is_ok_and(|(s, _)| s == 200)
    }

    /// Waits until `done` holds, or fails saying `what` did not happen. Returns the seconds
    /// since the last process started (the node's start, its sessions, and the wait).
    fn wait_for(&self, what: &str, mut done: impl FnMut(&Self) -> bool) -> Result<f64> {
        let t = Instant::now();
        while t.elapsed() < WAIT {
            if done(self) {
                return Ok(self.last_start.elapsed().as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "{what} did not happen within {} s (the nodes' log: {})",
            WAIT.as_secs(),
            self.log.display()
        )
    }

    /// Fails unless `name` is connected to no peer (what the step says is done offline is).
    fn offline(&self, name: &str) -> Result<()> {
        let peers = self.status(name)["peers"].as_u64();
        if peers != Some(0) {
            bail!("{name} should be offline but is connected to {peers:?} peers");
        }
        Ok(())
    }

    fn status(&self, name: &str) -> Value {
        self.get(name, "/status")
            .map(|(_, s)| s)
            .unwrap_or(Value::Null)
    }
}

fn identifier(code: &str, value: &str) -> Value {
    json!({"type": {"coding": [{"system": format!("{IG}/CodeSystem/openimis-identifiers"), "code": code}]}, "value": value})
}

fn address(v: &Village) -> Value {
    json!({"use": "home", "type": "physical", "city": v.2, "municipality": v.3, "district": v.4, "state": v.5,
        "extension": [{"url": format!("{IG}/StructureDefinition/address-municipality"), "valueString": v.3},
            {"url": format!("{IG}/StructureDefinition/address-location-reference"), "valueReference": {"reference": format!("Location/{}", v.0)}}]})
}

fn patient(family: &str, given: &str, gender: &str, birth: &str, v: &Village, head: bool) -> Value {
    json!({"resourceType": "Patient", "name": [{"use": "usual", "family": family, "given": [given]}],
        "gender": gender, "birthDate": birth, "address": [address(v)],
        "extension": [{"url": format!("{IG}/StructureDefinition/patient-is-head"), "valueBoolean": head}]})
}

/// The CHFID a node gave a Patient (its `Code` identifier).
fn chfid(p: &Value) -> String {
    p["identifier"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["type"]["coding"][0]["code"] == "Code")
        .map(|i| text(&i["value"]))
        .unwrap_or_default()
}

/// What an officer registered offline.
struct Family {
    group: String,
    head: String,
    head_chfid: String,
    members: usize,
    policy: String,
    value: String,
    status: String,
}

/// What an officer enrols: a family name, its people (given name, gender, birth date; the head
/// first), its village, and the receipt of its contribution.
struct Enrolment<'a> {
    family: &'a str,
    people: &'a [(&'a str, &'a str, &'a str)],
    village: &'a Village,
    receipt: &'a str,
}

/// Registers a family, enrols it in `product` and takes the contribution it owes, through
/// `officer`'s API; rows for the step's table.
fn enrol(
    field: &Field,
    officer: &str,
    e: &Enrolment<'_>,
    product: &str,
    rows: &mut Vec<Vec<String>>,
) -> Result<Family> {
    let (family, people, v, receipt) = (e.family, e.people, e.village, e.receipt);
    let mut ids = Vec::new();
    let mut head_chfid = String::new();
    for (i, (given, gender, birth)) in people.iter().enumerate() {
        let (s, p) = field.send(
            "POST",
            officer,
            "/fhir/Patient",
            &patient(family, given, gender, birth, v, i == 0),
        )?;
        if s != 201 {
            bail!("{officer}: registering {given} failed ({s}): {p}");
        }
        let number = chfid(&p);
        if i == 0 {
            head_chfid = number.clone();
        }
        rows.push(vec![
            officer.into(),
            format!("register {given} {family}"),
            s.to_string(),
            format!("insurance number {number} (from central's lease)"),
        ]);
        ids.push(text(&p["id"]));
    }
    let (s, g) = field.send("POST", officer, "/fhir/Group", &json!({"resourceType": "Group", "type": "person", "actual": true,
        "name": family, "identifier": [identifier("Code", &head_chfid)],
        "member": ids.iter().map(|id| json!({"entity": {"reference": format!("Patient/{id}")}})).collect::<Vec<_>>(),
        "extension": [{"url": format!("{IG}/StructureDefinition/group-address"), "valueAddress": address(v)},
            {"url": format!("{IG}/StructureDefinition/group-type"), "valueCodeableConcept": {"coding": [{"code": "H"}]}}]}))?;
    if s != 201 {
        bail!("{officer}: the family failed ({s}): {g}");
    }
    let group = text(&g["id"]);
    rows.push(vec![
        officer.into(),
        format!("family {family}, {} members", ids.len()),
        s.to_string(),
        format!("Group/{}", short(&group)),
    ]);
    let today = fieldmesh_fhir_docs::openimis::dates::Date::from_unix(fieldmesh_engine::now());
    let mut contract = json!({"resourceType": "Contract", "status": "Offered", "legalState": {"text": "Offered"},
        "subject": [{"reference": format!("Group/{group}")}],
        "scope": {"coding": [{"system": format!("{IG}/CodeSystem/contract-scope"), "code": "informal"}]},
        "term": [{"offer": {"party": [{"reference": [{"reference": format!("Patient/{}", ids[0])}], "role": {"coding": [{"code": "beneficiary"}]}}]},
            "asset": [{"typeReference": ids.iter().map(|id| json!({"reference": format!("Patient/{id}")})).collect::<Vec<_>>(),
                "period": [{"start": today.to_string()}],
                "valuedItem": [{"entityReference": {"reference": format!("InsurancePlan/{product}")}}]}]}]});
    let (s, c) = field.send("POST", officer, "/fhir/Contract", &contract)?;
    if s != 201 {
        bail!("{officer}: the policy failed ({s}): {c}");
    }
    let policy = text(&c["id"]);
    let value = c
        .pointer("/term/0/asset/0/valuedItem/0/net/value")
        .map(text)
        .unwrap_or_default();
    rows.push(vec![
        officer.into(),
        "enrol the family in PRD01".into(),
        s.to_string(),
        format!(
            "value {value} XOF priced on the phone, status {}",
            text(&c["status"])
        ),
    ]);
    // The family pays what it owes, in cash, on the spot.
    contract = c.clone();
    contract["term"][0]["asset"][0]["extension"] = json!([{"url": PREMIUM_EXTENSION, "extension": [
        {"url": "payer", "valueCodeableConcept": {"coding": [{"code": "beneficiary"}]}},
        {"url": "category", "valueCodeableConcept": {"coding": [{"code": "C"}]}},
        {"url": "amount", "valueMoney": {"value": serde_json::from_str::<Value>(&value).unwrap_or(json!(0)), "currency": "XOF"}},
        {"url": "receipt", "valueString": receipt},
        {"url": "date", "valueDate": today.to_string()},
        {"url": "type", "valueCodeableConcept": {"coding": [{"code": "C"}]}}]}]);
    let (s, c) = field.send(
        "PUT",
        officer,
        &format!("/fhir/Contract/{policy}"),
        &contract,
    )?;
    if s != 200 {
        bail!("{officer}: the payment failed ({s}): {c}");
    }
    let status = text(&c["status"]);
    rows.push(vec![
        officer.into(),
        format!("take {value} XOF, receipt {receipt}"),
        s.to_string(),
        format!(
            "policy {status} from {}",
            c.pointer("/term/0/asset/0/usePeriod/0/start")
                .map(text)
                .unwrap_or_default()
        ),
    ]);
    Ok(Family {
        group,
        head: ids[0].clone(),
        head_chfid,
        members: ids.len(),
        policy,
        value,
        status,
    })
}

fn short(id: &str) -> String {
    id.chars().take(8).collect()
}

fn reason_of(item: &Value) -> String {
    let adj = item["adjudication"].as_array().cloned().unwrap_or_default();
    let last = adj.last().cloned().unwrap_or(Value::Null);
    let code = text(&last["reason"]["coding"][0]["code"]);
    let display = text(&last["reason"]["coding"][0]["display"]);
    if code == "0" {
        format!(
            "passed, {} × {}",
            text(&last["value"]),
            text(&last["amount"]["value"])
        )
    } else {
        format!("rejected {code} {}", display.to_lowercase())
    }
}

/// Runs the day (see the module's documentation). `refdata` is the deployment's reference data;
/// `serve` keeps every node running afterwards.
pub(crate) fn run_day(
    field: &mut Field,
    refdata: &fieldmesh_fhir_docs::openimis::demo::Reference,
    out: &Path,
    serve: bool,
) -> Result<()> {
    let shared = refdata.villages[0].clone();
    let own2 = refdata.villages[2].clone();
    let product = refdata.product.clone();
    let hf_code = refdata.facilities[0].1.clone();

    // 1. Morning: everyone syncs through the hub.
    for (name, peers) in [
        ("hub", vec![]),
        ("central", vec!["hub"]),
        ("officer-1", vec!["hub"]),
        ("officer-2", vec!["hub"]),
        ("claims-1", vec!["hub"]),
    ] {
        field.start(name, &peers)?;
    }
    println!(
        "\nfive nodes run as processes of their own on loopback (logs: {}); central and the devices know only the hub",
        field.log.display()
    );
    let secs = field.wait_for("the morning sync", |f| {
        ["officer-1", "officer-2"].iter().all(|o| {
            f.holds(o, "InsurancePlan", &product)
                && f.status(o)["leased_numbers_left"]["chfid"]
                    .as_u64()
                    .unwrap_or(0)
                    > 0
        }) && f.status("claims-1")["leased_numbers_left"]["claim-code"]
            .as_u64()
            .unwrap_or(0)
            > 0
            && f.get("claims-1", "/fhir/List?identifier=PL-HF000")
                .is_ok_and(|(_, b)| b["total"].as_u64() == Some(1))
    })?;
    let mut rows = Vec::new();
    for name in ["central", "hub", "officer-1", "officer-2", "claims-1"] {
        let st = field.status(name);
        let left = &st["leased_numbers_left"];
        let leased = match (left["chfid"].as_u64(), left["claim-code"].as_u64()) {
            (Some(n), _) if n > 0 => format!("{n} insurance numbers"),
            (_, Some(n)) if n > 0 => format!("{n} claim codes"),
            _ => "—".into(),
        };
        let list = field
            .get(name, "/fhir/List?identifier=PL-HF000")
            .map(|(_, b)| b["total"].as_u64() == Some(1))
            .unwrap_or(false);
        rows.push(vec![
            name.to_string(),
            field.member(name)?.role.clone(),
            text(&st["documents"]),
            leased,
            if list {
                format!("{hf_code}'s")
            } else {
                "—".into()
            },
        ]);
    }
    table(
        &format!(
            "1. Morning at the district office: every device syncs through the hub ({secs:.1} s)"
        ),
        &[
            "node",
            "role",
            "documents",
            "numbers leased by central",
            "price list",
        ],
        &rows,
    );

    // 2. In the villages, offline.
    for name in ["officer-1", "officer-2", "claims-1"] {
        field.stop(name)?;
    }
    field.start("officer-1", &[])?;
    field.start("officer-2", &[])?;
    field.offline("officer-1")?;
    field.offline("officer-2")?;
    // Receipts are unique within a product (openIMIS): each run of the day writes its own.
    let run = fieldmesh_engine::now();
    let (receipt1, receipt2) = (format!("RC-{run}-1"), format!("RC-{run}-2"));
    let mut rows = Vec::new();
    let fam1 = enrol(
        field,
        "officer-1",
        &Enrolment {
            family: "Maïga",
            people: &[
                ("Aïssatou", "female", "1994-03-12"),
                ("Moussa", "male", "2019-07-01"),
            ],
            village: &shared,
            receipt: &receipt1,
        },
        &product,
        &mut rows,
    )?;
    let fam2 = enrol(
        field,
        "officer-2",
        &Enrolment {
            family: "Issoufou",
            people: &[("Hadiza", "female", "1988-11-23")],
            village: &own2,
            receipt: &receipt2,
        },
        &product,
        &mut rows,
    )?;
    let (s, oo) = field.send(
        "POST",
        "officer-1",
        "/fhir/Patient",
        &patient("Sani", "Ramatou", "female", "1990-01-01", &own2, true),
    )?;
    rows.push(vec![
        "officer-1".into(),
        format!("register someone in {} (officer-2's village)", own2.2),
        s.to_string(),
        text(&oo["issue"][0]["diagnostics"])
            .chars()
            .take(90)
            .collect(),
    ]);
    table(
        &format!(
            "2. In the villages, no network: officer-1 in {} (shared with officer-2), officer-2 in {}",
            shared.2, own2.2
        ),
        &["node", "does", "HTTP", "answer"],
        &rows,
    );

    // 3. The officers meet at the market: phone to phone.
    field.stop("officer-2")?;
    field.start("officer-2", &["officer-1"])?;
    let secs = field.wait_for("officer-1's family reaching officer-2", |f| {
        f.holds("officer-2", "Patient", &fam1.head)
            && f.holds("officer-2", "Contract", &fam1.policy)
    })?;
    let rows = vec![
        vec![
            format!("family Maïga ({})", shared.2),
            "officer-1".into(),
            yes(field.holds("officer-1", "Group", &fam1.group)),
            yes(field.holds("officer-2", "Group", &fam1.group)),
        ],
        vec![
            format!("family Issoufou ({})", own2.2),
            "officer-2".into(),
            yes(field.holds("officer-1", "Group", &fam2.group)),
            yes(field.holds("officer-2", "Group", &fam2.group)),
        ],
    ];
    table(
        &format!(
            "3. The officers meet at the market and sync phone to phone ({secs:.1} s): each receives only what lies in its own villages"
        ),
        &["registered", "by", "officer-1 holds", "officer-2 holds"],
        &rows,
    );

    // 4. Officer-2 reaches the hub; central gives canonical ids and checks the policies.
    // Officer-1 stays in its villages, out of reach.
    field.stop("officer-1")?;
    field.stop("officer-2")?;
    field.start("officer-2", &["hub"])?;
    let central_system = text(&field.status("central")["system"]);
    let canonical = |f: &Field, node: &str, ty: &str, id: &str| -> Option<String> {
        let (s, r) = f.get(node, &format!("/fhir/{ty}/{id}")).ok()?;
        (s == 200).then_some(())?;
        r["identifier"]
            .as_array()?
            .iter()
            .find(|i| text(&i["system"]) == central_system)
            .map(|i| text(&i["value"]))
    };
    let secs = field.wait_for("central's canonical ids reaching officer-2", |f| {
        [
            ("Patient", &fam1.head),
            ("Contract", &fam1.policy),
            ("Patient", &fam2.head),
        ]
        .iter()
        .all(|(ty, id)| canonical(f, "officer-2", ty, id).is_some())
    })?;
    let mut rows = Vec::new();
    for (what, by, ty, id) in [
        ("Aïssatou Maïga", "officer-1", "Patient", &fam1.head),
        ("her family's policy", "officer-1", "Contract", &fam1.policy),
        ("Hadiza Issoufou", "officer-2", "Patient", &fam2.head),
        ("her policy", "officer-2", "Contract", &fam2.policy),
    ] {
        let (_, r) = field.get("central", &format!("/fhir/{ty}/{id}"))?;
        let detail = if ty == "Patient" {
            format!("insurance number {}", chfid(&r))
        } else {
            format!(
                "value {} XOF, {}",
                r.pointer("/term/0/asset/0/valuedItem/0/net/value")
                    .map(text)
                    .unwrap_or_default(),
                text(&r["status"])
            )
        };
        rows.push(vec![
            what.into(),
            by.into(),
            canonical(field, "central", ty, id)
                .map(|c| short(&c))
                .unwrap_or_else(|| "—".into()),
            detail,
            yes(field.holds("hub", ty, id)),
        ]);
    }
    table(
        &format!(
            "4. Officer-2 reaches the hub, which relays to central: central gives each resource its canonical id and checks every policy again ({secs:.1} s)"
        ),
        &[
            "resource",
            "created by",
            "canonical id",
            "at central",
            "hub holds",
        ],
        &rows,
    );

    // 5. The health facility: claims-1 receives the new family, then the link drops.
    field.start("claims-1", &["hub"])?;
    let secs = field.wait_for("the new family reaching the facility", |f| {
        f.holds("claims-1", "Patient", &fam1.head) && f.holds("claims-1", "Contract", &fam1.policy)
    })?;
    field.stop("claims-1")?;
    field.start("claims-1", &[])?;
    let line = |seq: u64, kind: &str, code: &str, qty: f64, price: Option<f64>| {
        let ty = if kind == "item" {
            "Medication"
        } else {
            "ActivityDefinition"
        };
        let mut l = json!({"sequence": seq, "category": {"text": kind}, "productOrService": {"text": code},
            "quantity": {"value": qty},
            "extension": [{"url": ty, "valueReference": {"type": ty, "identifier": identifier("Code", code)}}]});
        if let Some(p) = price {
            l["unitPrice"] = json!({"value": p, "currency": "$"});
        }
        l
    };
    let today =
        fieldmesh_fhir_docs::openimis::dates::Date::from_unix(fieldmesh_engine::now()).to_string();
    let lines = [
        ("service", "S0001", "Consultation générale", 1.0, None),
        ("item", "I0001", "Paracétamol 500mg", 2.0, Some(150.0)),
        ("service", "S0002", "Accouchement", 1.0, Some(5000.0)),
    ];
    // As the openIMIS claims app posts it: code references only, no claim code (the device
    // takes one from its lease), `total` the sum of unit prices.
    let claim = json!({"resourceType": "Claim", "status": "active", "use": "claim",
        "type": {"coding": [{"system": format!("{IG}/CodeSystem-claim-visit-type.html"), "code": "O", "display": "Other"}]},
        "patient": {"type": "Patient", "identifier": identifier("Code", &fam1.head_chfid)},
        "provider": {"type": "Organization", "identifier": identifier("Code", &hf_code)},
        "enterer": {"type": "Practitioner", "identifier": identifier("Code", &refdata.claim_admins[0].1)},
        "created": today, "billablePeriod": {"start": today, "end": today},
        "diagnosis": [{"sequence": 1, "diagnosisCodeableConcept": {"coding": [{"system": format!("{IG}/CodeSystem/diagnosis-ICD10-level1"), "code": "B54"}]}}],
        "item": lines.iter().enumerate().map(|(i, (k, c, _, q, p))| line(i as u64 + 1, k, c, *q, *p)).collect::<Vec<_>>(),
        "total": {"value": 5150.0, "currency": "$"}});
    field.offline("claims-1")?;
    let (s, answer) = field.send("POST", "claims-1", "/fhir/Claim", &claim)?;
    if s != 201 {
        bail!("claims-1: the claim failed ({s}): {answer}");
    }
    let claim_id = text(&answer["request"]["reference"])
        .trim_start_matches("Claim/")
        .to_string();
    let claim_code = answer["identifier"][0]["value"].clone();
    let provisional: Vec<String> = answer["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| text(&e["url"]).ends_with("claim-provisional"))
        .flat_map(|e| e["extension"].as_array().cloned().unwrap_or_default())
        .map(|c| text(&c["valueCode"]))
        .collect();
    let device_verdicts: Vec<String> = answer["item"]
        .as_array()
        .into_iter()
        .flatten()
        .map(reason_of)
        .collect();
    let mut rows = Vec::new();
    for (i, (_, code, name, qty, asked)) in lines.iter().enumerate() {
        rows.push(vec![
            format!("{code} {name}"),
            qty.to_string(),
            asked.map_or_else(|| "(none)".into(), |a| a.to_string()),
            device_verdicts.get(i).cloned().unwrap_or_default(),
        ]);
    }
    table(
        &format!(
            "5. At the health facility {hf_code} ({secs:.1} s to receive the new family), the link drops: claim {} for {} entered offline, answered at once (provisional: {})",
            text(&claim_code),
            fam1.head_chfid,
            provisional.join(", ")
        ),
        &["line", "quantity", "asked", "the device's answer"],
        &rows,
    );
    println!("  {}", text(&answer["disposition"]));
    for n in answer["processNote"].as_array().into_iter().flatten() {
        println!("  note: {}", text(&n["text"]));
    }

    // 6. The link comes back: central adjudicates, its verdict reaches the facility.
    field.stop("claims-1")?;
    field.start("claims-1", &["hub"])?;
    let by_central = |f: &Field| -> Option<Value> {
        let (_, b) = f
            .get(
                "claims-1",
                &format!("/fhir/ClaimResponse?request=Claim/{claim_id}"),
            )
            .ok()?;
        let r = b["entry"][0]["resource"].clone();
        text(&r["disposition"]).ends_with("by central").then_some(r)
    };
    let secs = field.wait_for("central's verdict reaching the facility", |f| {
        by_central(f).is_some()
    })?;
    let central_answer = by_central(field).context("central's verdict")?;
    let mut rows = Vec::new();
    for (i, (_, code, name, _, _)) in lines.iter().enumerate() {
        rows.push(vec![
            format!("{code} {name}"),
            device_verdicts.get(i).cloned().unwrap_or_default(),
            central_answer["item"]
                .get(i)
                .map(reason_of)
                .unwrap_or_default(),
        ]);
    }
    table(
        &format!(
            "6. The link is back: the claim reaches central through the hub, central adjudicates with everything and its verdict comes back to {hf_code} ({secs:.1} s)"
        ),
        &["line", "provisional (device)", "authoritative (central)"],
        &rows,
    );

    // 7. Evening: officer-1 returns; every node syncs.
    field.stop("officer-1")?;
    field.start("officer-1", &["hub"])?;
    let secs = field.wait_for("officer-1 receiving central's canonical ids", |f| {
        canonical(f, "officer-1", "Patient", &fam1.head).is_some()
            && canonical(f, "officer-1", "Contract", &fam1.policy).is_some()
    })?;
    field.wait_for("the hub holding central's verdict", |f| {
        f.get(
            "hub",
            &format!("/fhir/ClaimResponse?request=Claim/{claim_id}"),
        )
        .is_ok_and(|(_, b)| b["total"].as_u64() == Some(1))
    })?;
    let mut rows = Vec::new();
    let mut held = serde_json::Map::new();
    for name in ["central", "hub", "officer-1", "officer-2", "claims-1"] {
        let st = field.status(name);
        let counts = &st["held"];
        let mut row = vec![name.to_string(), text(&st["documents"])];
        for (ty, _) in COUNTED {
            row.push(counts[*ty].as_u64().unwrap_or(0).to_string());
        }
        rows.push(row);
        held.insert(
            name.to_string(),
            json!({"documents": st["documents"], "held": counts, "quarantined": st["quarantined"]}),
        );
    }
    let mut headers = vec!["node", "documents"];
    headers.extend(COUNTED.iter().map(|(_, n)| *n));
    table(
        &format!("7. Evening: officer-1 returns to the hub ({secs:.1} s). What every node holds"),
        &headers,
        &rows,
    );
    let facts = |id: &str, ty: &str| -> Value {
        json!(
            ["central", "hub", "officer-1", "officer-2", "claims-1"]
                .iter()
                .filter(|n| field.holds(n, ty, id))
                .collect::<Vec<_>>()
        )
    };
    let day = json!({
        "families": [
            {"by": "officer-1", "group": fam1.group, "head": fam1.head, "chfid": fam1.head_chfid, "members": fam1.members,
             "policy": fam1.policy, "value": fam1.value, "status": fam1.status, "held_by": facts(&fam1.group, "Group")},
            {"by": "officer-2", "group": fam2.group, "head": fam2.head, "chfid": fam2.head_chfid, "members": fam2.members,
             "policy": fam2.policy, "value": fam2.value, "status": fam2.status, "held_by": facts(&fam2.group, "Group")},
        ],
        "claim": {"id": claim_id, "code": claim_code, "provisional": provisional,
                  "device": device_verdicts, "central": central_answer, "held_by": facts(&claim_id, "Claim")},
        "nodes": held,
    });
    std::fs::write(out.join("day.json"), serde_json::to_string_pretty(&day)?)?;
    println!(
        "\nthe day's facts are in {}; every node's data directory is under {}",
        out.join("day.json").display(),
        out.display()
    );
    if serve {
        let m = field.member("claims-1")?;
        println!(
            "\nevery node keeps running — press Ctrl-C to stop. Try the claim administrator's API:\n  curl -s -H \"Authorization: Bearer {}\" 'http://{}/fhir/ClaimResponse?request=Claim/{claim_id}'",
            m.token, m.http
        );
        field.serve()?;
    } else {
        for name in ["officer-1", "officer-2", "claims-1", "central", "hub"] {
            field.stop(name)?;
        }
        println!(
            "(run `fieldmesh demo run --out {} --serve` to keep the nodes running and try the API yourself)",
            out.display()
        );
    }
    Ok(())
}

fn yes(b: bool) -> String {
    if b { "yes".into() } else { "no".into() }
}
