//! Choosing a port for another process to listen on.
//!
//! The usual trick (bind port 0, read the port, close, hand it over) races with everything
//! else on the machine: the kernel hands the same ephemeral range to every outgoing
//! connection, so between our close and the child's bind an outgoing connection, or a second
//! caller doing the same trick, can take the port. The child then exits with "Address
//! already in use".
//!
//! [`free_port`] avoids both: it picks from the ports just *below* the kernel's ephemeral
//! range (never used for outgoing connections), checks the port is free by binding it, and
//! remembers the ports it handed out recently so that two callers in one process never get
//! the same one.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Mutex;

/// How many recently handed-out ports are never handed out again.
const REMEMBERED: usize = 1024;
/// Random candidates tried before falling back to a kernel-chosen port.
const ATTEMPTS: usize = 256;
/// Where the ephemeral range is read from on Linux.
const EPHEMERAL_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
/// The Linux default lower bound of the ephemeral range.
const DEFAULT_EPHEMERAL_LOW: u16 = 32768;

static HANDED_OUT: Mutex<VecDeque<u16>> = Mutex::new(VecDeque::new());

/// A port on `ip` that is free now, outside the kernel's ephemeral range when there is room
/// below it, and not handed out by this process recently.
///
/// # Errors
/// When no port on `ip` can be bound at all.
pub fn free_port(ip: IpAddr) -> io::Result<u16> {
    let (low, high) = candidate_range(ephemeral_low());
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if low < high {
        let span = u64::from(high - low);
        for _ in 0..ATTEMPTS {
            let offset = u16::try_from(random() % span).unwrap_or(0);
            let port = low + offset;
            if !handed_out.contains(&port) && bindable(ip, port) {
                remember(&mut handed_out, port);
                return Ok(port);
            }
        }
    }
    // Crowded or unusual machine: let the kernel choose, still never repeating ourselves.
    for _ in 0..ATTEMPTS {
        let port = TcpListener::bind(SocketAddr::new(ip, 0))?
            .local_addr()?
            .port();
        if !handed_out.contains(&port) {
            remember(&mut handed_out, port);
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no free port on {ip}"),
    ))
}

/// The half-open range `[low, high)` to pick from: the ports below the ephemeral range, down
/// to half its lower bound (the registered ports most services use sit lower still).
fn candidate_range(ephemeral_low: u16) -> (u16, u16) {
    let low = (ephemeral_low / 2).max(1024);
    (low, ephemeral_low.max(low))
}

fn ephemeral_low() -> u16 {
    std::fs::read_to_string(EPHEMERAL_RANGE)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_LOW)
}

fn bindable(ip: IpAddr, port: u16) -> bool {
    TcpListener::bind(SocketAddr::new(ip, port)).is_ok()
}

fn remember(handed_out: &mut VecDeque<u16>, port: u16) {
    if handed_out.len() == REMEMBERED {
        handed_out.pop_front();
    }
    handed_out.push_back(port);
}

/// A random number from the standard library's per-process random hasher keys.
fn random() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[test]
    fn candidates_sit_below_the_ephemeral_range() {
        assert_eq!(candidate_range(32768), (16384, 32768));
        assert_eq!(candidate_range(49152), (24576, 49152));
        // No room below: an empty range, so the kernel chooses.
        let (low, high) = candidate_range(1024);
        assert!(low >= high);
    }

    #[test]
    fn ports_are_free_outside_the_ephemeral_range_and_never_repeat() {
        let ephemeral = ephemeral_low();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let port = free_port(LOOPBACK).expect("a free loopback port");
            assert!(seen.insert(port), "port {port} handed out twice");
            if ephemeral >= 2048 {
                assert!(port < ephemeral, "{port} is in the ephemeral range");
            }
            assert!(bindable(LOOPBACK, port), "{port} is not free");
        }
    }

    #[test]
    fn a_port_in_use_is_not_handed_out() {
        let (low, high) = candidate_range(ephemeral_low());
        // Occupy a block of candidates; none of them may come back.
        let held: Vec<TcpListener> = (low..high.min(low + 64))
            .filter_map(|p| TcpListener::bind(SocketAddr::new(LOOPBACK, p)).ok())
            .collect();
        let held_ports: Vec<u16> = held
            .iter()
            .filter_map(|l| l.local_addr().ok().map(|a| a.port()))
            .collect();
        for _ in 0..100 {
            let port = free_port(LOOPBACK).expect("a free loopback port");
            assert!(!held_ports.contains(&port), "{port} is held by this test");
        }
    }
}
