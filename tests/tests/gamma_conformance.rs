//! Issue 12's conformance as data, against the real waypoint: every transcribed test of the
//! Gateway API mesh suite (`tests/conformance/mesh/`, the upstream list at the pin) and the
//! Service-attached Gateway tests (`tests/conformance/service/`) run in one gamma lab
//! (`zmesh-lab up --world gamma`, driven through its control socket as a user would), each the
//! suite's way: apply its manifests, send its requests from `echo-v1`'s pod (curl, or
//! `zmesh-echo-client` for gRPC) through ztunnel and the waypoint, poll until every case has
//! held three rounds in a row (the suite's `AwaitConvergence`), observe weighted splits, delete
//! the manifests. Then the same tests with the mesh namespace unbound
//! (`istio.io/use-waypoint: none`): each must fail, except the ones marked
//! `passesWithoutWaypoint` (pure reachability), which must still pass. The table of both runs is
//! printed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use zmesh_tests::conformance::{self, Client, Protocol, Test, check, script};
use zmesh_tests::gamma::driver::RunningLab;

const LAB: &str = env!("CARGO_BIN_EXE_zmesh-lab");
const CLIENT: &str = env!("CARGO_BIN_EXE_zmesh-echo-client");
const MESH: &str = conformance::MESH_NS;
/// Bringing up two nodes, the pods, their apps and the waypoint on a loaded machine.
const UP_DEADLINE: Duration = Duration::from_secs(300);
/// A test's config reaching the waypoint and every case holding (generous: loaded machine).
const CONVERGE_DEADLINE: Duration = Duration::from_secs(120);
/// Rounds in a row a case must pass (the suite's `RequiredConsecutiveSuccesses`).
const CONSECUTIVE: u32 = 3;
/// Rounds sampled per test with the waypoint unbound; a test passes only if all do.
const UNBOUND_ROUNDS: u32 = 10;
/// Tries of a weighted split (the suite allows 10).
const WEIGHT_TRIES: u32 = 3;
/// One request's time limit.
const REQUEST_SECS: u32 = 10;

/// A test's result in one run.
#[derive(Debug, Clone)]
enum Outcome {
    Pass,
    Fail(String),
}

impl Outcome {
    fn passed(&self) -> bool {
        matches!(self, Outcome::Pass)
    }

    fn cell(&self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail(_) => "fail",
        }
    }
}

struct World {
    lab: RunningLab,
    files: PathBuf,
    /// Client pod (`NS/NAME`) per client namespace.
    clients: BTreeMap<Client, String>,
    /// The waypoint's pod, `NS/NAME`.
    waypoint: String,
    env: script::Env,
    /// Mesh Deployment -> its first pod's name.
    pod_names: BTreeMap<String, String>,
}

/// The Deployment a pod name `<deployment>-<5 chars>` belongs to.
fn deployment_of(pod: &str) -> &str {
    pod.rsplit_once('-').map_or(pod, |(d, _)| d)
}

impl World {
    fn new(lab: RunningLab) -> World {
        let files = lab.files();
        let mut w = World {
            lab,
            files,
            clients: BTreeMap::new(),
            waypoint: String::new(),
            env: script::Env {
                grpc_client: CLIENT.to_owned(),
                ..script::Env::default()
            },
            pod_names: BTreeMap::new(),
        };
        w.refresh();
        w
    }

