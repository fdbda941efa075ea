//! Writes the binary seed corpora (protobuf and DER) into `fuzz/seeds/<target>/`:
//!
//! - `xds_address`, `xds_authorization`: every resource the controller's golden translation
//!   inputs (`controller/tests/golden/{translate,authz}/*.in.yaml`) translate to, encoded as
//!   ztunnel receives it;
//! - `ca_csr`: CSRs as ztunnel's CA client makes them (P-256 with a SPIFFE SAN), and the other
//!   key types and SANs the CA must tell apart;
//! - `zds_message`: one packet of each ZDS message.
//!
//! The text seeds (`cni_invocation`, `local_config`, `hbone_connect`) are written by hand.
//! Run from the repository root: `cargo run -p zmesh-fuzz --example seeds`.

use std::fs;
use std::path::{Path, PathBuf};

use prost::Message;
use rcgen::{CertificateParams, KeyPair, SanType};
use xds_proto::istio::workload as pb;
use xds_proto::istio::workload::zds;
use zmesh_controller::translate::{MeshConfig, Objects, translate};
use zmesh_fuzz::named_resource;

fn seeds(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    fs::create_dir_all(&dir).expect("create the seed directory");
    dir
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let file: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    fs::write(seeds(target).join(file), bytes).expect("write a seed");
}

fn xds() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../controller/tests/golden");
    for set in ["translate", "authz"] {
        let mut inputs: Vec<_> = fs::read_dir(golden.join(set))
            .expect("read the golden inputs")
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.to_string_lossy().ends_with(".in.yaml"))
            .collect();
        inputs.sort();
        for input in inputs {
            let text = fs::read_to_string(&input).expect("read a golden input");
            let objects = Objects::from_yaml(&text).expect("a golden input parses");
            let out = translate(&objects, &MeshConfig::default());
            for (name, w) in out.workloads {
                let addr = pb::Address {
                    r#type: Some(pb::address::Type::Workload(w)),
                };
                write(
                    "xds_address",
                    &name,
                    &named_resource(&name, &addr.encode_to_vec()),
                );
            }
            for (name, s) in out.services {
                let addr = pb::Address {
                    r#type: Some(pb::address::Type::Service(s)),
                };
                write(
                    "xds_address",
                    &name,
                    &named_resource(&name, &addr.encode_to_vec()),
                );
            }
            for (name, a) in out.authorizations {
                write(
                    "xds_authorization",
                    &name,
                    &named_resource(&name, &a.encode_to_vec()),
                );
            }
        }
    }
}

fn csr(name: &str, alg: &'static rcgen::SignatureAlgorithm, sans: Vec<SanType>, pem: bool) {
    let key = KeyPair::generate_for(alg).expect("generate a key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    let req = params.serialize_request(&key).expect("serialise a CSR");
    if pem {
        write("ca_csr", name, req.pem().expect("PEM").as_bytes());
    } else {
        write("ca_csr", name, req.der().as_ref());
    }
}

fn csrs() {
    let uri = |s: &str| SanType::URI(s.try_into().expect("an IA5 string"));
    let spiffe = "spiffe://cluster.local/ns/default/sa/client";
    csr(
        "p256-spiffe",
        &rcgen::PKCS_ECDSA_P256_SHA256,
        vec![uri(spiffe)],
        false,
    );
    csr(
        "p256-spiffe-pem",
        &rcgen::PKCS_ECDSA_P256_SHA256,
        vec![uri(spiffe)],
        true,
    );
    csr("p384-no-san", &rcgen::PKCS_ECDSA_P384_SHA384, vec![], false);
    csr("ed25519", &rcgen::PKCS_ED25519, vec![uri(spiffe)], false);
    csr(
        "p256-other-trust-domain",
        &rcgen::PKCS_ECDSA_P256_SHA256,
        vec![uri("spiffe://other.example/ns/default/sa/client")],
        false,
    );
    csr(
        "p256-dns-san",
        &rcgen::PKCS_ECDSA_P256_SHA256,
        vec![SanType::DnsName(
            "client.default.svc".try_into().expect("a DNS name"),
        )],
        false,
    );
    csr(
        "rsa2048-spiffe",
        &rcgen::PKCS_RSA_SHA256,
        vec![uri(spiffe)],
        false,
    );
}

fn zds_packets() {
    let info = zds::WorkloadInfo {
        name: "web-0".into(),
        namespace: "shop".into(),
        service_account: "web".into(),
    };
    let uid = "0e9c3c1a-5b7d-4f2e-8a6b-1d2c3e4f5a6b".to_owned();
    let request = |payload| {
        zds::WorkloadRequest {
            payload: Some(payload),
        }
        .encode_to_vec()
    };
    use zds::workload_request::Payload;
    let packets: [(&str, u8, Vec<u8>); 7] = [
        (
            "add",
            1,
            request(Payload::Add(zds::AddWorkload {
                uid: uid.clone(),
                workload_info: Some(info),
            })),
        ),
        (
            "keep",
            0,
            request(Payload::Keep(zds::KeepWorkload { uid: uid.clone() })),
        ),
        ("del", 0, request(Payload::Del(zds::DelWorkload { uid }))),
        (
            "snapshot-sent",
            0,
            request(Payload::SnapshotSent(zds::SnapshotSent {})),
        ),
        (
            "hello",
            1 << 2,
            zds::ZdsHello {
                version: zds::Version::V1 as i32,
            }
            .encode_to_vec(),
        ),
        (
            "ack",
            2 << 2,
            zds::WorkloadResponse {
                payload: Some(zds::workload_response::Payload::Ack(zds::Ack {
                    error: String::new(),
                })),
            }
            .encode_to_vec(),
        ),
        (
            "nack",
            2 << 2,
            zds::WorkloadResponse {
                payload: Some(zds::workload_response::Payload::Ack(zds::Ack {
                    error: "cannot enter the network namespace".into(),
                })),
            }
            .encode_to_vec(),
        ),
    ];
    for (name, control, packet) in packets {
        let mut seed = vec![control];
        seed.extend_from_slice(&packet);
        write("zds_message", name, &seed);
    }
}

fn main() {
    xds();
    csrs();
    zds_packets();
}
