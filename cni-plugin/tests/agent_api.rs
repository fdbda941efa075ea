//! The node agent's plugin API over a real unix socket, with a fake dataplane (no root):
//! enrolment, skipping, fail-closed rollback, unknown pods, bad requests, idempotent DEL,
//! readiness, and the reaction to namespace label changes.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use zmesh_cni::agent::cluster::parse_text;
use zmesh_cni::agent::{
    Agent, AgentConfig, ApiServer, Cluster, Dataplane, DataplaneError, PodRecord, StateStore,
    StaticSource,
};
use zmesh_cni::api::{
    ADD_PATH, AddRequest, AgentClient, DEL_PATH, DelRequest, HttpResponse, READY_PATH,
};

#[derive(Default)]
struct Calls {
    enrolled: Vec<String>,
    unenrolled: Vec<String>,
    fail_enrol: Option<String>,
    ready: bool,
}

/// A dataplane that records its calls and fails when told to.
#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Calls>>);

impl Fake {
    fn calls(&self) -> std::sync::MutexGuard<'_, Calls> {
        self.0.lock().unwrap()
    }
}

impl Dataplane for Fake {
    async fn enrol(&self, pod: &PodRecord, _netns: &File) -> Result<(), DataplaneError> {
        let mut calls = self.calls();
        calls.enrolled.push(pod.uid.clone());
        match &calls.fail_enrol {
            Some(why) => Err(DataplaneError::Worker(why.clone())),
            None => Ok(()),
        }
    }

    async fn unenrol(&self, pod: &PodRecord) -> Result<(), DataplaneError> {
        self.calls().unenrolled.push(pod.uid.clone());
        Ok(())
    }

    fn ready(&self) -> bool {
        self.calls().ready
    }
}

fn cluster(shop_labelled: bool) -> Cluster {
    let labels = if shop_labelled {
        "{istio.io/dataplane-mode: ambient}"
    } else {
        "{}"
    };
    let yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {labels}}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {{name: plain}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: shop, uid: u-web}}\n\
         spec: {{nodeName: n1, serviceAccountName: web-sa}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: db, namespace: plain, uid: u-db}}\n\
         spec: {{nodeName: n1}}\n"
    );
    parse_text(Path::new("test.yaml"), &yaml).unwrap()
}

struct Lab {
    dir: tempfile::TempDir,
    fake: Fake,
    source: StaticSource,
    agent: Arc<Agent<Fake>>,
    _api: ApiServer,
    client: AgentClient,
}

impl Lab {
    fn new(shop_labelled: bool) -> Lab {
        let dir = tempfile::tempdir().unwrap();
        for pod in ["web", "db"] {
            std::fs::write(dir.path().join(format!("netns-{pod}")), "").unwrap();
        }
        let fake = Fake::default();
        let source = StaticSource::new(cluster(shop_labelled));
        let state = Arc::new(StateStore::open(&dir.path().join("pods.json")).unwrap());
        let config = AgentConfig {
            lookup_attempts: 5,
            lookup_interval: Duration::from_millis(40),
            ..AgentConfig::new("n1")
        };
        let agent = Arc::new(Agent::new(config, &source, fake.clone(), state));
        let socket = dir.path().join("agent.sock");
        let api = ApiServer::bind(&socket, agent.clone()).unwrap();
        Lab {
            client: AgentClient::new(socket),
            dir,
            fake,
            source,
            agent,
            _api: api,
        }
    }

    fn netns(&self, pod: &str) -> PathBuf {
        self.dir.path().join(format!("netns-{pod}"))
    }

    fn add_request(&self, ns: &str, pod: &str, uid: &str) -> AddRequest {
        AddRequest {
            container_id: format!("c-{pod}"),
            netns: self.netns(pod).display().to_string(),
            ifname: "eth0".into(),
            pod_name: pod.into(),
            pod_namespace: ns.into(),
            pod_uid: uid.into(),
            ips: vec!["10.244.1.5/24".into()],
        }
    }

