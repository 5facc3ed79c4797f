//! How much memory this machine (or this runner's cgroup) can give functions, for the
//! default of `FN_MAX_MEMORY_MB`.

use std::path::Path;

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

/// The memory limit of the cgroup named in a `/proc/self/cgroup` text, under `root`.
pub fn cgroup_limit_mb(root: &Path, proc_self_cgroup: &str) -> Option<u64> {
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        let file = if controllers.is_empty() {
            root.join("unified").join(path).join("memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            root.join("memory").join(path).join("memory.limit_in_bytes")
        } else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        // "max" (v2) or a huge number (v1) means unlimited.
        if let Ok(bytes) = text.trim().parse::<u64>()
            && bytes < (1 << 60)
        {
            return Some(bytes / (1024 * 1024));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
