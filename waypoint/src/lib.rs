//! The zmesh waypoint: a per-namespace L7 proxy in the Istio ambient style. It terminates
//! HBONE for the Services bound to it, proxies HTTP/1.1, HTTP/2, gRPC and WebSocket (or
//! opaque TCP) to their pods over new HBONE tunnels under its own identity, and reports
//! Istio's request metrics with `reporter="waypoint"`.

pub mod admin;
pub mod app;
pub mod authn;
pub mod authz;
pub mod body;
pub mod bound;
pub mod ca;
pub mod config;
pub mod http;
pub mod route;
pub mod server;
pub mod sniff;
pub mod telemetry;
pub mod upstream;
pub mod xds;

pub use app::{Running, Waypoint};
pub use config::Config;

#[cfg(test)]
mod tests {
    /// `symbol-order.txt` (scripts/waypoint-symbol-order) is what the waypoint's image links
    /// with: one symbol per line, each once, and the waypoint's own request path among them.
    #[test]
    fn the_symbol_order_names_each_function_once_and_the_request_path() {
        let text = include_str!("../symbol-order.txt");
        let names: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .collect();
        assert!(names.len() >= 100, "{} names", names.len());
        assert!(
            names.iter().all(|n| !n.contains(char::is_whitespace)),
            "a line holds more than one name"
        );
        let distinct: std::collections::HashSet<&str> = names.iter().copied().collect();
        assert_eq!(distinct.len(), names.len(), "a name is listed twice");
        // The mangled names of this crate's request path, `zmesh_waypoint::http::proxy`.
        assert!(
            names
                .iter()
                .any(|n| n.contains("14zmesh_waypoint") && n.contains("4http5proxy")),
            "the request path is not in the order"
        );
    }
}
