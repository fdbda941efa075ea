//! The control plane end to end on the lab [`Cluster`]: the real `zmesh-controller` watches the
//! cluster's YAML directory, pushes delta xDS to every node's ztunnel and signs their pods'
//! certificates. Editing the directory changes traffic; the controller going away changes
//! nothing for open or new connections; coming back, it converges. Needs root,
//! containernetworking-plugins and `cargo build --workspace --bins`.

use std::net::SocketAddr;
use std::time::Duration;

use zmesh_tests::apps::{EchoServer, connect};
use zmesh_tests::cluster::Cluster;
use zmesh_tests::controller;
use zmesh_tests::probe::{ECHO_PORT, echo_line, put_web_service, shop, vip, who};
use zmesh_tests::{Sandbox, poll};

/// Generous: a push crosses a file watch, a debounce, gRPC and a config swap.
const CONVERGE: Duration = Duration::from_secs(30);

#[test]
fn editing_the_yaml_directory_changes_traffic() {
    let sb = Sandbox::new().unwrap();
    let cluster = Cluster::up(&sb, &["n1", "n2"]).unwrap();
    let (client, web_a, _app_a) = shop(&cluster);
    let dst = SocketAddr::new(vip(50), 80);

    // No Service yet: the VIP is nobody's; the connection fails.
    assert!(who(&cluster, &client, dst).is_err());

    // Add the Service: its VIP starts answering, through the mesh, from web-a.
    put_web_service(&cluster, "web", vip(50), 80).unwrap();
    poll("the Service to route to web-a", CONVERGE, || {
        who(&cluster, &client, dst).as_deref() == Ok("web-a")
    });

    // A second backend pod appears, the first goes away: traffic follows.
    let web_b = cluster
        .create_pod("n1", "shop", "web-b", "web", &[("app", "web")])
        .unwrap();
    let _app_b = EchoServer::start(&sb, &web_b.netns, ECHO_PORT, "web-b").unwrap();
    poll("web-b to be picked as an endpoint", CONVERGE, || {
        who(&cluster, &client, dst).as_deref() == Ok("web-b")
    });
    cluster.delete_pod(&web_a).unwrap();
    poll("only web-b to answer", CONVERGE, || {
        (0..5).all(|_| who(&cluster, &client, dst).as_deref() == Ok("web-b"))
    });

    // Delete the Service: the VIP goes dark again.
    cluster.delete_service("shop", "web").unwrap();
    poll("the VIP to stop answering", CONVERGE, || {
        who(&cluster, &client, dst).is_err()
    });
}

#[test]
fn without_the_controller_the_mesh_keeps_its_last_config_and_converges_when_it_is_back() {
    let sb = Sandbox::new().unwrap();
    let mut cluster = Cluster::up(&sb, &["n1", "n2"]).unwrap();
    let (client, _web_a, _app) = shop(&cluster);
    let dst = SocketAddr::new(vip(60), 80);
    put_web_service(&cluster, "web", vip(60), 80).unwrap();
    poll("the Service to route", CONVERGE, || {
        who(&cluster, &client, dst).as_deref() == Ok("web-a")
    });
    let mut open = connect(&sb, &client.netns, dst).unwrap();
    assert_eq!(echo_line(&mut open, "before\n"), "before\n");

    cluster.stop_controller().unwrap();
    // The open connection and new ones work on the last config.
    assert_eq!(echo_line(&mut open, "during\n"), "during\n");
    for _ in 0..3 {
        assert_eq!(who(&cluster, &client, dst).as_deref(), Ok("web-a"));
    }
    // Changes made while it is away reach nobody...
    put_web_service(&cluster, "web2", vip(61), 81).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(who(&cluster, &client, SocketAddr::new(vip(61), 81)).is_err());

    // ...until it is back: then they converge, and nothing else was disturbed.
    cluster.start_controller().unwrap();
    poll(
        "the new Service after the controller came back",
        CONVERGE,
        || who(&cluster, &client, SocketAddr::new(vip(61), 81)).as_deref() == Ok("web-a"),
    );
    assert_eq!(echo_line(&mut open, "after\n"), "after\n");
    assert_eq!(who(&cluster, &client, dst).as_deref(), Ok("web-a"));
}

/// `not_before` of the certificate `node`'s ztunnel holds for `identity` (from /config_dump).
fn cert_not_before(cluster: &Cluster<'_>, node: &str, identity: &str) -> Option<String> {
    let dump: serde_json::Value =
        serde_json::from_str(&cluster.ztunnel(node).ok()?.config_dump().ok()?).ok()?;
    dump["certificates"]
        .as_array()?
        .iter()
        .find(|c| c["identity"] == identity)
        .and_then(|c| c["not_before"].as_str().map(str::to_owned))
}

