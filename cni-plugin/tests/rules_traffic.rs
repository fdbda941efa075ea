//! What the rules do to real traffic, per backend, in a private `zmesh_tests::Sandbox`
//! (needs root): two hosts `pod` (10.200.0.2, fd00:200::2) and `peer` (10.200.0.3,
//! fd00:200::3) on the lab bridge, the node's netns (10.200.0.1) around them. Stand-ins for
//! ztunnel's listeners in `pod` record each connection with its `SO_ORIGINAL_DST`; the app
//! and a real server on `peer` record theirs, so every case shows where a connection landed.

use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
    UdpSocket,
};
use std::os::fd::AsRawFd;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use nix::sys::socket::{
    self as sock, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, sockopt,
};
use nix::sys::time::TimeVal;
use zmesh_cni::rules::{self, Backend, HostConfig, RuleConfig};
use zmesh_tests::Sandbox;
use zmesh_tests::lab::Topology;

const WAIT: Duration = Duration::from_secs(10);
const POD_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 2);
const PEER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 3);
const ANY4: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
const ANY6: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

/// A connection as the listener that accepted it saw it.
#[derive(Debug)]
struct Accepted {
    peer: SocketAddr,
    local: SocketAddr,
    /// `SO_ORIGINAL_DST` (`IP6T_SO_ORIGINAL_DST`): where the client meant to go.
    original_dst: Option<SocketAddr>,
}

/// A TCP listener inside a netns that reports every connection it accepts.
struct Recorder {
    name: &'static str,
    listener: Arc<TcpListener>,
    rx: mpsc::Receiver<Accepted>,
}

/// A listening socket on `addr` (IPv6 sockets only take IPv6, so `0.0.0.0:p` and `[::]:p`
/// can coexist).
fn bind_listener(addr: SocketAddr) -> nix::Result<TcpListener> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = sock::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    sock::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if addr.is_ipv6() {
        sock::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    sock::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    sock::listen(&fd, Backlog::new(64)?)?;
    Ok(TcpListener::from(fd))
}

/// `SO_ORIGINAL_DST` of an accepted connection (for one that was not redirected, conntrack
/// answers with its actual destination).
fn original_dst(s: &TcpStream) -> Option<SocketAddr> {
    match s.local_addr().ok()? {
        SocketAddr::V4(_) => {
            let sin = sock::getsockopt(s, sockopt::OriginalDst).ok()?;
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddrV4::new(ip, u16::from_be(sin.sin_port)).into())
        }
        SocketAddr::V6(_) => {
            let sin6 = sock::getsockopt(s, sockopt::Ip6tOriginalDst).ok()?;
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddrV6::new(ip, u16::from_be(sin6.sin6_port), 0, 0).into())
        }
    }
}

impl Recorder {
    fn start(sb: &Sandbox, netns: &str, ip: IpAddr, port: u16, name: &'static str) -> Recorder {
        let addr = SocketAddr::new(ip, port);
        let listener = sb
            .in_netns(netns, move || bind_listener(addr))
            .unwrap()
            .unwrap_or_else(|e| panic!("{name}: binding {addr} in {netns}: {e}"));
        let listener = Arc::new(listener);
        let (tx, rx) = mpsc::channel();
        let accepting = listener.clone();
        std::thread::spawn(move || {
            // Ends when the recorder shuts the listener down (accept then fails).
            while let Ok((conn, peer)) = accepting.accept() {
                let seen = Accepted {
                    peer,
                    local: conn.local_addr().expect("local address"),
                    original_dst: original_dst(&conn),
                };
                if tx.send(seen).is_err() {
                    break;
                }
            }
        });
        Recorder { name, listener, rx }
    }

    /// The next connection; panics when none arrives in time.
    fn expect(&self) -> Accepted {
        self.rx
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("no connection reached {}", self.name))
    }

    fn assert_idle(&self) {
        if let Ok(seen) = self.rx.try_recv() {
            panic!("{} got an unexpected connection: {seen:?}", self.name);
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = sock::shutdown(self.listener.as_raw_fd(), sock::Shutdown::Both);
    }
}

