//! Packet capture in pure Rust: an `AF_PACKET`/`SOCK_RAW` socket bound to one interface, read
//! by a background thread until [`Capture::stop`].
//!
//! Typical use: capture on a host's bridge-side veth ([`crate::lab::Topology::veth`]) to prove
//! that a marker sent in plaintext by an app is *not* visible on the wire once the mesh carries
//! the traffic (and, as the positive control, that it *is* visible without the mesh).
//!
//! The socket is created with protocol 0 (it receives nothing) and then bound with `ETH_P_ALL`
//! to the interface, so no frame of another interface slips in; it is bound before
//! [`Capture::start`] returns. Frames of both directions are kept, whole (with GSO, one
//! "frame" may carry up to 64 KiB of TCP payload). A capture **may drop frames under load**:
//! the receive buffer is forced to 16 MiB, and drops the kernel reports
//! (`PACKET_STATISTICS.tp_drops`) are returned in [`Captured::drops`]; a test that asserts
//! absence of a marker should check that `drops` is 0, or transfer less.

use std::io;
use std::mem::size_of;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

use crate::sandbox::Sandbox;

const ETH_P_ALL: u16 = 0x0003;
const SO_RCVBUFFORCE: libc::c_int = 33;
const PACKET_STATISTICS: libc::c_int = 6;
const RCVBUF: libc::c_int = 16 << 20;

/// `struct tpacket_stats` from `<linux/if_packet.h>`.
#[repr(C)]
#[derive(Default)]
struct TpacketStats {
    tp_packets: libc::c_uint,
    tp_drops: libc::c_uint,
}

/// What a capture saw.
#[derive(Clone, Debug, Default)]
pub struct Captured {
    /// Every frame's bytes (Ethernet header included), concatenated in arrival order.
    pub data: Vec<u8>,
    /// Number of frames.
    pub frames: usize,
    /// Frames the kernel dropped because the socket's buffer was full.
    pub drops: u64,
    /// Where each frame ends in `data`, in order (one entry per frame).
    pub frame_ends: Vec<usize>,
}

/// The headers of one IPv4 TCP segment seen by a capture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSegment {
    /// Source address and port.
    pub src: SocketAddrV4,
    /// Destination address and port.
    pub dst: SocketAddrV4,
    /// The TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10).
    pub flags: u8,
    /// TCP payload bytes (a GSO frame may carry many segments' worth).
    pub payload_len: usize,
}

impl TcpSegment {
    /// A connection attempt: SYN without ACK.
    pub fn is_syn(&self) -> bool {
        self.flags & 0x12 == 0x02
    }

    /// A reset.
    pub fn is_rst(&self) -> bool {
        self.flags & 0x04 != 0
    }
}

/// Parses an Ethernet frame carrying IPv4 TCP; `None` for anything else.
fn tcp_segment(frame: &[u8]) -> Option<TcpSegment> {
    const ETH: usize = 14;
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ip = frame.get(ETH..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if ip[0] >> 4 != 4 || *ip.get(9)? != 6 || ihl < 20 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let addr = |at: usize| -> Option<std::net::Ipv4Addr> {
        let b: [u8; 4] = ip.get(at..at + 4)?.try_into().ok()?;
        Some(b.into())
    };
    let tcp = ip.get(ihl..)?;
    let port = |at: usize| Some(u16::from_be_bytes([*tcp.get(at)?, *tcp.get(at + 1)?]));
    let doff = usize::from(tcp.get(12)? >> 4) * 4;
    Some(TcpSegment {
        src: SocketAddrV4::new(addr(12)?, port(0)?),
        dst: SocketAddrV4::new(addr(16)?, port(2)?),
        flags: *tcp.get(13)?,
        payload_len: total.saturating_sub(ihl + doff),
    })
}

impl Captured {
    /// Whether `needle` occurs in the captured bytes.
    pub fn contains(&self, needle: &[u8]) -> bool {
        contains(&self.data, needle)
    }

    /// Each frame's bytes, in arrival order.
    pub fn frames(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.frame_ends.iter().copied());
        starts
            .zip(self.frame_ends.iter().copied())
            .map(|(a, b)| &self.data[a..b])
    }

    /// The IPv4 TCP segments among the frames (headers only).
    pub fn tcp_segments(&self) -> Vec<TcpSegment> {
        self.frames().filter_map(tcp_segment).collect()
    }
}

/// Whether `needle` occurs in `haystack` (an empty needle always does).
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// A running capture on one interface.
#[derive(Debug)]
pub struct Capture {
    iface: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Captured>>>,
}

fn check(ret: libc::c_int, what: &str) -> Result<libc::c_int> {
    if ret < 0 {
        Err(anyhow!("{what}: {}", io::Error::last_os_error()))
    } else {
        Ok(ret)
    }
}

