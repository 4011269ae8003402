//! `NETLINK_SOCK_DIAG` (inet_diag): TCP and UDP sockets straight from the kernel.
//!
//! Dumps of every state, as `ss -tuna` asks for them: UDP with one `SOCK_DIAG_BY_FAMILY`
//! (`inet_diag_req_v2`) request per family, TCP with the original `TCPDIAG_GETSOCK` request that
//! covers both families in one pass (per-family requests when a kernel refuses it).
//! [`parse_inet_diag`] is the pure parser of one reply; the socket and framing come from
//! `netlink`. Owners are not known here: `procfs::attach_owners` fills them from the inode.

use crate::collect::netlink::{attrs, keep, u32_at, NetlinkSocket, Parsed};
use crate::collect::{Socket, SourceError};
use crate::model::{ip_from_bytes, Protocol};

/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h): request and reply type.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `TCPDIAG_GETSOCK` (linux/inet_diag.h): the original TCP request. The kernel dumps it with
/// family `AF_UNSPEC`, one walk over its TCP hash tables for IPv4 and IPv6 together; each walk
/// costs about a millisecond on a large host even with no socket, and per-family requests walk
/// twice. `ss` keeps it as its fallback; every kernel since inet_diag began still answers it.
const TCPDIAG_GETSOCK: u16 = 18;
const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;
const IPPROTO_TCP: u8 = libc::IPPROTO_TCP as u8;
const IPPROTO_UDP: u8 = libc::IPPROTO_UDP as u8;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then a 48-byte socket id.
const REQ_V2_LEN: usize = 56;
/// `struct inet_diag_req`: family, src_len, dst_len, ext, the socket id, states, dbs.
const REQ_V1_LEN: usize = 60;
/// `struct inet_diag_msg`, the fixed part of a reply before its attributes.
const DIAG_MSG_LEN: usize = 72;
/// `INET_DIAG_SKV6ONLY`: the kernel adds it to every IPv6 socket's reply unasked (there is no
/// `idiag_ext` bit for it); absent on kernels before it existed, read as "not v6-only" as `ss`
/// reads it.
const INET_DIAG_SKV6ONLY: u16 = 11;
/// Every TCP state but `TCP_BOUND_INACTIVE` (bit 13, Linux 6.5+): bound-only sockets appear
/// neither in `/proc/net/tcp` nor in `ss -a` before iproute2 6.6, so both sources agree.
const ALL_STATES: u32 = !(1 << 13);

/// TCP and UDP sockets of IPv4 and IPv6 in every state, without owners (pid and name `None`).
pub fn sockets() -> Result<Vec<Socket>, SourceError> {
    let mut socket = NetlinkSocket::open(libc::NETLINK_SOCK_DIAG)?;
    let mut out = Vec::new();
    if let Err(err) = dump_tcp_one_pass(&mut socket, &mut out) {
        debug!("inet_diag: one-pass TCP dump failed ({err}); asking per family");
        out.clear();
        // A dump that failed half-way may still have replies queued: start on a fresh socket.
        socket = NetlinkSocket::open(libc::NETLINK_SOCK_DIAG)?;
        for family in [AF_INET, AF_INET6] {
            dump_by_family(&mut socket, Protocol::Tcp, family, &mut out)?;
        }
    }
    for family in [AF_INET, AF_INET6] {
        dump_by_family(&mut socket, Protocol::Udp, family, &mut out)?;
    }
    Ok(out)
}

/// TCP of both families with one `TCPDIAG_GETSOCK` dump.
fn dump_tcp_one_pass(socket: &mut NetlinkSocket, out: &mut Vec<Socket>) -> Result<(), SourceError> {
    let mut body = [0u8; REQ_V1_LEN];
    body[52..56].copy_from_slice(&ALL_STATES.to_ne_bytes());
    socket
        .dump_into(TCPDIAG_GETSOCK, &body, out, |kind, p, out| {
            if kind == TCPDIAG_GETSOCK {
                keep(parse_inet_diag(p, Protocol::Tcp), "inet_diag", out);
            }
        })
        .map_err(|e| SourceError(format!("tcp: {e}")))
}

/// One protocol of one family with a `SOCK_DIAG_BY_FAMILY` dump.
fn dump_by_family(
    socket: &mut NetlinkSocket,
    protocol: Protocol,
    family: u8,
    out: &mut Vec<Socket>,
) -> Result<(), SourceError> {
    let ipproto = match protocol {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
    };
    socket
        .dump_into(
            SOCK_DIAG_BY_FAMILY,
            &request(family, ipproto),
            out,
            |kind, p, out| {
                if kind == SOCK_DIAG_BY_FAMILY {
                    keep(parse_inet_diag(p, protocol), "inet_diag", out);
                }
            },
        )
        .map_err(|e| {
            SourceError(format!(
                "{} {}: {e}",
                protocol.as_str(),
                family_name(family)
            ))
        })
}

