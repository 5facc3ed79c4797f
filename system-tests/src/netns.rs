//! A network namespace made by a test, joined to the host by a veth pair, so that a daemon
//! started inside it can be cut off from the host with packets silently dropped.
//!
//! The namespace gets a private /30: the host side of the veth holds the first address, the
//! namespace side the second. Traffic only ever flows between the host and this namespace,
//! on the veth: nothing is routed anywhere else. [`Netns::drop_packets`] adds a blackhole
//! route inside the namespace for the host's address, so everything the namespace sends to
//! the host vanishes (no reset, no ICMP error: the host sees silence, as behind a dead
//! switch); [`Netns::restore`] removes it.
//!
//! Only `iproute2` (`ip`) is needed, and root. Everything is removed on drop — processes
//! left inside, the namespace, the host side of the veth — also when the test fails; a
//! namespace left by a test process that died (SIGKILL) is removed by the next one.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, bail, ensure};

/// The `ip` executable (iproute2).
pub const IP: &str = "ip";

/// Prefix of every namespace made here: `fnst-<pid>-<n>`.
const PREFIX: &str = "fnst-";

/// Candidate /30s for the veth: `10.231.x.y/30`. Picked per process and namespace, skipping
/// any already on this host.
const SUBNET_BASE: [u8; 2] = [10, 231];

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A namespace with a veth to the host. Removed on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    host_veth: String,
    host_addr: Ipv4Addr,
    ns_addr: Ipv4Addr,
    dropping: bool,
}

