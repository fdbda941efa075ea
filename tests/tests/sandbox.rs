//! Self-tests of the namespace lab: the sandbox, topology, apps, capture and redirection work,
//! and nothing is left behind. They need root (`sudo cargo test -p zmesh-tests`).

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use zmesh_tests::apps::{EchoServer, identify, transfer};
use zmesh_tests::capture::Capture;
use zmesh_tests::lab::{Topology, redirect_outbound};
use zmesh_tests::{Sandbox, pattern, unique_marker};

/// (a) Two hosts on the bridge exchange 1 MiB intact, and the server saw the client's IP.
#[test]
fn echo_one_megabyte_over_the_bridge() {
    let sb = Sandbox::new().unwrap();
    let topo = Topology::build(&sb, &["client", "server"]).unwrap();
    assert_eq!(topo.host_ip("client").to_string(), "10.200.0.2");
    assert_eq!(topo.host_ip("server").to_string(), "10.200.0.3");
    assert_eq!(topo.veth("server"), "v-server");

    let echo = EchoServer::start(&sb, "server", 8080, "server-a").unwrap();
    let dst = SocketAddr::from((topo.host_ip("server"), 8080));
    let payload = pattern(1 << 20, 1);
    let got = transfer(&sb, "client", dst, &payload).unwrap();
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "the echo came back altered");

    assert_eq!(identify(&sb, "client", dst).unwrap(), "server-a");
    assert_eq!(echo.accepted(), 2);
    assert!(
        echo.peers()
            .iter()
            .all(|p| p.ip() == std::net::IpAddr::from(topo.host_ip("client"))),
        "peers {:?}",
        echo.peers()
    );

    // An extra address on a host is reachable from the others.
    let extra: std::net::IpAddr = "10.200.0.100".parse().unwrap();
    topo.add_ip("server", extra).unwrap();
    let via_extra = SocketAddr::new(extra, 8080);
    assert_eq!(identify(&sb, "client", via_extra).unwrap(), "server-a");

    // Several MiB in both directions at once must not deadlock.
    let big = pattern(8 << 20, 2);
    assert!(transfer(&sb, "client", dst, &big).unwrap() == big);
}

/// (b) Positive control for "encrypted on the wire" tests: a capture on the client's veth
/// sees the marker of an unencrypted transfer.
#[test]
fn capture_sees_plaintext_marker() {
    let sb = Sandbox::new().unwrap();
    let topo = Topology::build(&sb, &["client", "server"]).unwrap();
    let _echo = EchoServer::start(&sb, "server", 9000, "server").unwrap();
    let marker = unique_marker();

    let cap = Capture::start(&sb, &topo.veth("client")).unwrap();
    let dst = SocketAddr::from((topo.host_ip("server"), 9000));
    let reply = transfer(&sb, "client", dst, marker.as_bytes()).unwrap();
    assert_eq!(reply, marker.as_bytes());
    let seen = cap.stop().unwrap();

    assert!(seen.frames >= 6, "only {} frames", seen.frames);
    assert_eq!(seen.drops, 0);
    assert!(seen.contains(marker.as_bytes()), "marker not captured");
    assert!(!seen.contains(unique_marker().as_bytes()));

    // Nothing of a transfer between other hosts shows up on this veth... except floods,
    // so only check that a capture elsewhere misses our marker.
    let other = Capture::start(&sb, "lo").unwrap();
    transfer(&sb, "client", dst, marker.as_bytes()).unwrap();
    assert!(!other.stop().unwrap().contains(marker.as_bytes()));
}

/// The inode of a namespace file, to find it again among processes.
fn ns_inode(path: &str) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

/// The host pid of the process that has pid `ns_pid` in the pid namespace with this inode.
fn find_in_pidns(pidns: u64, ns_pid: u32) -> Option<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .find(|p| {
            std::fs::metadata(format!("/proc/{p}/ns/pid")).is_ok_and(|m| m.ino() == pidns)
                && std::fs::read_to_string(format!("/proc/{p}/status")).is_ok_and(|st| {
                    st.lines()
                        .find_map(|l| l.strip_prefix("NSpid:"))
                        .and_then(|v| v.split_whitespace().last()?.parse::<u32>().ok())
                        == Some(ns_pid)
                })
        })
}