    /// Re-reads pods and Services (after manifests that add some).
    fn refresh(&mut self) {
        let pods: Value =
            serde_json::from_str(&self.lab.ok(&["get", "pods", "-o", "json"], None)).unwrap();
        self.env.pods.clear();
        self.pod_names.clear();
        for p in pods["items"].as_array().unwrap() {
            let (ns, name) = (
                p["namespace"].as_str().unwrap(),
                p["name"].as_str().unwrap(),
            );
            if p["labels"]["gateway.istio.io/managed"] == "istio.io-mesh-controller" {
                self.waypoint = format!("{ns}/{name}");
                continue;
            }
            if p["app"] != "zmesh-echo" {
                continue;
            }
            let dep = deployment_of(name).to_owned();
            if dep == "echo-v1" {
                let c = if ns == MESH {
                    Client::Mesh
                } else {
                    Client::Consumer
                };
                self.clients.insert(c, format!("{ns}/{name}"));
            }
            if ns == MESH {
                self.env
                    .pods
                    .entry(dep.clone())
                    .or_insert_with(|| p["ip"].as_str().unwrap().to_owned());
                self.pod_names.entry(dep).or_insert_with(|| name.to_owned());
            }
        }
        let svcs: Value =
            serde_json::from_str(&self.lab.ok(&["get", "services", "-o", "json"], None)).unwrap();
        self.env.services = svcs["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    (
                        s["namespace"].as_str().unwrap().to_owned(),
                        s["name"].as_str().unwrap().to_owned(),
                    ),
                    s["clusterIP"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
    }

    /// Runs `script` with `sh` in `client`'s pod; returns stdout.
    fn run(&self, client: Client, script: &str) -> String {
        let pod = &self.clients[&client];
        let out = self.lab.cli(&["exec", pod, "--", "sh", "-c", script], None);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The waypoint's `istio_requests_total` over every label set.
    fn waypoint_count(&self) -> f64 {
        let m = self.lab.ok(
            &[
                "exec",
                &self.waypoint,
                "--",
                "curl",
                "-sS",
                "-m",
                "10",
                "http://127.0.0.1:15020/metrics",
            ],
            None,
        );
        m.lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Whether `deployment`'s pod logged the request `id` within a few seconds (mirrors are
    /// sent without waiting).
    fn logged(&self, deployment: &str, id: &str) -> bool {
        let Some(pod) = self.pod_names.get(deployment) else {
            return false;
        };
        let log = self.files.join(format!("echo-{pod}.log"));
        let needle = format!("logged {id} ");
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if std::fs::read_to_string(&log).is_ok_and(|l| l.contains(&needle)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    /// One round of `idx` (indices into `t.cases`): each case's verdict.
    fn round(&self, t: &Test, idx: &[usize]) -> BTreeMap<usize, Result<(), String>> {
        let mut res = BTreeMap::new();
        for client in [Client::Mesh, Client::Consumer] {
            let cases: Vec<(usize, &conformance::Case)> = idx
                .iter()
                .map(|&i| (i, &t.cases[i]))
                .filter(|(_, c)| c.from == client)
                .collect();
            if cases.is_empty() {
                continue;
            }
            let (text, sent) =
                match script::round(&self.env, &cases, client.namespace(), REQUEST_SECS) {
                    Ok(r) => r,
                    Err(e) => {
                        for (i, _) in cases {
                            res.insert(i, Err(format!("{e:#}")));
                        }
                        continue;
                    }
                };
            let answers = check::split(&self.run(client, &text));
            for (i, c) in cases {
                let verdict = match answers.get(&i) {
                    None => Err("no answer in the client's output".to_owned()),
                    Some((out, rc)) => {
                        let a = check::parse(c.request.protocol, out, *rc);
                        check::judge(&c.expect, &a, &sent[&i]).and_then(|()| {
                            match (&c.expect.mirrored_to, &sent[&i].log_id) {
                                (Some(dep), Some(id)) if !self.logged(dep, id) => {
                                    Err(format!("{dep} never logged the mirrored request {id}"))
                                }
                                _ => Ok(()),
                            }
                        })
                    }
                };
                res.insert(i, verdict);
            }
        }
        res
    }

    /// The backends (pod names) that answered `w.requests` requests.
    fn sample_weights(&self, w: &conformance::Weights) -> Result<Vec<String>, String> {
        let ns = MESH;
        let target = script::target(&self.env, &w.request.host, ns, w.request.protocol)
            .map_err(|e| format!("{e:#}"))?;
        let cmd = match w.request.protocol {
            Protocol::Http => format!(
                "curl -sS --max-time 120 --resolve {} {}",
                script::quote(&format!("{}:{}:{}", target.name, target.port, target.ip)),
                script::quote(&format!(
                    "http://{}:{}{}?n=[1-{}]",
                    target.name, target.port, w.request.path, w.requests
                ))
            ),
            Protocol::Grpc => format!(
                "{} grpc {} -m weight --count {}",
                script::quote(CLIENT),
                script::quote(&format!(
                    "http://{}.{}:{}",
                    target.name.split(':').next().unwrap_or_default(),
                    target.namespace,
                    target.port
                )),
                w.requests
            ),
        };
        let out = self.run(Client::Mesh, &cmd);
        Ok(out
            .lines()
            .filter_map(|l| l.strip_prefix("Hostname="))
            .map(str::to_owned)
            .collect())
    }

    fn weights(&self, t: &Test, tries: u32) -> Result<(), String> {
        let Some(w) = &t.weights else {
            return Ok(());
        };
        let mut last = String::new();
        for _ in 0..tries {
            match self
                .sample_weights(w)
                .and_then(|h| check::judge_weights(&h, w))
            {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The bound run: every case holds `CONSECUTIVE` rounds in a row before the deadline,
    /// then the weights hold.
    fn converge(&self, t: &Test) -> Outcome {
        let deadline = Instant::now() + CONVERGE_DEADLINE;
        let mut streak = vec![0u32; t.cases.len()];
        let mut last: BTreeMap<usize, String> = BTreeMap::new();
        loop {
            let todo: Vec<usize> = (0..t.cases.len())
                .filter(|&i| streak[i] < CONSECUTIVE)
                .collect();
            if todo.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                let (i, why) = last
                    .iter()
                    .next()
                    .map(|(i, w)| (*i, w.clone()))
                    .unwrap_or_default();
                return Outcome::Fail(format!("case {i} ({}): {why}", case_name(t, i)));
            }
            for (i, v) in self.round(t, &todo) {
                match v {
                    Ok(()) => {
                        streak[i] += 1;
                        last.remove(&i);
                    }
                    Err(e) => {
                        streak[i] = 0;
                        last.insert(i, e);
                    }
                }
            }
            if todo.iter().any(|&i| streak[i] == 0) {
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        match self.weights(t, WEIGHT_TRIES) {
            Ok(()) => Outcome::Pass,
            Err(e) => Outcome::Fail(format!("weights: {e}")),
        }
    }

    /// The unbound run: `UNBOUND_ROUNDS` rounds of every case (stopping at the first failure),
    /// then one weight sample.
    fn sample(&self, t: &Test) -> Outcome {
        let all: Vec<usize> = (0..t.cases.len()).collect();
        for _ in 0..UNBOUND_ROUNDS {
            if let Some((i, Err(e))) = self.round(t, &all).into_iter().find(|(_, v)| v.is_err()) {
                return Outcome::Fail(format!("case {i} ({}): {e}", case_name(t, i)));
            }
        }
        match self.weights(t, 1) {
            Ok(()) => Outcome::Pass,
            Err(e) => Outcome::Fail(format!("weights: {e}")),
        }
    }

    /// Applies `t`'s manifests, runs `f`, deletes them.
    fn with_manifests(&mut self, t: &Test, f: impl FnOnce(&World) -> Outcome) -> Outcome {
        let has = !t.manifests.trim().is_empty();
        if has {
            self.lab.ok(&["apply", "-f", "-"], Some(&t.manifests));
            self.refresh();
        }
        let out = f(self);
        if has {
            self.lab.ok(&["delete", "-f", "-"], Some(&t.manifests));
            self.refresh();
        }
        out
    }

    /// Binds the mesh namespace to `waypoint` (`none` unbinds it), as a user applies it.
    fn bind(&self, waypoint: &str) {
        let ns = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {MESH}\n  labels:\n    \
             istio.io/dataplane-mode: ambient\n    istio.io/use-waypoint: {waypoint}\n"
        );
        self.lab.ok(&["apply", "-f", "-"], Some(&ns));
    }

    /// Polls until a request to `echo` passes (or not) through the waypoint.
    fn await_waypoint(&self, in_path: bool) {
        let deadline = Instant::now() + CONVERGE_DEADLINE;
        let probe = "curl -sS -o /dev/null -m 10 http://echo.gateway-conformance-mesh/probe";
        loop {
            let before = self.waypoint_count();
            self.run(Client::Mesh, probe);
            let counted = self.waypoint_count() > before;
            if counted == in_path {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the waypoint never {} the path",
                if in_path { "entered" } else { "left" }
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn case_name(t: &Test, i: usize) -> String {
    t.cases[i].name.clone().unwrap_or_else(|| {
        let r = &t.cases[i].request;
        format!(
            "{} {}{}",
            r.method.as_deref().unwrap_or("GET"),
            r.host,
            r.path
        )
    })
}

#[test]
fn the_mesh_conformance_suite_passes_through_the_waypoint_and_fails_without_it() {
    let data = conformance::data_dir();
    let mesh = conformance::load(&data.join("mesh")).unwrap();
    conformance::same_set(&conformance::suite_list(&data.join("mesh")).unwrap(), &mesh).unwrap();
    let service = conformance::load(&data.join("service")).unwrap();
    let tests: Vec<Test> = mesh.into_iter().chain(service).collect();

    let dir = tempfile::tempdir().unwrap();
    let mut w = World::new(RunningLab::start(Path::new(LAB), dir.path(), UP_DEADLINE));
    let t0 = Instant::now();
    w.await_waypoint(true);
    eprintln!("[{:>6.1?}] waypoint in the path", t0.elapsed());

    let mut bound = Vec::new();
    for t in &tests {
        let o = w.with_manifests(t, |w| w.converge(t));
        eprintln!(
            "[{:>6.1?}] bound   {:<44} {:?}",
            t0.elapsed(),
            t.short_name,
            o
        );
        bound.push(o);
    }

    w.bind("none");
    w.await_waypoint(false);
    eprintln!("[{:>6.1?}] waypoint out of the path", t0.elapsed());
    let mut unbound = Vec::new();
    for t in &tests {
        let o = w.with_manifests(t, |w| w.sample(t));
        eprintln!(
            "[{:>6.1?}] unbound {:<44} {:?}",
            t0.elapsed(),
            t.short_name,
            o
        );
        unbound.push(o);
    }

    let mut table =
        String::from("| test | through the waypoint | waypoint unbound |\n| --- | --- | --- |\n");
    let mut wrong = Vec::new();
    for ((t, b), u) in tests.iter().zip(&bound).zip(&unbound) {
        let want_unbound = t.passes_without_waypoint.is_some();
        table.push_str(&format!(
            "| {} | {} | {}{} |\n",
            t.short_name,
            b.cell(),
            u.cell(),
            if want_unbound {
                " (expected: reachability only)"
            } else {
                ""
            }
        ));
        if let Outcome::Fail(why) = b {
            wrong.push(format!(
                "{} failed through the waypoint: {why}",
                t.short_name
            ));
        }
        if u.passed() != want_unbound {
            wrong.push(format!(
                "{} {} with the waypoint unbound ({:?})",
                t.short_name,
                if u.passed() { "passed" } else { "failed" },
                u
            ));
        }
    }
    eprintln!("{table}");
    assert!(wrong.is_empty(), "{}\n{table}", wrong.join("\n"));
}