fn family_name(family: u8) -> &'static str {
    if family == AF_INET6 {
        "IPv6"
    } else {
        "IPv4"
    }
}

/// The `inet_diag_req_v2` body: one family and protocol, all states, no extensions (the
/// attributes we read come unasked), a zero socket id (match all).
fn request(family: u8, protocol: u8) -> [u8; REQ_V2_LEN] {
    let mut body = [0u8; REQ_V2_LEN];
    body[0] = family;
    body[1] = protocol;
    body[4..8].copy_from_slice(&ALL_STATES.to_ne_bytes());
    body
}

/// Parses one `inet_diag_msg` reply (fixed part and attributes) into a socket of `protocol`.
/// Families other than IPv4 and IPv6 are not listed.
pub fn parse_inet_diag(payload: &[u8], protocol: Protocol) -> Parsed<Socket> {
    let header = payload.get(..DIAG_MSG_LEN).ok_or("short inet_diag_msg")?;
    let (family, state) = match header {
        [family, state, ..] => (*family, *state),
        _ => return Err("short inet_diag_msg"),
    };
    let width = match family {
        AF_INET => 4,
        AF_INET6 => 16,
        _ => return Ok(None),
    };
    // struct inet_diag_sockid at offset 4: ports in network order, then 16-byte addresses.
    let port_at = |at: usize| {
        let bytes: [u8; 2] = header.get(at..at + 2)?.try_into().ok()?;
        Some(u16::from_be_bytes(bytes))
    };
    let local_port = port_at(4).ok_or("short inet_diag_msg")?;
    let remote_port = port_at(6).ok_or("short inet_diag_msg")?;
    let src = header.get(8..8 + width).ok_or("short inet_diag_msg")?;
    let dst = header.get(24..24 + width).ok_or("short inet_diag_msg")?;
    let inode = u32_at(header, 68).ok_or("short inet_diag_msg")?;
    let local_ip = ip_from_bytes(src).ok_or("bad local address")?;
    let remote_ip = ip_from_bytes(dst).ok_or("bad remote address")?;

    let mut v6only = false;
    for (kind, data) in attrs(payload.get(DIAG_MSG_LEN..).unwrap_or(&[])) {
        if kind == INET_DIAG_SKV6ONLY {
            v6only = data.first().is_some_and(|b| *b != 0);
            break;
        }
    }
    let dual_stack = family == AF_INET6 && src.iter().all(|b| *b == 0) && !v6only;
    Ok(Some(Socket::from_kernel(
        protocol,
        (local_ip, local_port),
        (remote_ip, remote_port),
        state,
        u64::from(inode),
        dual_stack,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::netlink::fuzz::{mutate, XorShift};
    use crate::collect::procfs;
    use crate::model::{ConnState, Connection};
    use std::net::IpAddr;
    use std::path::Path;

    fn diag(family: u8, state: u8, local: (&str, u16), remote: (&str, u16), inode: u32) -> Vec<u8> {
        let mut p = vec![family, state, 0, 0];
        p.extend(local.1.to_be_bytes());
        p.extend(remote.1.to_be_bytes());
        for text in [local.0, remote.0] {
            let mut raw = [0u8; 16];
            match text.parse::<IpAddr>().unwrap() {
                IpAddr::V4(v4) => raw[..4].copy_from_slice(&v4.octets()),
                IpAddr::V6(v6) => raw.copy_from_slice(&v6.octets()),
            }
            p.extend(raw);
        }
        p.extend([0; 12]); // idiag_if, idiag_cookie
        p.extend([0; 16]); // expires, rqueue, wqueue, uid
        p.extend(inode.to_ne_bytes());
        p
    }

    fn with_v6only(mut p: Vec<u8>, value: u8) -> Vec<u8> {
        p.extend([8, 0, 8, 0, 0, 0, 0, 0]); // INET_DIAG_SHUTDOWN, ignored
        p.extend([5, 0, INET_DIAG_SKV6ONLY as u8, 0, value, 0, 0, 0]);
        p
    }

    fn socket(
        protocol: Protocol,
        local: (&str, u16),
        remote: (&str, Option<u16>),
        state: ConnState,
        inode: u64,
        dual_stack: bool,
    ) -> Socket {
        Socket {
            connection: Connection {
                protocol,
                local_ip: local.0.parse().unwrap(),
                local_port: local.1,
                remote_ip: Some(remote.0.parse().unwrap()),
                remote_port: remote.1,
                state: Some(state),
                pid: None,
                process_name: None,
            },
            inode,
            dual_stack,
        }
    }

    #[test]
    fn replies_become_sockets_as_ss_lists_them() {
        let tcp = Protocol::Tcp;
        let cases = vec![
            (diag(AF_INET, 10, ("0.0.0.0", 22), ("0.0.0.0", 0), 100), tcp),
            (
                diag(AF_INET, 1, ("192.0.2.2", 33048), ("203.0.113.80", 80), 101),
                tcp,
            ),
            (
                diag(AF_INET, 6, ("192.0.2.2", 33050), ("203.0.113.80", 80), 0),
                tcp,
            ),
            (
                with_v6only(diag(AF_INET6, 10, ("::", 22), ("::", 0), 102), 0),
                tcp,
            ),
            (
                with_v6only(diag(AF_INET6, 10, ("::", 8080), ("::", 0), 103), 1),
                tcp,
            ),
            (diag(AF_INET6, 10, ("::", 8081), ("::", 0), 104), tcp),
            (
                with_v6only(
                    diag(
                        AF_INET6,
                        1,
                        ("::ffff:10.0.0.1", 443),
                        ("::ffff:10.0.0.2", 51000),
                        105,
                    ),
                    0,
                ),
                tcp,
            ),
            (
                with_v6only(diag(AF_INET6, 10, ("fe80::1", 9000), ("::", 0), 106), 0),
                tcp,
            ),
            (
                diag(AF_INET, 7, ("0.0.0.0", 68), ("0.0.0.0", 0), 107),
                Protocol::Udp,
            ),
            (
                diag(AF_INET, 1, ("192.0.2.2", 5353), ("192.0.2.1", 53), 108),
                Protocol::Udp,
            ),
            (
                diag(AF_INET6, 7, ("::1", 323), ("::", 0), 109),
                Protocol::Udp,
            ),
            (
                diag(AF_UNIX_FOR_TEST, 1, ("0.0.0.0", 1), ("0.0.0.0", 1), 110),
                tcp,
            ),
            (
                diag(AF_INET, 1, ("0.0.0.0", 1), ("0.0.0.0", 1), 111)[..71].to_vec(),
                tcp,
            ),
        ];
        let got: Vec<Socket> = cases
            .iter()
            .filter_map(|(p, proto)| parse_inet_diag(p, *proto).ok().flatten())
            .collect();
        use ConnState::*;
        let (udp, unspec4, unspec6) = (Protocol::Udp, "0.0.0.0", "::");
        assert_eq!(
            got,
            vec![
                socket(tcp, (unspec4, 22), (unspec4, None), Listen, 100, false),
                socket(
                    tcp,
                    ("192.0.2.2", 33048),
                    ("203.0.113.80", Some(80)),
                    Established,
                    101,
                    false
                ),
                socket(
                    tcp,
                    ("192.0.2.2", 33050),
                    ("203.0.113.80", Some(80)),
                    TimeWait,
                    0,
                    false
                ),
                socket(tcp, (unspec6, 22), (unspec6, None), Listen, 102, true),
                socket(tcp, (unspec6, 8080), (unspec6, None), Listen, 103, false),
                socket(tcp, (unspec6, 8081), (unspec6, None), Listen, 104, true),
                socket(
                    tcp,
                    ("10.0.0.1", 443),
                    ("10.0.0.2", Some(51000)),
                    Established,
                    105,
                    false
                ),
                socket(tcp, ("fe80::1", 9000), (unspec6, None), Listen, 106, false),
                socket(udp, (unspec4, 68), (unspec4, None), Unknown, 107, false),
                socket(
                    udp,
                    ("192.0.2.2", 5353),
                    ("192.0.2.1", Some(53)),
                    Established,
                    108,
                    false
                ),
                socket(udp, ("::1", 323), (unspec6, None), Unknown, 109, false),
            ]
        );
    }

    const AF_UNIX_FOR_TEST: u8 = libc::AF_UNIX as u8;

    #[test]
    fn random_and_mutated_replies_never_panic() {
        let valid = [
            with_v6only(diag(AF_INET6, 10, ("::", 22), ("::", 0), 1), 0),
            diag(AF_INET, 1, ("192.0.2.2", 1), ("192.0.2.1", 2), 2),
        ];
        let mut rng = XorShift(0xdead_beef_cafe_f00d);
        for round in 0..20_000 {
            let buf = if round % 2 == 0 {
                let pick = rng.below(valid.len());
                mutate(&mut rng, &valid[pick])
            } else {
                let len = rng.below(160);
                rng.bytes(len)
            };
            let _ = parse_inet_diag(&buf, Protocol::Tcp);
            let _ = parse_inet_diag(&buf, Protocol::Udp);
        }
    }

    fn find<'a>(all: &'a [Socket], protocol: Protocol, ip: &str, port: u16) -> Option<&'a Socket> {
        let ip: IpAddr = ip.parse().unwrap();
        all.iter().find(|s| {
            s.connection.protocol == protocol
                && s.connection.local_ip == ip
                && s.connection.local_port == port
        })
    }

    #[test]
    fn live_listener_is_seen_by_sockdiag_and_proc_with_its_owner() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_port = udp.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let client_port = client.local_addr().unwrap().port();

        let diag = sockets().expect("sock_diag");
        let proc = procfs::sockets(Path::new("/proc")).expect("/proc/net");
        for all in [&diag, &proc] {
            let l = find(all, Protocol::Tcp, "127.0.0.1", port).expect("listener");
            assert_eq!(l.connection.state, Some(ConnState::Listen));
            assert_eq!(l.connection.remote_ip, Some("0.0.0.0".parse().unwrap()));
            assert_eq!(l.connection.remote_port, None);
            assert_ne!(l.inode, 0);
            // Match the peer too: an earlier run may have left this local port in TIME-WAIT.
            let c = all
                .iter()
                .find(|s| {
                    s.connection.local_port == client_port && s.connection.remote_port == Some(port)
                })
                .expect("client");
            assert_eq!(c.connection.state, Some(ConnState::Established));
            assert_eq!(
                c.connection.local_ip,
                "127.0.0.1".parse::<IpAddr>().unwrap()
            );
            let u = find(all, Protocol::Udp, "127.0.0.1", udp_port).expect("udp");
            assert_eq!(u.connection.state, Some(ConnState::Unknown));
        }
        let diag_listener = find(&diag, Protocol::Tcp, "127.0.0.1", port).unwrap();
        let proc_listener = find(&proc, Protocol::Tcp, "127.0.0.1", port).unwrap();
        assert_eq!(diag_listener, proc_listener);

        let owned = procfs::attach_owners(Path::new("/proc"), diag);
        let l = find(&owned, Protocol::Tcp, "127.0.0.1", port).unwrap();
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(l.connection.pid, Some(std::process::id()));
        assert_eq!(l.connection.process_name.as_deref(), Some(comm.trim()));
        drop((listener, udp, client));
    }

    #[test]
    fn live_ipv6_wildcard_listener_reports_dual_stack() {
        let Ok(listener) = std::net::TcpListener::bind("[::]:0") else {
            return; // no IPv6 on this host
        };
        let port = listener.local_addr().unwrap().port();
        let bindv6only = std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").unwrap();
        let all = sockets().unwrap();
        let l = find(&all, Protocol::Tcp, "::", port).expect("listener");
        assert_eq!(l.dual_stack, bindv6only.trim() == "0");
        assert_eq!(l.connection.remote_ip, Some("::".parse().unwrap()));
    }

    #[test]
    fn live_one_pass_and_per_family_tcp_dumps_agree() {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let v4_port = v4.local_addr().unwrap().port();
        let v6 = std::net::TcpListener::bind("[::]:0").ok();
        let v6_port = v6.as_ref().map(|l| l.local_addr().unwrap().port());

        let mut socket = NetlinkSocket::open(libc::NETLINK_SOCK_DIAG).unwrap();
        let mut one_pass = Vec::new();
        dump_tcp_one_pass(&mut socket, &mut one_pass).unwrap();
        let mut per_family = Vec::new();
        for family in [AF_INET, AF_INET6] {
            dump_by_family(&mut socket, Protocol::Tcp, family, &mut per_family).unwrap();
        }
        let ours = |all: &[Socket]| {
            let mut found = vec![find(all, Protocol::Tcp, "127.0.0.1", v4_port).cloned()];
            if let Some(port) = v6_port {
                found.push(find(all, Protocol::Tcp, "::", port).cloned());
            }
            found
        };
        assert!(ours(&one_pass).iter().all(Option::is_some), "{one_pass:?}");
        assert_eq!(ours(&one_pass), ours(&per_family));
        drop((v4, v6));
    }
}