/// Connects from inside `netns` to `dst`, optionally from a given source address and with a
/// socket mark, as ztunnel's sockets have.
fn connect(
    sb: &Sandbox,
    netns: Option<&str>,
    dst: SocketAddr,
    source: Option<IpAddr>,
    mark: Option<u32>,
) -> TcpStream {
    let dial = move || -> nix::Result<TcpStream> {
        let family = if dst.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let fd = sock::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
        // connect() gives up after SO_SNDTIMEO.
        sock::setsockopt(&fd, sockopt::SendTimeout, &TimeVal::new(10, 0))?;
        if let Some(mark) = mark {
            sock::setsockopt(&fd, sockopt::Mark, &mark)?;
        }
        if let Some(ip) = source {
            sock::bind(
                fd.as_raw_fd(),
                &SockaddrStorage::from(SocketAddr::new(ip, 0)),
            )?;
        }
        sock::connect(fd.as_raw_fd(), &SockaddrStorage::from(dst))?;
        Ok(TcpStream::from(fd))
    };
    sb.netns(netns)
        .run(dial)
        .unwrap()
        .unwrap_or_else(|e| panic!("connecting to {dst} from {netns:?}: {e}"))
}

/// Asserts that the connection made by `dial` landed on `on` (and nowhere else), and
/// returns what `on` saw.
fn lands(on: &Recorder, all: &[&Recorder], dial: impl FnOnce() -> TcpStream) -> Accepted {
    let stream = dial();
    let seen = on.expect();
    drop(stream);
    for r in all {
        r.assert_idle();
    }
    seen
}

fn ip_in(sb: &Sandbox, host: &str, cidr: &str) {
    sb.run(&[
        "ip", "-n", host, "addr", "add", cidr, "dev", "eth0", "nodad",
    ])
    .unwrap();
}

