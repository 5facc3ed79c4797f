//! How much memory this machine (or this runner's cgroup) can give functions, for the
//! default of `FN_MAX_MEMORY_MB`.

use std::path::Path;

use fn_protocol::call::MAX_MEMORY_MB;

/// The memory the runner hands out, in MB: `configured` (`FN_MAX_MEMORY_MB`), or else
/// what [`detect_total_mb`] finds, at most [`MAX_MEMORY_MB`].
///
/// # Errors
/// A message naming `FN_MAX_MEMORY_MB` when it is 0 or more than [`MAX_MEMORY_MB`], or
/// when it is not given and the machine's memory cannot be read.
pub fn total_mb(configured: Option<u64>) -> Result<u64, String> {
    match configured {
        Some(0) => Err("FN_MAX_MEMORY_MB: must be at least 1".to_owned()),
        Some(mb) if mb > MAX_MEMORY_MB => Err(format!(
            "FN_MAX_MEMORY_MB: {mb} is more than the most accepted, {MAX_MEMORY_MB} (2^40 MB); \
             give the memory functions may use on this machine, in MB"
        )),
        Some(mb) => Ok(mb),
        None => detect_total_mb()
            .map(|mb| mb.min(MAX_MEMORY_MB))
            .ok_or_else(|| "FN_MAX_MEMORY_MB: cannot detect the machine's memory; set it".into()),
    }
}

/// Memory available to the runner in MB: the smaller of the machine's total memory and the
/// memory limit of the runner's own cgroup (v2 `memory.max` or v1 `memory.limit_in_bytes`).
/// `None` when neither can be read.
pub fn detect_total_mb() -> Option<u64> {
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| meminfo_total_mb(&text));
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| cgroup_limit_mb(Path::new("/sys/fs/cgroup"), &text));
    match (machine, cgroup) {
        (Some(m), Some(c)) => Some(m.min(c)),
        (m, c) => m.or(c),
    }
}

/// `MemTotal` of a `/proc/meminfo` text, in MB.
pub fn meminfo_total_mb(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

/// The memory limit of the cgroup named in a `/proc/self/cgroup` text, under `root`: the
/// smallest limit of that cgroup and those above it (a systemd slice or a pod limits what
/// its units and containers get together).
///
/// cgroup v2 is mounted at `root` itself (`/sys/fs/cgroup`), or at `root/unified` on a
/// hybrid host; v1's memory controller at `root/memory`. Inside a container the mount's
/// root is the container's own cgroup, while `/proc/self/cgroup` may name the host's path
/// (without a cgroup namespace): where that path is not under the mount, the mount's root
/// is the cgroup.
pub fn cgroup_limit_mb(root: &Path, proc_self_cgroup: &str) -> Option<u64> {
    let mut smallest: Option<u64> = None;
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let path = path.trim_start_matches('/');
        let mounts: &[(&Path, &str)] = if controllers.is_empty() {
            &[(root, "memory.max"), (&root.join("unified"), "memory.max")]
        } else if controllers.split(',').any(|c| c == "memory") {
            &[(&root.join("memory"), "memory.limit_in_bytes")]
        } else {
            continue;
        };
        for (mount, file) in mounts {
            if let Some(mb) = limit_up_from(mount, path, file) {
                smallest = Some(smallest.map_or(mb, |s| s.min(mb)));
            }
        }
    }
    smallest
}

/// The smallest limit in `file` of cgroup `path` under `mount` and of each cgroup above it
/// up to the mount's root; the mount's root alone when `path` is not under it.
fn limit_up_from(mount: &Path, path: &str, file: &str) -> Option<u64> {
    let mut dir = mount.join(path);
    if !dir.is_dir() {
        dir = mount.to_path_buf();
    }
    let mut smallest: Option<u64> = None;
    loop {
        if let Some(mb) = read_limit_mb(&dir.join(file)) {
            smallest = Some(smallest.map_or(mb, |s| s.min(mb)));
        }
        if dir.as_path() == mount || !dir.pop() {
            return smallest;
        }
    }
}

