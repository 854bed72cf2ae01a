//! Early capability check, so a missing privilege is one clear line instead of an EPERM
//! from deep inside a bpf() call.

use crate::error::{Error, NEEDED_CAPABILITIES, Result};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Does an effective capability set (the `CapEff` mask) allow loading and attaching XDP
/// programs and using their maps? Needs CAP_NET_ADMIN and CAP_BPF (CAP_SYS_ADMIN also
/// grants what CAP_BPF does, and was the only way before Linux 5.8).
pub fn capabilities_suffice(cap_eff: u64) -> bool {
    let has = |cap: u32| cap_eff & (1u64 << cap) != 0;
    has(CAP_NET_ADMIN) && (has(CAP_BPF) || has(CAP_SYS_ADMIN))
}

/// The `CapEff` line of `/proc/self/status`.
fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

/// Fails with [`Error::MissingPrivilege`] unless this process may load and attach XDP
/// programs. When the capability set cannot be read, lets the kernel decide (its EPERM is
/// mapped to the same error).
pub fn require() -> Result<()> {
    match effective_capabilities() {
        Some(caps) if !capabilities_suffice(caps) => Err(Error::MissingPrivilege {
            capability: NEEDED_CAPABILITIES,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_net_admin_and_bpf_or_sys_admin() {
        let bit = |c: u32| 1u64 << c;
        assert!(capabilities_suffice(bit(CAP_NET_ADMIN) | bit(CAP_BPF)));
        assert!(capabilities_suffice(
            bit(CAP_NET_ADMIN) | bit(CAP_SYS_ADMIN)
        ));
        assert!(!capabilities_suffice(bit(CAP_BPF)));
        assert!(!capabilities_suffice(bit(CAP_NET_ADMIN)));
        assert!(!capabilities_suffice(0));
        assert!(
            capabilities_suffice(0x1ff_feff_ffff),
            "root minus CAP_SYS_RESOURCE"
        );
    }
}
