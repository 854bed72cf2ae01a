//! Privileged tests must not pass silently without privileges in CI.

/// Linux capability numbers (`include/uapi/linux/capability.h`).
pub mod cap {
    pub const NET_ADMIN: u32 = 12;
    pub const SYS_ADMIN: u32 = 21;
    pub const BPF: u32 = 39;
}

/// True if the effective capability set holds every capability of `caps` (read from
/// `/proc/self/status`, field `CapEff`).
pub fn has_capabilities(caps: &[u32]) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let Some(effective) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
    else {
        return false;
    };
    caps.iter().all(|&c| c < 64 && effective & (1 << c) != 0)
}

fn euid_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a privileged test may run: true as root or with CAP_BPF and CAP_NET_ADMIN.
/// Otherwise, with `CI=true` in the environment it panics (a privileged test must not skip
/// in CI); elsewhere it prints `skipping <test_name>: needs root` and returns false.
pub fn require_root(test_name: &str) -> bool {
    require(
        test_name,
        &[cap::BPF, cap::NET_ADMIN],
        "CAP_BPF and CAP_NET_ADMIN",
    )
}

/// True as root, or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (what a testbed with
/// XDP needs), for programs that report missing privileges themselves.
pub fn has_netns_admin() -> bool {
    euid_is_root() || has_capabilities(&[cap::BPF, cap::NET_ADMIN, cap::SYS_ADMIN])
}

/// [`require_root`] for tests that also create network namespaces (CAP_SYS_ADMIN).
pub fn require_netns_admin(test_name: &str) -> bool {
    require(
        test_name,
        &[cap::BPF, cap::NET_ADMIN, cap::SYS_ADMIN],
        "CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN",
    )
}

fn require(test_name: &str, caps: &[u32], names: &str) -> bool {
    if euid_is_root() || has_capabilities(caps) {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{test_name} needs root (or {names}) and CI=true: privileged tests must run in \
             CI, not skip"
        );
    }
    eprintln!("skipping {test_name}: needs root (or {names})");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_capabilities_is_always_held() {
        assert!(has_capabilities(&[]));
    }

    #[test]
    fn capabilities_outside_the_set_are_never_held() {
        assert!(!has_capabilities(&[64]));
        assert!(!has_capabilities(&[cap::BPF, 200]));
    }

    #[test]
    fn root_may_run_privileged_tests() {
        if euid_is_root() {
            assert!(require_root("root_may_run_privileged_tests"));
            assert!(require_netns_admin("root_may_run_privileged_tests"));
        }
    }
}
