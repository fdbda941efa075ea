//! The lab's container runtime against real CNI plugins: Debian's bridge + host-local as the
//! primary network, then `zmesh-cni` chained after it, exec'd per pod with the environment and
//! stdin a runtime gives them. Needs root, `containernetworking-plugins` and the binaries.

use std::net::SocketAddr;
use std::path::Path;

use serde_json::json;
use zmesh_tests::apps::{EchoServer, transfer};
use zmesh_tests::lab::Topology;
use zmesh_tests::runtime::{DEBIAN_CNI_BIN, PluginError, PodSandbox, Runtime};
use zmesh_tests::{Sandbox, bin_path};

#[test]
fn pods_get_the_primary_network_and_an_unreachable_agent_blocks_mesh_pods() {
    let sb = Sandbox::new().unwrap();
    let _topo = Topology::build(&sb, &["n1"]).unwrap();
    let dir = sb.dir().join("n1");
    let conf_dir = dir.join("net.d");
    std::fs::create_dir_all(&conf_dir).unwrap();
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": "lab",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]],
                      "dataDir": dir.join("ipam")}},
            {"type": "zmesh-cni", "agent_socket": dir.join("agent.sock"),
             "log_file": dir.join("zmesh-cni.log"), "exclude_namespaces": ["kube-system"]}
        ]
    });
    std::fs::write(conf_dir.join("10-lab.conflist"), conflist.to_string()).unwrap();
    let ours = bin_path("zmesh-cni");
    let rt = Runtime::new(
        &sb,
        "n1",
        &conf_dir,
        &[Path::new(DEBIAN_CNI_BIN), ours.parent().unwrap()],
    )
    .unwrap();

    // A pod of an excluded namespace starts without the agent and is reachable on its IP.
    let dns = PodSandbox::new("kube-system", "coredns");
    let result = rt.add(&dns).unwrap();
    let cidr = result["ips"][0]["address"].as_str().unwrap().to_owned();
    assert!(cidr.starts_with("10.244.1."), "{result}");
    let ip: std::net::IpAddr = cidr.split('/').next().unwrap().parse().unwrap();
    let _app = EchoServer::start(&sb, &dns.netns, 9000, "coredns").unwrap();
    assert_eq!(
        transfer(&sb, "n1", SocketAddr::new(ip, 9000), b"hello").unwrap(),
        b"hello"
    );
    rt.check(&dns).unwrap();

    // A pod that may belong to the mesh cannot start while the node agent is unreachable:
    // zmesh-cni fails ADD with "try again later", and the runtime tears the sandbox down.
    let web = PodSandbox::new("default", "web");
    let err = rt.add(&web).unwrap_err();
    let err = err.downcast::<PluginError>().unwrap();
    assert_eq!((err.plugin.as_str(), err.code), ("zmesh-cni", 11), "{err}");
    assert!(
        !sb.run(&["ip", "netns", "list"])
            .unwrap()
            .contains("pod-web"),
        "netns left behind"
    );
    // host-local keeps one file per lease, named by the address, holding the container id.
    let leases: Vec<_> = std::fs::read_dir(dir.join("ipam").join("lab"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .parse::<std::net::IpAddr>()
                .is_ok()
        })
        .collect();
    assert_eq!(
        leases.len(),
        1,
        "the failed pod's address was not released: {leases:?}"
    );
    let owner = std::fs::read_to_string(leases[0].path()).unwrap();
    assert!(owner.starts_with(&dns.container_id), "{owner}");

    // DEL is idempotent.
    rt.del(&dns).unwrap();
    rt.del(&dns).unwrap();
}
