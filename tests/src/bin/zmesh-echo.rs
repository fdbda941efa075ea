//! `zmesh-echo`: the lab's echo app (see `zmesh_tests::echo`), the stand-in for Istio's echo
//! server in the pods of `zmesh-lab up --world gamma`.

use anyhow::Result;
use clap::Parser;
use zmesh_tests::echo::{EchoConfig, run};

#[derive(Parser)]
#[command(
    name = "zmesh-echo",
    about = "echo app answering like Istio's echo server"
)]
struct Cli {
    /// `Hostname=` in responses (the pod's name).
    #[arg(long, env = "HOSTNAME", default_value = "")]
    hostname: String,
    /// `Namespace=` in responses.
    #[arg(long, env = "POD_NAMESPACE", default_value = "")]
    namespace: String,
    /// `ServiceVersion=` in responses.
    #[arg(long, default_value = "")]
    version: String,
    /// Plain HTTP port (HTTP/1.1 and h2c); repeatable.
    #[arg(long = "port")]
    ports: Vec<u16>,
    /// HTTPS port (self-signed); repeatable.
    #[arg(long = "tls-port")]
    tls_ports: Vec<u16>,
    /// gRPC port (proto.EchoTestService/Echo); repeatable.
    #[arg(long = "grpc")]
    grpc_ports: Vec<u16>,
    /// TCP echo port; repeatable.
    #[arg(long = "tcp")]
    tcp_ports: Vec<u16>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    run(EchoConfig {
        hostname: cli.hostname,
        namespace: cli.namespace,
        version: cli.version,
        http_ports: cli.ports,
        tls_ports: cli.tls_ports,
        grpc_ports: cli.grpc_ports,
        tcp_ports: cli.tcp_ports,
    })
    .await
}
