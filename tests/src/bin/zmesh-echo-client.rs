//! `zmesh-echo-client`: what curl cannot do from a lab pod, against `zmesh-echo` (see
//! `zmesh_tests::echo::client`): gRPC unary and bidirectional streaming calls with their
//! trailers, and a WebSocket round trip. Prints a report of `Key=Value` lines.
//!
//! ```text
//! zmesh-echo-client grpc http://echo.gateway-conformance-mesh:7070 --message hi --trailer t1
//! zmesh-echo-client grpc --stream http://echo.gateway-conformance-mesh:7070 -m a -m b -m c
//! zmesh-echo-client grpc http://echo.gateway-conformance-mesh:7070 -m hi -H x-test-case:set --count 10
//! zmesh-echo-client ws ws://echo.gateway-conformance-mesh:80/ -m hello
//! ```

use anyhow::Result;
use clap::{Parser, Subcommand};
use zmesh_tests::echo::client;

#[derive(Parser)]
#[command(
    name = "zmesh-echo-client",
    about = "gRPC and WebSocket calls to zmesh-echo"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A gRPC call over h2c: proto.EchoTestService/Echo, or EchoStream with --stream.
    Grpc {
        /// `http://host:port`.
        url: String,
        /// Call the bidirectional EchoStream, one reply awaited per message.
        #[arg(long)]
        stream: bool,
        /// A message to send; repeatable with --stream.
        #[arg(short, long = "message", required = true)]
        messages: Vec<String>,
        /// Sent as `x-echo-trailer`, which the echo app returns as a trailer.
        #[arg(long)]
        trailer: Option<String>,
        /// A request header, `name:value`; repeatable.
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// Make this many calls, one after another, each on its own connection.
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// A WebSocket: each message sent and its echo awaited.
    Ws {
        /// `ws://host:port/path`.
        url: String,
        /// A text message to send; repeatable.
        #[arg(short, long = "message", required = true)]
        messages: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let report = match Cli::parse().cmd {
        Cmd::Grpc {
            url,
            stream,
            messages,
            trailer,
            headers,
            count,
        } => {
            let mut out = String::new();
            for _ in 0..count {
                out.push_str(
                    &client::grpc(&url, stream, &messages, trailer.as_deref(), &headers).await?,
                );
            }
            out
        }
        Cmd::Ws { url, messages } => client::websocket(&url, &messages).await?,
    };
    print!("{report}");
    Ok(())
}