    async fn post<T: serde::Serialize + Send + 'static>(
        &self,
        path: &'static str,
        body: T,
    ) -> HttpResponse {
        let client = self.client.clone();
        tokio::task::spawn_blocking(move || client.post_json(path, &body, Duration::from_secs(10)))
            .await
            .unwrap()
            .unwrap()
    }

    async fn add(&self, req: AddRequest) -> (u16, serde_json::Value) {
        let r = self.post(ADD_PATH, req).await;
        (r.status, serde_json::from_slice(&r.body).unwrap())
    }

    async fn del(&self, ns: &str, pod: &str, uid: &str) -> (u16, String) {
        let req = DelRequest {
            container_id: format!("c-{pod}"),
            netns: String::new(),
            pod_name: pod.into(),
            pod_namespace: ns.into(),
            pod_uid: uid.into(),
        };
        let r = self.post(DEL_PATH, req).await;
        (r.status, String::from_utf8(r.body).unwrap())
    }

    async fn ready(&self) -> u16 {
        let client = self.client.clone();
        tokio::task::spawn_blocking(move || client.get(READY_PATH, Duration::from_secs(5)))
            .await
            .unwrap()
            .unwrap()
            .status
    }

    fn state_file(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pods.json")).unwrap()
    }
}

#[tokio::test]
async fn add_enrols_a_mesh_pod_and_records_it() {
    let lab = Lab::new(true);
    let mode = std::fs::metadata(lab.client.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let (status, body) = lab.add(lab.add_request("shop", "web", "u-web")).await;
    assert_eq!((status, body), (200, serde_json::json!({"enrolled": true})));
    assert_eq!(lab.fake.calls().enrolled, ["u-web"]);
    let record = lab.agent.state().get("u-web").unwrap();
    assert!(record.enrolled);
    assert_eq!(record.service_account, "web-sa");
    assert_eq!(
        record.ips,
        ["10.244.1.5".parse::<std::net::IpAddr>().unwrap()]
    );
    assert!(lab.state_file().contains("\"u-web\""));
    assert_eq!(lab.agent.state().snapshot().len(), 1);
}

#[tokio::test]
async fn a_second_agent_does_not_steal_the_socket() {
    let lab = Lab::new(true);
    let err = ApiServer::bind(lab.client.socket(), lab.agent.clone()).unwrap_err();
    assert!(err.to_string().contains("another process"), "{err}");
    assert_eq!(lab.ready().await, 503, "the first agent still answers");
}

#[tokio::test]
async fn add_skips_pods_outside_the_mesh() {
    let lab = Lab::new(true);
    let (status, body) = lab.add(lab.add_request("plain", "db", "u-db")).await;
    assert_eq!(
        (status, body),
        (200, serde_json::json!({"enrolled": false}))
    );
    assert!(lab.fake.calls().enrolled.is_empty());
    // Remembered (for a later label change), but not in the ZDS snapshot.
    assert!(!lab.agent.state().get("u-db").unwrap().enrolled);
    assert!(lab.agent.state().snapshot().is_empty());
}

#[tokio::test]
async fn a_dataplane_failure_is_503_and_rolled_back() {
    let lab = Lab::new(true);
    lab.fake.calls().fail_enrol = Some("ztunnel refused Add u-web: boom".into());
    let (status, body) = lab.add(lab.add_request("shop", "web", "u-web")).await;
    assert_eq!(status, 503);
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("boom") && error.contains("rolled back"),
        "{error}"
    );
    assert_eq!(lab.fake.calls().unenrolled, ["u-web"]);
    assert!(lab.agent.state().get("u-web").is_none());
    assert!(lab.agent.state().snapshot().is_empty());
    assert!(!lab.state_file().contains("u-web"));
}

#[tokio::test]
async fn a_missing_netns_is_503_before_any_work() {
    let lab = Lab::new(true);
    let mut req = lab.add_request("shop", "web", "u-web");
    req.netns = lab.dir.path().join("gone").display().to_string();
    let (status, body) = lab.add(req).await;
    assert_eq!(status, 503);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("cannot open the netns")
    );
    assert!(lab.fake.calls().enrolled.is_empty());
}

