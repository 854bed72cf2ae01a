//! What the running kernel and process offer: kernel version, BTF, capabilities. These cannot be
//! installed, only reported, so `setup` says clearly what is missing and why it matters.

use std::{fs, path::Path};

/// The oldest kernel the data plane supports (BPF features it relies on landed by 5.15).
pub const MIN_KERNEL: (u32, u32) = (5, 15);

/// Where the kernel exposes its own BTF (CONFIG_DEBUG_INFO_BTF=y); aya relocates against it.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

// Capability numbers from include/uapi/linux/capability.h.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The one line every privileged workflow prints when it cannot run.
pub const PRIVILEGE_HINT: &str = "needs CAP_BPF and CAP_NET_ADMIN (run as root)";

/// Whether this process may load BPF programs and configure networking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Privileges {
    pub root: bool,
    /// Capability names this process lacks, empty when it has what the data plane needs.
    pub missing: Vec<&'static str>,
}

impl Privileges {
    pub fn read() -> Self {
        let root = nix::unistd::geteuid().is_root();
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        let missing = match effective_caps(&status) {
            Some(caps) => missing_caps(caps),
            // Without /proc we cannot tell; root is the best remaining signal.
            None if root => Vec::new(),
            None => vec!["CAP_BPF", "CAP_NET_ADMIN"],
        };
        Self { root, missing }
    }

    pub fn sufficient(&self) -> bool {
        self.missing.is_empty()
    }

    pub fn describe(&self) -> String {
        match (self.sufficient(), self.root) {
            (true, true) => "ok (root)".to_owned(),
            (true, false) => "ok (CAP_BPF and CAP_NET_ADMIN)".to_owned(),
            (false, _) => format!(
                "missing {}: privileged tests, the demo and the benchmarks {PRIVILEGE_HINT}",
                self.missing.join(" and ")
            ),
        }
    }
}

/// The `CapEff:` mask of a `/proc/<pid>/status` text.
pub fn effective_caps(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// Capabilities missing from `caps` for loading and attaching XDP programs. CAP_SYS_ADMIN
/// stands in for CAP_BPF as the kernel allows (kernel/bpf/syscall.c, `bpf_capable()`).
pub fn missing_caps(caps: u64) -> Vec<&'static str> {
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

/// `(major, minor)` of a kernel release string such as `6.18.0-1-amd64`.
pub fn parse_kernel_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// One reported host property: whether it is fine and what to tell the user.
#[derive(Debug, Clone)]
pub struct HostCheck {
    pub label: &'static str,
    pub ok: bool,
    pub detail: String,
}

pub fn kernel_check() -> HostCheck {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    let (min_major, min_minor) = MIN_KERNEL;
    match parse_kernel_release(release) {
        Some(version) if version >= MIN_KERNEL => HostCheck {
            label: "kernel version",
            ok: true,
            detail: format!("ok ({release})"),
        },
        Some(_) => HostCheck {
            label: "kernel version",
            ok: false,
            detail: format!(
                "kernel {release} is older than {min_major}.{min_minor}: the XDP program will not load"
            ),
        },
        None => HostCheck {
            label: "kernel version",
            ok: false,
            detail: format!("cannot read the kernel release ({release:?})"),
        },
    }
}

pub fn btf_check() -> HostCheck {
    let ok = Path::new(VMLINUX_BTF).exists();
    HostCheck {
        label: "kernel BTF",
        ok,
        detail: if ok {
            format!("ok ({VMLINUX_BTF})")
        } else {
            format!(
                "missing {VMLINUX_BTF}: this kernel was built without CONFIG_DEBUG_INFO_BTF, \
                 the XDP program cannot be loaded on it"
            )
        },
    }
}

pub fn privilege_check() -> HostCheck {
    let privileges = Privileges::read();
    HostCheck {
        label: "privileges",
        ok: privileges.sufficient(),
        detail: privileges.describe(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_has_everything() {
        // Full capability set of root on a 6.x kernel.
        assert_eq!(missing_caps(0x0000_01ff_ffff_ffff), Vec::<&str>::new());
    }

    #[test]
    fn unprivileged_user_lacks_both() {
        assert_eq!(missing_caps(0), vec!["CAP_BPF", "CAP_NET_ADMIN"]);
    }

    #[test]
    fn sys_admin_stands_in_for_bpf() {
        let caps = (1 << CAP_SYS_ADMIN) | (1 << CAP_NET_ADMIN);
        assert!(missing_caps(caps).is_empty());
        assert_eq!(missing_caps(1 << CAP_BPF), vec!["CAP_NET_ADMIN"]);
    }

    #[test]
    fn cap_eff_is_read_from_status() {
        let status = "Name:\tcat\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                      CapEff:\t0000008000001000\nCapBnd:\t000001ffffffffff\n";
        let caps = effective_caps(status);
        assert_eq!(caps, Some((1 << CAP_BPF) | (1 << CAP_NET_ADMIN)));
        assert_eq!(effective_caps("Name:\tcat\n"), None);
    }

    #[test]
    fn kernel_releases_parse() {
        assert_eq!(parse_kernel_release("6.18.0-1-amd64\n"), Some((6, 18)));
        assert_eq!(parse_kernel_release("5.15.0"), Some((5, 15)));
        assert_eq!(parse_kernel_release("5.4"), Some((5, 4)));
        assert!(parse_kernel_release("5.4").unwrap_or_default() < MIN_KERNEL);
        assert_eq!(parse_kernel_release("garbage"), None);
    }
}