fn redirection_behaves(backend: Backend) {
    let sb = Sandbox::new().expect("sandbox (run the tests as root)");
    let topo = Topology::build(&sb, &["pod", "peer"]).unwrap();
    let (pod, peer) = (
        IpAddr::from(topo.host_ip("pod")),
        IpAddr::from(topo.host_ip("peer")),
    );
    let (pod6, peer6) = (IpAddr::V6(POD_V6), IpAddr::V6(PEER_V6));
    ip_in(&sb, "pod", "fd00:200::2/64");
    ip_in(&sb, "peer", "fd00:200::3/64");
    // The probe source lives on the peer (standing in for the node after SNAT); the pod's
    // replies find it on the link.
    let probe4 = IpAddr::V4(rules::PROBE_SNAT_V4);
    let probe6 = IpAddr::V6(rules::PROBE_SNAT_V6);
    topo.add_ip("peer", probe4).unwrap();
    ip_in(&sb, "peer", &format!("{probe6}/128"));
    sb.run(&[
        "ip", "-n", "pod", "-6", "route", "add", "default", "dev", "eth0",
    ])
    .unwrap();

    let cfg = RuleConfig {
        dns_capture: true,
        ipv6: true,
        ..RuleConfig::default()
    };
    rules::apply(Some(&sb.netns_path(Some("pod"))), backend, &cfg).unwrap();

    let out4 = Recorder::start(&sb, "pod", ANY4, rules::OUTBOUND_PORT, "pod 15001 (v4)");
    let out6 = Recorder::start(&sb, "pod", ANY6, rules::OUTBOUND_PORT, "pod 15001 (v6)");
    let in4 = Recorder::start(&sb, "pod", ANY4, rules::INBOUND_PORT, "pod 15006 (v4)");
    let in6 = Recorder::start(&sb, "pod", ANY6, rules::INBOUND_PORT, "pod 15006 (v6)");
    let hbone = Recorder::start(&sb, "pod", ANY4, rules::HBONE_PORT, "pod 15008");
    let dns_tcp = Recorder::start(&sb, "pod", ANY4, rules::DNS_PORT, "pod 15053/tcp");
    let app4 = Recorder::start(&sb, "pod", ANY4, 8080, "pod app :8080 (v4)");
    let app6 = Recorder::start(&sb, "pod", ANY6, 8080, "pod app :8080 (v6)");
    let server = Recorder::start(&sb, "peer", ANY4, 80, "peer server :80");
    let all = [
        &out4, &out6, &in4, &in6, &hbone, &dns_tcp, &app4, &app6, &server,
    ];
    let dst = SocketAddr::new;

    // Outbound from the pod goes to 15001, which learns the real destination.
    let seen = lands(&out4, &all, || {
        connect(&sb, Some("pod"), dst(peer, 80), None, None)
    });
    assert_eq!(seen.original_dst, Some(dst(peer, 80)), "{seen:?}");
    let seen = lands(&out6, &all, || {
        connect(&sb, Some("pod"), dst(peer6, 80), None, None)
    });
    assert_eq!(seen.original_dst, Some(dst(peer6, 80)), "{seen:?}");

    // Inbound to any port but 15008 goes to 15006.
    let seen = lands(&in4, &all, || {
        connect(&sb, Some("peer"), dst(pod, 8080), None, None)
    });
    assert_eq!(seen.original_dst, Some(dst(pod, 8080)), "{seen:?}");
    assert_eq!(seen.peer.ip(), peer);
    let seen = lands(&in6, &all, || {
        connect(&sb, Some("peer"), dst(pod6, 8080), None, None)
    });
    assert_eq!(seen.original_dst, Some(dst(pod6, 8080)), "{seen:?}");

    // HBONE is never redirected.
    let seen = lands(&hbone, &all, || {
        connect(&sb, Some("peer"), dst(pod, rules::HBONE_PORT), None, None)
    });
    assert_eq!(seen.local, dst(pod, rules::HBONE_PORT), "{seen:?}");

    // ztunnel's own sockets (mark 0x539) reach the real destination.
    let seen = lands(&server, &all, || {
        connect(
            &sb,
            Some("pod"),
            dst(peer, 80),
            None,
            Some(rules::ZTUNNEL_MARK),
        )
    });
    assert_eq!(seen.peer.ip(), pod, "{seen:?}");

    // Loopback, and the pod calling its own IP, stay inside the pod.
    let loopback4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let seen = lands(&app4, &all, || {
        connect(&sb, Some("pod"), dst(loopback4, 8080), None, None)
    });
    assert_eq!(seen.local, dst(loopback4, 8080), "{seen:?}");
    let loopback6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let seen = lands(&app6, &all, || {
        connect(&sb, Some("pod"), dst(loopback6, 8080), None, None)
    });
    assert_eq!(seen.local, dst(loopback6, 8080), "{seen:?}");
    let seen = lands(&app4, &all, || {
        connect(&sb, Some("pod"), dst(pod, 8080), None, None)
    });
    assert_eq!(seen.local, dst(pod, 8080), "{seen:?}");

    // Kubelet probes (SNATed to the probe address on the node) reach the app directly.
    for (probe, target, app) in [(probe4, pod, &app4), (probe6, pod6, &app6)] {
        let seen = lands(app, &all, || {
            connect(&sb, Some("peer"), dst(target, 8080), Some(probe), None)
        });
        assert_eq!(seen.peer.ip(), probe, "{seen:?}");
    }

    // DNS capture: TCP and UDP to port 53 go to 15053, except ztunnel's own.
    let seen = lands(&dns_tcp, &all, || {
        connect(&sb, Some("pod"), dst(peer, 53), None, None)
    });
    assert_eq!(seen.original_dst, Some(dst(peer, 53)), "{seen:?}");
    udp_dns_is_captured(&sb, peer);
}

/// A UDP query from the pod to the peer's port 53 reaches the pod's 15053; the same from a
/// socket marked like ztunnel's reaches the peer.
fn udp_dns_is_captured(sb: &Sandbox, peer: IpAddr) {
    let bind_udp = |netns: &str, port: u16| {
        let s = sb
            .in_netns(netns, move || {
                UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
            })
            .unwrap()
            .unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s
    };
    let proxy = bind_udp("pod", rules::DNS_PORT);
    let upstream = bind_udp("peer", 53);
    let send = |mark: Option<u32>, payload: &'static [u8]| {
        sb.in_netns("pod", move || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            if let Some(mark) = mark {
                sock::setsockopt(&s, sockopt::Mark, &mark).unwrap();
            }
            s.send_to(payload, (peer, 53)).unwrap();
        })
        .unwrap();
    };
    let mut buf = [0u8; 64];
    send(None, b"app query");
    let (n, _) = proxy
        .recv_from(&mut buf)
        .expect("the app's query reached 15053");
    assert_eq!(&buf[..n], b"app query");
    send(Some(rules::ZTUNNEL_MARK), b"ztunnel query");
    let (n, _) = upstream
        .recv_from(&mut buf)
        .expect("ztunnel's query reached the peer");
    assert_eq!(&buf[..n], b"ztunnel query");
}