/// A limit file's value in MB; `None` when it is missing or unlimited ("max" in v2, a
/// number near 2^63 in v1).
fn read_limit_mb(file: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let bytes = text.trim().parse::<u64>().ok()?;
    (bytes < (1 << 60)).then_some(bytes / (1024 * 1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_total_is_at_least_1_and_at_most_the_bound() {
        assert_eq!(total_mb(Some(4096)), Ok(4096));
        assert_eq!(total_mb(Some(MAX_MEMORY_MB)), Ok(MAX_MEMORY_MB));
        let zero = total_mb(Some(0)).expect_err("0 MB");
        assert!(zero.starts_with("FN_MAX_MEMORY_MB"), "{zero}");
        for huge in [MAX_MEMORY_MB + 1, u64::MAX] {
            let error = total_mb(Some(huge)).expect_err("more than the bound");
            assert!(
                error.starts_with("FN_MAX_MEMORY_MB") && error.contains("2^40"),
                "{error}"
            );
        }
    }

    #[test]
    fn reads_meminfo() {
        let text = "MemTotal:       24615096 kB\nMemFree:  1 kB\n";
        assert_eq!(meminfo_total_mb(text), Some(24038));
        assert_eq!(meminfo_total_mb("nothing"), None);
    }

    #[test]
    fn reads_v1_limit_and_ignores_unlimited() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("memory/pa/th");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("memory.limit_in_bytes"), "536870912\n").expect("write");
        let text = "4:memory:/pa/th\n0::/\n";
        assert_eq!(cgroup_limit_mb(root.path(), text), Some(512));
        std::fs::write(dir.join("memory.limit_in_bytes"), "9223372036854771712\n").expect("write");
        assert_eq!(cgroup_limit_mb(root.path(), text), None);
    }

    /// A host with cgroup v2 alone (current distributions, Docker and Kubernetes on v2):
    /// `memory.max` is under the mount's root itself, and a parent's limit counts.
    #[test]
    fn reads_a_v2_limit_and_the_limits_above_it() {
        let root = tempfile::tempdir().expect("tempdir");
        let unit = root.path().join("system.slice/r.service");
        std::fs::create_dir_all(&unit).expect("mkdir");
        std::fs::write(unit.join("memory.max"), "max\n").expect("write");
        let text = "0::/system.slice/r.service\n";
        assert_eq!(cgroup_limit_mb(root.path(), text), None, "unlimited");
        std::fs::write(root.path().join("system.slice/memory.max"), "1073741824\n").expect("write");
        assert_eq!(
            cgroup_limit_mb(root.path(), text),
            Some(1024),
            "the slice's"
        );
        std::fs::write(unit.join("memory.max"), "536870912\n").expect("write");
        assert_eq!(cgroup_limit_mb(root.path(), text), Some(512), "the smaller");
    }

    /// In a container with its own cgroup namespace the cgroup is `/` and its limit is at
    /// the mount's root; without one, `/proc/self/cgroup` names the host's path, which is
    /// not under the container's mount.
    #[test]
    fn reads_a_containers_limit_at_the_mounts_root() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::write(root.path().join("memory.max"), "268435456\n").expect("write");
        assert_eq!(cgroup_limit_mb(root.path(), "0::/\n"), Some(256));
        assert_eq!(
            cgroup_limit_mb(root.path(), "0::/system.slice/docker-abc.scope\n"),
            Some(256)
        );
    }

    /// A hybrid host mounts v2 at `unified`.
    #[test]
    fn reads_a_v2_limit_on_a_hybrid_host() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("unified/u");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("memory.max"), "134217728\n").expect("write");
        assert_eq!(cgroup_limit_mb(root.path(), "0::/u\n"), Some(128));
    }
}