/// Runs `ip args...`; the error names the command and carries its stderr.
fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(IP)
        .args(args)
        .output()
        .with_context(|| format!("running `{IP} {}`", args.join(" ")))?;
    ensure!(
        out.status.success(),
        "`{IP} {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Checks that network namespaces can be made here, with an actionable message if not.
///
/// # Errors
/// When `ip` is missing, not root, or the kernel refuses namespaces.
pub fn check_available() -> anyhow::Result<()> {
    match Command::new(IP).arg("-V").output() {
        Ok(out) if out.status.success() => {}
        _ => bail!(
            "the partition tests need `ip` from iproute2 (apt-get install iproute2; .ci/run \
             installs it)"
        ),
    }
    ensure!(
        nix::unistd::Uid::effective().is_root(),
        "the partition tests make network namespaces and veth pairs: run them as root"
    );
    ip(&["netns", "list"]).context(
        "network namespaces are not usable here (`ip netns list` failed); the partition tests \
         need a kernel with network namespaces and iproute2",
    )?;
    Ok(())
}

impl Netns {
    /// A new namespace with its veth up and addressed.
    ///
    /// # Errors
    /// When namespaces are not available ([`check_available`] says what to install) or a
    /// step fails; whatever was made is removed again.
    pub fn new() -> anyhow::Result<Netns> {
        check_available()?;
        remove_stale();
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Interface names are limited to 15 bytes: "fnh" + pid (<= 7 digits) + "n" + n.
        let name = format!("{PREFIX}{pid}-{n}");
        let host_veth = format!("fnh{pid}n{n}");
        let ns_veth = format!("fnn{pid}n{n}");
        let (host_addr, ns_addr) = pick_subnet(pid, n)?;
        ip(&["netns", "add", &name])?;
        // From here on, drop cleans up.
        let netns = Netns {
            name,
            host_veth,
            host_addr,
            ns_addr,
            dropping: false,
        };
        let host_cidr = format!("{host_addr}/30");
        let ns_cidr = format!("{ns_addr}/30");
        ip(&[
            "link",
            "add",
            &netns.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            &ns_veth,
            "netns",
            &netns.name,
        ])?;
        ip(&["addr", "add", &host_cidr, "dev", &netns.host_veth])?;
        ip(&["link", "set", &netns.host_veth, "up"])?;
        netns.exec(&["ip", "addr", "add", &ns_cidr, "dev", &ns_veth])?;
        netns.exec(&["ip", "link", "set", &ns_veth, "up"])?;
        netns.exec(&["ip", "link", "set", "lo", "up"])?;
        // The route to the namespace must be ours (no other interface holds this subnet).
        let route = ip(&["-4", "route", "get", &ns_addr.to_string()])?;
        ensure!(
            route.contains(&format!("dev {}", netns.host_veth)),
            "the route to {ns_addr} does not use {}: {route}",
            netns.host_veth
        );
        Ok(netns)
    }

    /// The namespace's name, for `ip netns exec`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's address (the far end of the veth).
    pub fn address(&self) -> Ipv4Addr {
        self.ns_addr
    }

    /// Runs `ip netns exec <ns> args...`.
    ///
    /// # Errors
    /// When the command fails.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Silently drops everything the namespace sends to the host from now on.
    ///
    /// # Errors
    /// When the route cannot be added.
    pub fn drop_packets(&mut self) -> anyhow::Result<()> {
        if !self.dropping {
            self.exec(&[
                "ip",
                "route",
                "add",
                "blackhole",
                &format!("{}/32", self.host_addr),
            ])?;
            self.dropping = true;
        }
        Ok(())
    }

    /// Lets the namespace's packets through again.
    ///
    /// # Errors
    /// When the route cannot be removed.
    pub fn restore(&mut self) -> anyhow::Result<()> {
        if self.dropping {
            self.exec(&[
                "ip",
                "route",
                "del",
                "blackhole",
                &format!("{}/32", self.host_addr),
            ])?;
            self.dropping = false;
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove(&self.name, &self.host_veth);
    }
}

/// Kills what still runs in namespace `name`, deletes it and the host veth. Best effort:
/// every step is tried, failures are reported on stderr.
fn remove(name: &str, host_veth: &str) {
    if let Ok(pids) = ip(&["netns", "pids", name]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // Already gone is fine.
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .ok();
        }
    }
    if let Err(e) = ip(&["netns", "del", name]) {
        eprintln!("netns clean-up: {e:#}");
    }
    // Deleting the namespace destroys its veth end, which takes the host end with it, but
    // not always at once: delete it explicitly (gone already is fine).
    if ip(&["link", "show", host_veth]).is_ok()
        && let Err(e) = ip(&["link", "del", host_veth])
    {
        eprintln!("netns clean-up: {e:#}");
    }
}

/// Removes namespaces of this suite whose test process is gone.
fn remove_stale() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some((pid, n)) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once('-'))
        else {
            continue;
        };
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
        if !alive {
            eprintln!("netns: removing {name}, left by test process {pid}");
            remove(name, &format!("fnh{pid}n{n}"));
        }
    }
}

/// A /30 for namespace `n` of process `pid` that no interface on this host uses yet:
/// (host address, namespace address).
fn pick_subnet(pid: u32, n: u32) -> anyhow::Result<(Ipv4Addr, Ipv4Addr)> {
    let in_use = ip(&["-4", "-o", "addr", "show"])?;
    // 16384 /30s in 10.231.0.0/16; start somewhere depending on pid and n, walk on.
    let start = (pid.wrapping_mul(31).wrapping_add(n.wrapping_mul(7))) % 16_384;
    for step in 0..64 {
        let index = (start + step) % 16_384;
        let base = index * 4;
        let third = u8::try_from(base / 256).context("subnet index")?;
        let fourth = u8::try_from(base % 256).context("subnet index")?;
        let network = format!("{}.{}.{third}.", SUBNET_BASE[0], SUBNET_BASE[1]);
        let taken = (0..4).any(|k| in_use.contains(&format!("inet {network}{}/", fourth + k)));
        if !taken {
            let host = Ipv4Addr::new(SUBNET_BASE[0], SUBNET_BASE[1], third, fourth + 1);
            let ns = Ipv4Addr::new(SUBNET_BASE[0], SUBNET_BASE[1], third, fourth + 2);
            return Ok((host, ns));
        }
    }
    bail!("no free /30 in 10.231.0.0/16 after 64 tries")
}