fn is_zombie(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(") ")
        .is_none_or(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
}

/// Whether any process on the host is in the network namespace with this inode.
fn netns_in_use(ino: u64) -> bool {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .any(|e| std::fs::metadata(e.path().join("ns/net")).is_ok_and(|m| m.ino() == ino))
}

/// (c) After the sandbox is dropped, its anchor, its processes and its namespaces are gone,
/// and the host never saw its named netns.
#[test]
fn leaves_nothing_behind() {
    let names = ["zlab-leak-a", "zlab-leak-b"];
    let sb = Sandbox::new().unwrap();
    let pid = sb.pid();
    let dir = sb.dir().to_path_buf();
    let topo = Topology::build(&sb, &names).unwrap();
    let root_ns = ns_inode(&format!("/proc/{pid}/ns/net"));
    let host_ns = std::fs::metadata(sb.netns_path(Some("zlab-leak-a")))
        .unwrap()
        .ino();
    assert_ne!(root_ns, host_ns);
    assert_ne!(root_ns, ns_inode("/proc/self/ns/net"));
    // A long-running process inside a host netns, tracked by the sandbox.
    let sleeper = sb
        .spawn(
            "sleeper",
            sb.command(Some("zlab-leak-a"), "sleep", ["1000"]),
        )
        .unwrap();
    let sleeper_pid = sleeper.pid();
    // One that forks a grandchild and is then stopped: the orphan lives on inside the
    // sandbox's pid namespace, until the sandbox ends.
    let forker = sb
        .spawn(
            "forker",
            sb.command(
                Some("zlab-leak-b"),
                "sh",
                ["-c", "sleep 1000 & echo $!; exec sleep 1001"],
            ),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(sleeper.is_running(), "sleeper: {}", sleeper.log());
    // Process::pid is the program's, not nsenter's.
    let comm = std::fs::read_to_string(format!("/proc/{sleeper_pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "sleep");
    forker.terminate(Duration::from_secs(2)).unwrap();
    let orphan_ns_pid: u32 = forker.log().trim().parse().unwrap();
    let sandbox_pidns = ns_inode(&format!("/proc/{pid}/ns/pid"));
    let orphan = find_in_pidns(sandbox_pidns, orphan_ns_pid).expect("the orphan runs");
    assert_ne!(orphan, forker.pid());
    let listed = sb.run(&["ip", "netns", "list"]).unwrap();
    assert!(listed.contains("zlab-leak-a"), "{listed}");
    drop(topo);
    drop(sb);

    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "anchor {pid} alive"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{sleeper_pid}")).exists(),
        "tracked process {sleeper_pid} alive"
    );
    // Killed by the kernel with the pid namespace; reaped by the host's init at its pace.
    let deadline = Instant::now() + Duration::from_secs(5);
    while find_in_pidns(sandbox_pidns, orphan_ns_pid).is_some_and(|p| !is_zombie(p)) {
        assert!(Instant::now() < deadline, "orphan {orphan} alive");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
    let host = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let host = String::from_utf8_lossy(&host.stdout);
    for n in names {
        assert!(!host.contains(n), "host lists netns {n}: {host}");
        assert!(!std::path::Path::new("/run/netns").join(n).exists());
    }
    // The kernel frees a netns once nothing holds it; no process holds ours any more.
    let deadline = Instant::now() + Duration::from_secs(5);
    while netns_in_use(root_ns) || netns_in_use(host_ns) {
        assert!(
            Instant::now() < deadline,
            "a process still holds the lab's netns"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The anchor also ends, and removes the sandbox's directory, when the thread that created
/// the sandbox exits without dropping it (`PR_SET_PDEATHSIG`).
#[test]
fn anchor_dies_with_its_thread() {
    let (pid, dir) = std::thread::spawn(|| {
        let sb = Sandbox::new().unwrap();
        let out = (sb.pid(), sb.dir().to_path_buf());
        // No Drop: the stdin pipe stays open too, so only the death signal can end it.
        std::mem::forget(sb);
        out
    })
    .join()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // Forgotten, the anchor is never reaped: it stays a zombie of this process.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, rest)| &rest[..1]);
        if matches!(state, None | Some("Z")) && !dir.exists() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "anchor {pid} state {state:?}, dir {dir:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (d) The redirection ruleset applies in a host netns, and it works: a connection to a
/// service VIP (routable only through the default route) lands on the local :15001, whose
/// SO_ORIGINAL_DST is the VIP.
#[test]
fn nft_redirect_applies_in_host_netns() {
    let sb = Sandbox::new().unwrap();
    let topo = Topology::build(&sb, &["client", "server"]).unwrap();
    let rules = redirect_outbound(&sb, "client").unwrap();
    assert!(rules.contains("redirect to :15001"));
    let listed = sb.run_in("client", &["nft", "list", "ruleset"]).unwrap();
    assert!(listed.contains("table inet zmesh"), "{listed}");
    assert!(listed.contains("redirect to :15001"), "{listed}");
    assert!(listed.contains("meta mark 0x00000539 return"), "{listed}");
    // Applying twice replaces the table rather than stacking rules.
    redirect_outbound(&sb, "client").unwrap();
    let again = sb.run_in("client", &["nft", "list", "ruleset"]).unwrap();
    assert_eq!(again.matches("redirect to :15001").count(), 1, "{again}");
    // Other hosts and the sandbox root are untouched.
    assert!(
        !sb.run_in("server", &["nft", "list", "ruleset"])
            .unwrap()
            .contains("zmesh")
    );
    assert!(
        !sb.run(&["nft", "list", "ruleset"])
            .unwrap()
            .contains("zmesh")
    );

    // Functional check: a stand-in for ztunnel's outbound listener.
    let listener = sb
        .in_netns("client", || std::net::TcpListener::bind("0.0.0.0:15001"))
        .unwrap()
        .unwrap();
    let accept = std::thread::spawn(move || {
        let (conn, peer) = listener.accept().unwrap();
        let orig =
            nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::OriginalDst).unwrap();
        let ip = std::net::Ipv4Addr::from(u32::from_be(orig.sin_addr.s_addr));
        (peer, SocketAddr::from((ip, u16::from_be(orig.sin_port))))
    });
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let conn = sb
        .in_netns("client", || std::net::TcpStream::connect(vip))
        .unwrap()
        .unwrap();
    let (peer, orig) = accept.join().unwrap();
    drop(conn);
    assert_eq!(orig, vip);
    assert_eq!(peer.ip(), std::net::IpAddr::from(topo.host_ip("client")));

    // Sockets marked 0x539 (ztunnel's own) bypass the redirection and reach the server.
    let _echo = EchoServer::start(&sb, "server", 8080, "server").unwrap();
    let server = SocketAddr::from((topo.host_ip("server"), 8080));
    let marked = sb
        .in_netns("client", || -> std::io::Result<std::net::TcpStream> {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_mark(0x539)?;
            s.connect_timeout(&server.into(), Duration::from_secs(5))?;
            Ok(s.into())
        })
        .unwrap()
        .unwrap();
    assert_eq!(
        zmesh_tests::apps::exchange(marked, b"WHO\n").unwrap(),
        b"server\n"
    );
}