#[tokio::test]
async fn unknown_pods_are_retried_then_503() {
    let lab = Lab::new(true);
    let (status, body) = lab.add(lab.add_request("shop", "late", "u-late")).await;
    assert_eq!(status, 503);
    assert!(
        body["error"].as_str().unwrap().contains("not known"),
        "{body}"
    );
    // A uid that does not match is a stale object: same answer.
    let (status, _) = lab.add(lab.add_request("shop", "web", "u-other")).await;
    assert_eq!(status, 503);

    // A pod that shows up while the agent retries is served.
    let source = lab.source.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let mut pods: Vec<_> = cluster(true).pods().cloned().collect();
        let mut late = cluster(true).pod("shop", "web").unwrap().clone();
        late.name = "late".into();
        late.uid = "u-late".into();
        pods.push(late);
        source.set(Cluster::new(pods, cluster(true).namespaces().cloned()));
    });
    std::fs::write(lab.netns("late"), "").unwrap();
    let (status, body) = lab.add(lab.add_request("shop", "late", "u-late")).await;
    assert_eq!((status, body), (200, serde_json::json!({"enrolled": true})));
}

#[tokio::test]
async fn bad_requests_are_400() {
    let lab = Lab::new(true);
    let mut req = lab.add_request("shop", "web", "u-web");
    req.netns = String::new();
    let (status, body) = lab.add(req).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("netns is empty"));
    let mut req = lab.add_request("shop", "web", "u-web");
    req.ips = vec!["ten/24".into()];
    assert_eq!(lab.add(req).await.0, 400);
    let r = lab.post(ADD_PATH, serde_json::json!({"pod_name": 3})).await;
    assert_eq!(r.status, 400);
    assert!(r.error_text().contains("invalid JSON"));
    let client = lab.client.clone();
    let r = tokio::task::spawn_blocking(move || client.get("/nope", Duration::from_secs(5)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn del_releases_and_is_idempotent() {
    let lab = Lab::new(true);
    assert_eq!(
        lab.add(lab.add_request("shop", "web", "u-web")).await.0,
        200
    );
    assert_eq!(
        lab.del("shop", "web", "u-web").await,
        (200, "{}".to_owned())
    );
    assert_eq!(lab.fake.calls().unenrolled, ["u-web"]);
    assert!(lab.agent.state().get("u-web").is_none());
    assert!(!lab.state_file().contains("u-web"));
    assert_eq!(
        lab.del("shop", "web", "u-web").await,
        (200, "{}".to_owned())
    );
    assert_eq!(lab.del("shop", "web", "").await, (200, "{}".to_owned()));
    assert!(lab.agent.state().records().is_empty());

    // A DEL for an older sandbox of the pod leaves the current one alone.
    assert_eq!(
        lab.add(lab.add_request("shop", "web", "u-web")).await.0,
        200
    );
    let old = DelRequest {
        container_id: "c-older".into(),
        netns: String::new(),
        pod_name: "web".into(),
        pod_namespace: "shop".into(),
        pod_uid: "u-web".into(),
    };
    assert_eq!(lab.post(DEL_PATH, old).await.status, 200);
    assert!(lab.agent.state().get("u-web").unwrap().enrolled);
}

#[tokio::test]
async fn ready_follows_the_dataplane() {
    let lab = Lab::new(true);
    assert_eq!(lab.ready().await, 503);
    lab.fake.calls().ready = true;
    assert_eq!(lab.ready().await, 200);
    lab.fake.calls().ready = false;
    assert_eq!(lab.ready().await, 503);
}

#[tokio::test]
async fn namespace_label_changes_enrol_and_release_known_pods() {
    let lab = Lab::new(false);
    tokio::spawn(lab.agent.clone().run_reconciler());
    let (status, body) = lab.add(lab.add_request("shop", "web", "u-web")).await;
    assert_eq!(
        (status, body),
        (200, serde_json::json!({"enrolled": false}))
    );

    lab.source.set(cluster(true));
    wait_for(|| lab.agent.state().get("u-web").is_some_and(|r| r.enrolled)).await;
    assert_eq!(lab.fake.calls().enrolled, ["u-web"]);

    lab.source.set(cluster(false));
    wait_for(|| lab.agent.state().get("u-web").is_some_and(|r| !r.enrolled)).await;
    assert_eq!(lab.fake.calls().unenrolled, ["u-web"]);
    assert!(lab.agent.state().snapshot().is_empty());
}

async fn wait_for(mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