/// Opens and binds the packet socket; must run in the interface's netns.
fn open(iface: &str) -> Result<OwnedFd> {
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: plain syscalls; every pointer passed points to a live local of the right size.
    unsafe {
        let ifindex = libc::if_nametoindex(name.as_ptr());
        if ifindex == 0 {
            return Err(anyhow!(
                "no interface {iface:?}: {}",
                io::Error::last_os_error()
            ));
        }
        let fd = check(
            libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0),
            "socket(AF_PACKET)",
        )?;
        let fd = OwnedFd::from_raw_fd(fd);
        let raw = fd.as_raw_fd();
        let size = RCVBUF;
        let set = |opt, what| {
            check(
                libc::setsockopt(
                    raw,
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                ),
                what,
            )
        };
        // FORCE goes past net.core.rmem_max (root); plain SO_RCVBUF is the fallback.
        if set(SO_RCVBUFFORCE, "SO_RCVBUFFORCE").is_err() {
            set(libc::SO_RCVBUF, "SO_RCVBUF")?;
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        check(
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            ),
            "SO_RCVTIMEO",
        )?;
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = ifindex as libc::c_int;
        check(
            libc::bind(
                raw,
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            ),
            "bind(AF_PACKET)",
        )?;
        Ok(fd)
    }
}

/// Reads (and resets) the socket's drop counter.
fn drops(fd: RawFd) -> u64 {
    let mut st = TpacketStats::default();
    let mut len = size_of::<TpacketStats>() as libc::socklen_t;
    // SAFETY: `st` and `len` are live locals of the sizes given.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_PACKET,
            PACKET_STATISTICS,
            (&mut st as *mut TpacketStats).cast(),
            &mut len,
        )
    };
    if ret == 0 { st.tp_drops.into() } else { 0 }
}

fn read_loop(fd: OwnedFd, stop: Arc<AtomicBool>) -> Result<Captured> {
    let mut out = Captured::default();
    let mut buf = vec![0u8; 256 * 1024];
    let raw = fd.as_raw_fd();
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        // Once stopping, drain what is queued without waiting.
        let flags = if stopping { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: `buf` is a live buffer of the length given.
        let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n > 0 {
            out.data.extend_from_slice(&buf[..n as usize]);
            out.frames += 1;
            out.frame_ends.push(out.data.len());
            continue;
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut if stopping => break,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                out.drops += drops(raw);
                continue;
            }
            _ => return Err(anyhow!("recv on the capture socket: {err}")),
        }
    }
    out.drops += drops(raw);
    Ok(out)
}

impl Capture {
    /// Starts capturing on `iface` in the sandbox's root netns (where the bridge and the
    /// hosts' `v-<host>` veth ends are). The socket is bound when this returns.
    pub fn start(sandbox: &Sandbox, iface: &str) -> Result<Capture> {
        Self::start_in(sandbox, None, iface)
    }

    /// Starts capturing on `iface` inside `netns` (`None`: the sandbox's root netns), e.g.
    /// `lo` of a host.
    pub fn start_in(sandbox: &Sandbox, netns: Option<&str>, iface: &str) -> Result<Capture> {
        let fd = match netns {
            Some(ns) => sandbox.in_netns(ns, || open(iface))?,
            None => sandbox.in_root_netns(|| open(iface))?,
        }
        .with_context(|| format!("starting a capture on {iface}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("capture-{iface}"))
            .spawn(move || read_loop(fd, stop2))?;
        Ok(Capture {
            iface: iface.to_owned(),
            stop,
            thread: Some(thread),
        })
    }

    /// The interface captured.
    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// Stops the capture and returns what it saw. Frames already queued to the socket are
    /// included; call it after the traffic of interest has completed.
    pub fn stop(mut self) -> Result<Captured> {
        // Frames cross a veth through the receive softirq; give the last ones a moment.
        std::thread::sleep(Duration::from_millis(20));
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("a capture is stopped once")
            .join()
            .map_err(|_| anyhow!("capture thread panicked"))?
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn contains_finds_needles() {
        assert!(super::contains(b"abcdef", b"cde"));
        assert!(!super::contains(b"abcdef", b"ce"));
        assert!(super::contains(b"", b""));
        assert!(!super::contains(b"ab", b"abc"));
    }

    #[test]
    fn parses_ipv4_tcp_headers() {
        let mut frame = vec![0u8; 12];
        frame.extend([0x08, 0x00]); // IPv4
        // IPv4: IHL 5, total 20 + 20 + 3, TCP, 10.0.0.1 -> 10.0.0.2.
        frame.extend([
            0x45, 0, 0, 43, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ]);
        // TCP: 1234 -> 15008, data offset 5, SYN|ACK.
        frame.extend([
            0x04, 0xd2, 0x3a, 0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x12, 0, 0,
        ]);
        frame.extend([0, 0, 0, 0, b'a', b'b', b'c']);
        let seg = super::tcp_segment(&frame).unwrap();
        assert_eq!(seg.src.to_string(), "10.0.0.1:1234");
        assert_eq!(seg.dst.to_string(), "10.0.0.2:15008");
        assert_eq!(seg.payload_len, 3);
        assert!(!seg.is_syn() && !seg.is_rst());
        let mut arp = frame.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(super::tcp_segment(&arp).is_none());
        let cap = super::Captured {
            frame_ends: vec![frame.len(), frame.len() + arp.len()],
            data: [frame, arp].concat(),
            frames: 2,
            drops: 0,
        };
        assert_eq!(cap.frames().count(), 2);
        assert_eq!(cap.tcp_segments(), vec![seg]);
    }
}