#[test]
fn nftables_redirection_behaves() {
    redirection_behaves(Backend::Nftables);
}

#[test]
fn iptables_legacy_redirection_behaves() {
    redirection_behaves(Backend::IptablesLegacy);
}

#[test]
fn iptables_nft_redirection_behaves() {
    redirection_behaves(Backend::IptablesNft);
}

/// The host rules in the node's netns: the node's own connections to an enrolled pod arrive
/// from 169.254.7.127 and reach the app; forwarded ones keep their source and are captured;
/// after `remove_probe_pod`, the node's connections are captured too.
fn node_probes_bypass_capture(backend: Backend) {
    let sb = Sandbox::new().expect("sandbox (run the tests as root)");
    let topo = Topology::build(&sb, &["pod", "peer"]).unwrap();
    let (pod, node) = (IpAddr::from(topo.host_ip("pod")), topo.bridge_ip());
    let node_ns = sb.netns_path(None);
    let node_ns = Some(node_ns.as_path());
    rules::apply(
        Some(&sb.netns_path(Some("pod"))),
        backend,
        &RuleConfig::default(),
    )
    .unwrap();
    // Like a pod's default route: back through the node, which undoes the SNAT.
    let probe = rules::PROBE_SNAT_V4.to_string();
    sb.run(&[
        "ip",
        "-n",
        "pod",
        "route",
        "add",
        &probe,
        "via",
        &node.to_string(),
    ])
    .unwrap();

    let host = HostConfig::default();
    rules::apply_host(node_ns, backend, &host).unwrap();
    rules::add_probe_pod(node_ns, backend, &host, pod).unwrap();

    let inbound = Recorder::start(&sb, "pod", ANY4, rules::INBOUND_PORT, "pod 15006");
    let app = Recorder::start(&sb, "pod", ANY4, 8080, "pod app :8080");
    let all = [&inbound, &app];
    let target = SocketAddr::new(pod, 8080);

    let seen = lands(&app, &all, || connect(&sb, None, target, None, None));
    assert_eq!(seen.peer.ip(), IpAddr::V4(rules::PROBE_SNAT_V4), "{seen:?}");

    // The peer reaches the pod through the node (forwarded, no local socket): not SNATed.
    sb.in_root_netns(|| {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
        for dev in ["all", "br0"] {
            let knob = format!("/proc/sys/net/ipv4/conf/{dev}/send_redirects");
            std::fs::write(knob, "0").unwrap();
        }
    })
    .unwrap();
    let count = "table inet lab-count {\n chain counting {\n  type filter hook forward priority 0;\n  \
                 ip daddr 10.200.0.2 tcp dport 8080 counter\n }\n}\n";
    sb.run_stdin(None, &["nft", "-f", "-"], Some(count))
        .unwrap();
    let pod_host = format!("{pod}/32");
    sb.run(&[
        "ip",
        "-n",
        "peer",
        "route",
        "add",
        &pod_host,
        "via",
        &node.to_string(),
    ])
    .unwrap();
    let seen = lands(&inbound, &all, || {
        connect(&sb, Some("peer"), target, None, None)
    });
    assert_eq!(
        seen.peer.ip(),
        IpAddr::from(topo.host_ip("peer")),
        "{seen:?}"
    );
    assert_eq!(seen.original_dst, Some(target));
    let counted = sb
        .run(&["nft", "list", "table", "inet", "lab-count"])
        .unwrap();
    assert!(
        !counted.contains("packets 0 "),
        "not forwarded by the node:\n{counted}"
    );

    rules::remove_probe_pod(node_ns, backend, &host, pod).unwrap();
    let seen = lands(&inbound, &all, || connect(&sb, None, target, None, None));
    assert_eq!(seen.peer.ip(), IpAddr::V4(node), "{seen:?}");
    assert_eq!(seen.original_dst, Some(target));
}

#[test]
fn nftables_node_probes_bypass_capture() {
    node_probes_bypass_capture(Backend::Nftables);
}

#[test]
fn iptables_legacy_node_probes_bypass_capture() {
    node_probes_bypass_capture(Backend::IptablesLegacy);
}

#[test]
fn iptables_nft_node_probes_bypass_capture() {
    node_probes_bypass_capture(Backend::IptablesNft);
}