#[test]
fn certificates_from_the_controller_rotate_without_dropping_connections() {
    let sb = Sandbox::new().unwrap();
    // 10 s certificates are refreshed half way through, about 5 s after each issue:
    // rotations come quickly.
    let cluster = Cluster::up_with(&sb, &["n1", "n2"], &[("SECRET_TTL", "10s")]).unwrap();
    let (client, web_a, _app) = shop(&cluster);
    let mut open = connect(&sb, &client.netns, web_a.addr(ECHO_PORT)).unwrap();
    assert_eq!(echo_line(&mut open, "first\n"), "first\n");
    let (client_id, server_id) = (client.spiffe_id(), web_a.spiffe_id());
    let before = (
        cert_not_before(&cluster, "n1", &client_id).expect("n1 holds the client's certificate"),
        cert_not_before(&cluster, "n2", &server_id).expect("n2 holds web-a's certificate"),
    );
    poll("both certificates to rotate", CONVERGE, || {
        cert_not_before(&cluster, "n1", &client_id).is_some_and(|nb| nb != before.0)
            && cert_not_before(&cluster, "n2", &server_id).is_some_and(|nb| nb != before.1)
    });
    // The connection opened under the old certificates is still up and carries data.
    assert_eq!(echo_line(&mut open, "second\n"), "second\n");
    // New connections use the new ones.
    assert_eq!(
        who(&cluster, &client, web_a.addr(ECHO_PORT)).as_deref(),
        Ok("web-a")
    );
    assert_eq!(echo_line(&mut open, "third\n"), "third\n");
}

/// Asks the lab controller's CA, with `node`'s credential, for a certificate of `identity`
/// (impersonated, as a node's ztunnel does). Runs in the sandbox's root netns, where the
/// controller listens.
fn ask_ca(
    cluster: &Cluster<'_>,
    node: &str,
    identity: &str,
) -> Result<usize, (tonic::Code, String)> {
    use xds_proto::istio::v1::auth::IstioCertificateRequest;
    use xds_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
    let access = cluster.controller_access();
    let token = std::fs::read_to_string(cluster.node_token(node).unwrap()).unwrap();
    let root = std::fs::read_to_string(&access.root).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(identity.try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let identity = identity.to_owned();
    cluster
        .sandbox()
        .in_root_netns(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let channel = controller::endpoint(access.address, &root, controller::SERVER_NAME)
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
                let mut req = tonic::Request::new(IstioCertificateRequest {
                    csr,
                    validity_duration: 3600,
                    metadata: Some(zmesh_controller::ca::impersonation(&identity)),
                });
                req.metadata_mut().insert(
                    "authorization",
                    format!("Bearer {}", token.trim()).parse().unwrap(),
                );
                IstioCertificateServiceClient::new(channel)
                    .create_certificate(req)
                    .await
                    .map(|r| r.into_inner().cert_chain.len())
                    .map_err(|s| (s.code(), s.message().to_owned()))
            })
        })
        .unwrap()
}

#[test]
fn a_nodes_credential_gets_certificates_only_for_its_own_pods() {
    let sb = Sandbox::new().unwrap();
    let cluster = Cluster::up(&sb, &["n1", "n2"]).unwrap();
    let (client, web_a, _app) = shop(&cluster);
    assert_eq!((client.node.as_str(), web_a.node.as_str()), ("n1", "n2"));
    // n1's credential: yes for its pod, no for n2's, and the refusal says why.
    assert!(ask_ca(&cluster, "n1", &client.spiffe_id()).is_ok_and(|n| n >= 2));
    let (code, msg) = ask_ca(&cluster, "n1", &web_a.spiffe_id()).unwrap_err();
    assert_eq!(code, tonic::Code::PermissionDenied, "{msg}");
    assert!(
        msg.contains("no pod with that identity runs on n1"),
        "{msg}"
    );
    // n2's credential: the other way round.
    assert!(ask_ca(&cluster, "n2", &web_a.spiffe_id()).is_ok());
    let (code, _) = ask_ca(&cluster, "n2", &client.spiffe_id()).unwrap_err();
    assert_eq!(code, tonic::Code::PermissionDenied);
    // In traffic: n1's ztunnel holds a certificate for its pod (it just used it), and none
    // for web-a, which only n2's ztunnel holds.
    assert_eq!(
        who(&cluster, &client, web_a.addr(ECHO_PORT)).as_deref(),
        Ok("web-a")
    );
    assert!(cert_not_before(&cluster, "n1", &client.spiffe_id()).is_some());
    assert!(cert_not_before(&cluster, "n1", &web_a.spiffe_id()).is_none());
    assert!(cert_not_before(&cluster, "n2", &web_a.spiffe_id()).is_some());
}
