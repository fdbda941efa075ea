//! What the cluster tests ask of a running [`Cluster`] again and again: who answers at an
//! address, how many mutual-TLS connections a node's ztunnel counted from a pod, an echo on a
//! connection already open, and the `shop` namespace most scenarios start from (a client on
//! n1, `web-a` on n2 behind Services selecting `app=web`).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};

use anyhow::Result;

use crate::apps::{EchoServer, identify};
use crate::cluster::{Cluster, Pod};
use crate::ztunnel::metric_value;

/// The port every echo app of these scenarios listens on.
pub const ECHO_PORT: u16 = 8080;

/// A Service VIP of the lab's service range: `10.96.0.<last>`.
pub fn vip(last: u8) -> IpAddr {
    IpAddr::from([10, 96, 0, last])
}

/// Who answers `WHO` at `dst` from `client`, or the error.
pub fn who(cluster: &Cluster<'_>, client: &Pod, dst: SocketAddr) -> Result<String, String> {
    identify(cluster.sandbox(), &client.netns, dst).map_err(|e| format!("{e:#}"))
}

/// Connections the ztunnel of `node` accepted over mutual TLS from `client`'s identity.
pub fn mtls_from(cluster: &Cluster<'_>, node: &str, client: &Pod) -> f64 {
    let text = cluster.ztunnel(node).unwrap().metrics().unwrap();
    metric_value(
        &text,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", &client.spiffe_id()),
            ("connection_security_policy", "mutual_tls"),
        ],
    )
}

/// Writes `data` on an established connection and reads the echo back.
pub fn echo_on(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(data)?;
    let mut got = vec![0; data.len()];
    stream.read_exact(&mut got)?;
    Ok(got)
}

/// Sends a line over `conn` and returns its echo; panics on an I/O error.
pub fn echo_line(conn: &mut TcpStream, line: &str) -> String {
    String::from_utf8(echo_on(conn, line.as_bytes()).unwrap()).unwrap()
}

/// `shop` enrolled (labelled ambient); `client` (sa `client`) on n1; `web-a` (sa `web`,
/// app=web) on n2 with its echo app answering `web-a` on [`ECHO_PORT`].
pub fn shop(cluster: &Cluster<'_>) -> (Pod, Pod, EchoServer) {
    cluster
        .set_namespace_label("shop", Some("ambient"))
        .unwrap();
    let client = cluster
        .create_pod("n1", "shop", "client", "client", &[])
        .unwrap();
    let web_a = cluster
        .create_pod("n2", "shop", "web-a", "web", &[("app", "web")])
        .unwrap();
    let app = EchoServer::start(cluster.sandbox(), &web_a.netns, ECHO_PORT, "web-a").unwrap();
    (client, web_a, app)
}

/// Puts Service `shop/<name>` selecting `app=web` at `vip:port`, to [`ECHO_PORT`].
pub fn put_web_service(cluster: &Cluster<'_>, name: &str, vip: IpAddr, port: u16) -> Result<()> {
    cluster.put_service("shop", name, &[("app", "web")], vip, &[(port, ECHO_PORT)])
}
