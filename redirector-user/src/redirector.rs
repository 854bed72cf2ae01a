//! [`Redirector`]: loading, attaching, pinning, upgrading and detaching the XDP program,
//! and the [`Dataplane`] over its kernel maps.
//!
//! Pinned state of an interface lives in `<pin-root>/<iface>/`: one pin per map (named as
//! in `redirector_ebpf::map_names`), the program (`p2pcdn_redirect`) and the XDP bpf_link
//! (`link`). The link pin keeps the program attached when no process runs, so userspace
//! restarts and upgrades never stop traffic; removing it (`detach`) is what detaches.

use std::{
    collections::HashMap as StdHashMap,
    fmt, fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

use aya::{
    Ebpf, EbpfLoader, TestRun as _, TestRunOptions, TestRunResult,
    maps::Map,
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use log::warn;
use redirector_ebpf::{Bucket, FlowKey, FlowValue, PROGRAM_NAME, PeerConf, ServiceConf, map_names};
use serde::Serialize;

use crate::{
    PROGRAM_OBJECT,
    dataplane::Dataplane,
    engine::{Backend as _, Engine, Host, NoHost},
    error::{Error, Result},
    kernel::{self, BUILT_META, KernelMaps, Pinned},
    netlink::{self, Netlink, XdpAttachment},
    privilege,
    spec::{ConfigSpec, PeerInfo, PeerSpec, ServiceInfo, ServiceSpec},
    stats::{DecapCounters, Stats},
    sys,
};

/// Default directory of the pinned state (`<pin-root>/<iface>/`).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/p2pcdn";
/// Name of the XDP link pin in an interface's pin directory.
pub const LINK_PIN: &str = "link";
/// Where an upgrade pins the new program before renaming it over the old pin. bpffs
/// refuses names with dots (`bpf_lookup` in kernel/bpf/inode.c: "reserved for future use").
const PROGRAM_PIN_TMP: &str = "p2pcdn_redirect_new";

/// Requested XDP attach mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Driver (native) mode, falling back to skb (generic) mode with a warning.
    #[default]
    Auto,
    /// Driver (native) mode only.
    Driver,
    /// Generic (skb) mode only.
    Skb,
}

impl FromStr for AttachMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "driver" | "native" => Ok(Self::Driver),
            "skb" | "generic" => Ok(Self::Skb),
            _ => Err(Error::invalid(
                "attach mode",
                s,
                "expected auto, driver or skb",
            )),
        }
    }
}

/// How the program runs on the interface, as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActiveMode {
    Driver,
    Skb,
    Hardware,
    Multiple,
}

impl fmt::Display for ActiveMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Driver => "driver",
            Self::Skb => "skb",
            Self::Hardware => "hardware",
            Self::Multiple => "multiple",
        })
    }
}

fn active_mode(a: XdpAttachment) -> Option<ActiveMode> {
    match a {
        XdpAttachment::None => None,
        XdpAttachment::Driver => Some(ActiveMode::Driver),
        XdpAttachment::Skb => Some(ActiveMode::Skb),
        XdpAttachment::Hardware => Some(ActiveMode::Hardware),
        XdpAttachment::Multiple => Some(ActiveMode::Multiple),
    }
}

/// Options of [`Redirector::attach`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachOptions {
    /// Pins go to `<pin_root>/<iface>/` (default [`DEFAULT_PIN_ROOT`]).
    pub pin_root: PathBuf,
    pub mode: AttachMode,
    /// Size of the flow table (default `DEFAULT_FLOW_CAPACITY`); only when maps are created.
    pub flow_capacity: Option<u32>,
    /// Size of the flood-guard table (default `DEFAULT_GUARD_CAPACITY`); only when maps
    /// are created.
    pub guard_capacity: Option<u32>,
    /// If already attached: replace the program atomically, keeping the maps.
    pub upgrade: bool,
    /// Enable IPv4/IPv6 forwarding on the interface (`bpf_fib_lookup` in XDP returns
    /// `BPF_FIB_LKUP_RET_FWD_DISABLED` without it). Default true.
    pub enable_forwarding: bool,
}

impl Default for AttachOptions {
    fn default() -> Self {
        Self {
            pin_root: PathBuf::from(DEFAULT_PIN_ROOT),
            mode: AttachMode::Auto,
            flow_capacity: None,
            guard_capacity: None,
            upgrade: false,
            enable_forwarding: true,
        }
    }
}

/// Options of [`Redirector::load_unattached`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    pub flow_capacity: Option<u32>,
    pub guard_capacity: Option<u32>,
}

/// What [`Redirector::attach`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachOutcome {
    /// Loaded and attached now.
    Attached,
    /// It was attached already; nothing changed.
    AlreadyAttached,
    /// The program in the pinned link was replaced; the maps were kept.
    Upgraded,
}

/// The report of an attach, for the operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AttachReport {
    pub outcome: AttachOutcome,
    pub mode: Option<ActiveMode>,
    /// Why driver mode failed, when `auto` fell back to skb mode.
    pub driver_error: Option<String>,
    /// Pinned maps (and their contents) were reused.
    pub reused_maps: bool,
    /// `--flow-capacity`/`--guard-capacity` were given but existing maps were reused.
    pub capacity_ignored: bool,
    /// Where bpffs was mounted, if it had to be.
    pub mounted_bpffs: Option<PathBuf>,
    /// Sysctls switched from 0 to 1.
    pub forwarding_enabled: Vec<String>,
    pub program_id: Option<u32>,
}

/// What [`Redirector::detach`] removed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DetachReport {
    pub link_removed: bool,
    pub program_removed: bool,
    pub maps_removed: usize,
    pub maps_kept: bool,
    /// The kernel still shows our program on the interface (some process holds the link).
    pub still_attached: bool,
}

/// State of an instance, for `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Status {
    pub iface: Option<String>,
    pub pin_dir: Option<PathBuf>,
    pub attached: bool,
    pub mode: Option<ActiveMode>,
    pub program_id: Option<u32>,
    pub link_id: Option<u32>,
    pub schema_version: u32,
    pub services: usize,
    pub peers: usize,
    pub decap_allowed: usize,
    pub flows: usize,
    pub flow_capacity: u32,
    pub guard_capacity: u32,
}

/// Checks an interface name before it becomes a path component (`IFNAMSIZ` is 16).
pub fn validate_iface(iface: &str) -> Result<()> {
    let reason = if iface.is_empty() {
        "empty"
    } else if iface.len() > 15 {
        "longer than 15 bytes"
    } else if iface == "." || iface == ".." || iface.contains(['/', ':', '\0']) {
        "not a valid interface name"
    } else if iface.chars().any(char::is_whitespace) {
        "contains white space"
    } else {
        return Ok(());
    };
    Err(Error::invalid("interface name", iface, reason))
}

/// The pin directory of `iface` under `pin_root`. bpffs refuses dots in names, which
/// interface names may have (`eth0.100`): they become `:`, which interface names cannot
/// have (`dev_valid_name` in net/core/dev.c), so the mapping is one to one.
pub fn pin_dir(pin_root: &Path, iface: &str) -> PathBuf {
    pin_root.join(iface.replace('.', ":"))
}

/// The index of `iface` in the caller's network namespace (asked over rtnetlink, so it
/// works under `nsenter --net`, where `/sys/class/net` still shows the host's devices).
pub fn ifindex(iface: &str) -> Result<u32> {
    validate_iface(iface)?;
    let mut nl = Netlink::new()?;
    match nl.link_index(iface) {
        Ok(Some(index)) => Ok(index),
        Ok(None) => Err(Error::UnknownInterface {
            iface: iface.to_owned(),
        }),
        Err(Error::Netlink { source, .. }) if source.raw_os_error() == Some(libc::ENODEV) => {
            Err(Error::UnknownInterface {
                iface: iface.to_owned(),
            })
        }
        Err(e) => Err(e),
    }
}

/// The conventional bpffs mount point.
const BPFFS: &str = "/sys/fs/bpf";

/// Makes sure `pin_root` is a directory on bpffs, mounting bpffs if needed: at
/// `/sys/fs/bpf` when the pin root lies under it (the conventional mount point), otherwise
/// at the pin root itself (never over an arbitrary existing directory). Returns where it
/// mounted, if it did.
pub fn ensure_bpffs(pin_root: &Path) -> Result<Option<PathBuf>> {
    let on_bpffs = |p: &Path| {
        sys::fs_magic(p)
            .map(|m| m == sys::BPF_FS_MAGIC)
            .map_err(|e| Error::io("statfs", p, e))
    };
    // The nearest existing ancestor tells which filesystem new directories land on.
    let existing = pin_root
        .ancestors()
        .find(|p| p.is_dir())
        .unwrap_or(Path::new("/"));
    if on_bpffs(existing)? {
        fs::create_dir_all(pin_root).map_err(|e| Error::io("create", pin_root, e))?;
        return Ok(None);
    }
    let conventional = Path::new(BPFFS);
    let target = if pin_root.starts_with(conventional) && conventional.is_dir() {
        conventional.to_path_buf()
    } else {
        fs::create_dir_all(pin_root).map_err(|e| Error::io("create", pin_root, e))?;
        pin_root.to_path_buf()
    };
    sys::mount_bpffs(&target).map_err(|e| Error::io("mount bpffs on", &target, e))?;
    fs::create_dir_all(pin_root).map_err(|e| Error::io("create", pin_root, e))?;
    Ok(Some(target))
}

/// Turns on forwarding for `iface` (IPv4 always, IPv6 when the interface has IPv6);
/// returns the sysctls that changed. `/proc/sys/net` shows the caller's network namespace.
fn enable_forwarding(iface: &str) -> Result<Vec<String>> {
    let mut changed = Vec::new();
    for family in ["ipv4", "ipv6"] {
        let path = PathBuf::from(format!("/proc/sys/net/{family}/conf/{iface}/forwarding"));
        let Ok(current) = fs::read_to_string(&path) else {
            continue; // no IPv6 on this interface (or disabled)
        };
        if current.trim() == "1" {
            continue;
        }
        fs::write(&path, "1").map_err(|e| Error::io("write", &path, e))?;
        changed.push(format!("net.{family}.conf.{iface}.forwarding=1"));
    }
    Ok(changed)
}

/// Rtnetlink-backed host services for an attached interface.
struct NetlinkHost {
    iface: String,
}

impl Host for NetlinkHost {
    fn iface(&self) -> Option<&str> {
        Some(&self.iface)
    }

    fn default_source(&self, v4: bool) -> Result<IpAddr> {
        let index = ifindex(&self.iface)?;
        let addrs = Netlink::new()?.addresses(index)?;
        netlink::pick_source(&addrs, v4).ok_or_else(|| Error::NoSourceAddress {
            iface: self.iface.clone(),
            family: if v4 { 4 } else { 6 },
        })
    }

    fn prepare_peer(&self, peer: IpAddr) -> Result<()> {
        let fail = |reason: String| Error::Neighbour { peer, reason };
        let mut nl = Netlink::new()?;
        let route = nl.route_to(peer).map_err(|e| fail(e.to_string()))?;
        if route.local {
            return Ok(());
        }
        nl.replace_managed_neighbour(route.oif, route.next_hop)
            .map_err(|e| fail(format!("next hop {}: {e}", route.next_hop)))
    }
}

fn load_object(pin_dir: Option<&Path>, flows: Option<u32>, guard: Option<u32>) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    if let Some(dir) = pin_dir {
        for name in map_names::ALL {
            // Reuses the pin at this path if there is one, else creates the map and pins it
            // (aya-0.14.0 MapData::create_pinned_by_name). Reuse does not look at the
            // pinned map: kernel::check_pinned ran before.
            loader.map_pin_path(name, dir.join(name));
        }
    }
    if let Some(n) = flows {
        loader.map_max_entries(map_names::FLOWS, n);
    }
    if let Some(n) = guard {
        loader.map_max_entries(map_names::GUARD, n);
    }
    let ebpf = loader
        .load(PROGRAM_OBJECT)
        .map_err(|e| Error::bpf("load the XDP object", e))?;
    for name in map_names::ALL {
        if ebpf.map(name).is_none() {
            return Err(Error::MissingObject {
                kind: "map",
                name: name.to_owned(),
            });
        }
    }
    Ok(ebpf)
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    let program = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or_else(|| Error::MissingObject {
            kind: "program",
            name: PROGRAM_NAME.to_owned(),
        })?;
    program
        .try_into()
        .map_err(|e| Error::bpf(format!("{PROGRAM_NAME} is not an XDP program"), e))
}

fn take_maps(ebpf: &mut Ebpf) -> StdHashMap<String, Map> {
    map_names::ALL
        .iter()
        .filter_map(|&name| ebpf.take_map(name).map(|m| (name.to_owned(), m)))
        .collect()
}

fn validate_capacity(what: &'static str, value: Option<u32>) -> Result<()> {
    match value {
        Some(n) if !(1024..=1 << 26).contains(&n) => {
            Err(Error::invalid(what, n, "must be between 1024 and 67108864"))
        }
        _ => Ok(()),
    }
}

fn attach_error(iface: &str, mode: XdpMode, e: aya::programs::ProgramError) -> Error {
    let errno = crate::error::errno_in(&e);
    if matches!(errno, Some(libc::EBUSY) | Some(libc::EEXIST)) {
        return Error::ForeignProgram {
            iface: iface.to_owned(),
            detail: "detach it first, e.g. `ip link set dev IFACE xdp off`".into(),
        };
    }
    Error::bpf(format!("attach to {iface} in {mode:?} mode"), e)
}

/// Removes the pins of maps this process created, after a failed attach.
fn remove_map_pins(dir: &Path) {
    for name in map_names::ALL {
        let _ignored = fs::remove_file(dir.join(name));
    }
    let _ignored = fs::remove_dir(dir);
}

/// The XDP program and its maps: attached to an interface (pinned), opened from pins, or
/// loaded unattached for `BPF_PROG_TEST_RUN`.
pub struct Redirector {
    engine: Engine<KernelMaps>,
    /// The loaded object (unattached loads only: it owns the program for test runs).
    ebpf: Option<Ebpf>,
    pin_dir: Option<PathBuf>,
    report: Option<AttachReport>,
}

impl Redirector {
    /// Loads the program and attaches it to `iface`, pinning program, link and maps under
    /// `<pin_root>/<iface>/`. If it is attached already this only opens it (and reports
    /// [`AttachOutcome::AlreadyAttached`]), unless `options.upgrade`, which replaces the
    /// program in the pinned link atomically and keeps the maps and their contents.
    pub fn attach(iface: &str, options: &AttachOptions) -> Result<Self> {
        validate_iface(iface)?;
        validate_capacity("flow capacity", options.flow_capacity)?;
        validate_capacity("guard capacity", options.guard_capacity)?;
        privilege::require()?;
        let index = ifindex(iface)?;
        let mounted_bpffs = ensure_bpffs(&options.pin_root)?;
        let dir = pin_dir(&options.pin_root, iface);
        fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
        let link_path = dir.join(LINK_PIN);

        if link_path.exists() {
            let link_prog = PinnedLink::from_pin(&link_path)
                .ok()
                .map(FdLink::from)
                .and_then(|l| l.info().ok())
                .map(|i| i.program_id());
            let xdp = Netlink::new()?.xdp_state(index)?;
            if link_prog.is_some() && xdp.prog_id == link_prog {
                let mut report = AttachReport {
                    outcome: AttachOutcome::AlreadyAttached,
                    mode: active_mode(xdp.attached),
                    driver_error: None,
                    reused_maps: true,
                    capacity_ignored: options.flow_capacity.is_some()
                        || options.guard_capacity.is_some(),
                    mounted_bpffs,
                    forwarding_enabled: Vec::new(),
                    program_id: xdp.prog_id,
                };
                if options.enable_forwarding {
                    report.forwarding_enabled = enable_forwarding(iface)?;
                }
                if options.upgrade {
                    return Self::upgrade(iface, &dir, report);
                }
                let mut me = Self::open_dir(iface, &dir)?;
                me.report = Some(report);
                return Ok(me);
            }
            // The link no longer holds the interface (it was deleted and re-created, or
            // the program was removed behind our back): start over, keeping the maps.
            warn!(
                "{}: stale link pin (the program is no longer attached); re-attaching",
                link_path.display()
            );
            fs::remove_file(&link_path).map_err(|e| Error::io("remove", &link_path, e))?;
        }

        let reused = kernel::check_pinned(&dir)? == Pinned::Compatible;
        let result = Self::attach_fresh(iface, index, &dir, options, reused, mounted_bpffs);
        if result.is_err() && !reused {
            remove_map_pins(&dir);
        }
        result
    }

    fn attach_fresh(
        iface: &str,
        index: u32,
        dir: &Path,
        options: &AttachOptions,
        reused: bool,
        mounted_bpffs: Option<PathBuf>,
    ) -> Result<Self> {
        let mut ebpf = load_object(Some(dir), options.flow_capacity, options.guard_capacity)?;
        let mut maps = KernelMaps::from_maps(take_maps(&mut ebpf))?;
        if !reused {
            maps.write_meta(&BUILT_META)?;
            maps.set_config(&ConfigSpec::default().to_config()?)?;
        }
        let program = xdp_program(&mut ebpf)?;
        program
            .load()
            .map_err(|e| Error::bpf("load the XDP program", e))?;
        let (link_id, mode, driver_error) = match options.mode {
            AttachMode::Driver | AttachMode::Skb => {
                let mode = if options.mode == AttachMode::Driver {
                    XdpMode::Driver
                } else {
                    XdpMode::Skb
                };
                let id = program
                    .attach_to_if_index(index, mode)
                    .map_err(|e| attach_error(iface, mode, e))?;
                (id, mode, None)
            }
            AttachMode::Auto => match program.attach_to_if_index(index, XdpMode::Driver) {
                Ok(id) => (id, XdpMode::Driver, None),
                Err(driver) => {
                    let reason = attach_error(iface, XdpMode::Driver, driver);
                    if matches!(reason, Error::ForeignProgram { .. }) {
                        return Err(reason);
                    }
                    let id = program
                        .attach_to_if_index(index, XdpMode::Skb)
                        .map_err(|e| attach_error(iface, XdpMode::Skb, e))?;
                    (id, XdpMode::Skb, Some(reason.to_string()))
                }
            },
        };
        let link = program
            .take_link(link_id)
            .map_err(|e| Error::bpf("take the XDP link", e))?;
        let link: FdLink = link.try_into().map_err(|e| {
            Error::bpf(
                "the kernel attached without a bpf_link (needs Linux ≥ 5.9)",
                e,
            )
        })?;
        let link_path = dir.join(LINK_PIN);
        let pinned = link
            .pin(&link_path)
            .map_err(|e| Error::bpf(format!("pin {}", link_path.display()), e))?;
        drop(pinned); // closes our fd; the pin keeps the link (and the program) attached
        let prog_path = dir.join(PROGRAM_NAME);
        let _ignored = fs::remove_file(&prog_path);
        program
            .pin(&prog_path)
            .map_err(|e| Error::bpf(format!("pin {}", prog_path.display()), e))?;
        let program_id = program.info().ok().map(|i| i.id());
        let forwarding_enabled = if options.enable_forwarding {
            enable_forwarding(iface)?
        } else {
            Vec::new()
        };
        let engine = Engine::new(
            maps,
            Box::new(NetlinkHost {
                iface: iface.to_owned(),
            }),
        )?;
        Ok(Self {
            engine,
            ebpf: None,
            pin_dir: Some(dir.to_path_buf()),
            report: Some(AttachReport {
                outcome: AttachOutcome::Attached,
                mode: Some(if mode == XdpMode::Driver {
                    ActiveMode::Driver
                } else {
                    ActiveMode::Skb
                }),
                driver_error,
                reused_maps: reused,
                capacity_ignored: reused
                    && (options.flow_capacity.is_some() || options.guard_capacity.is_some()),
                mounted_bpffs,
                forwarding_enabled,
                program_id,
            }),
        })
    }

    /// Replaces the program in the pinned link (`BPF_LINK_UPDATE`: packets see either the
    /// old or the new program, never none) and re-pins the program; maps are reused.
    fn upgrade(iface: &str, dir: &Path, mut report: AttachReport) -> Result<Self> {
        if kernel::check_pinned(dir)? != Pinned::Compatible {
            return Err(Error::MapLayout {
                dir: dir.to_path_buf(),
                map: map_names::META.to_owned(),
                detail: "its pin is missing".into(),
            });
        }
        let mut ebpf = load_object(Some(dir), None, None)?;
        let maps = KernelMaps::from_maps(take_maps(&mut ebpf))?;
        let program = xdp_program(&mut ebpf)?;
        program
            .load()
            .map_err(|e| Error::bpf("load the XDP program", e))?;
        let link_path = dir.join(LINK_PIN);
        let pinned = PinnedLink::from_pin(&link_path)
            .map_err(|e| Error::bpf(format!("open {}", link_path.display()), e))?;
        let link = XdpLink::try_from(FdLink::from(pinned))
            .map_err(|e| Error::bpf(format!("{} is not an XDP link", link_path.display()), e))?;
        let link_id = program
            .attach_to_link(link)
            .map_err(|e| Error::bpf(format!("replace the program on {iface}"), e))?;
        let link = program
            .take_link(link_id)
            .map_err(|e| Error::bpf("take the XDP link", e))?;
        drop(link); // our fd only: the pin keeps the link
        let tmp = dir.join(PROGRAM_PIN_TMP);
        let _ignored = fs::remove_file(&tmp);
        program
            .pin(&tmp)
            .map_err(|e| Error::bpf(format!("pin {}", tmp.display()), e))?;
        let prog_path = dir.join(PROGRAM_NAME);
        fs::rename(&tmp, &prog_path).map_err(|e| Error::io("rename to", &prog_path, e))?;
        report.outcome = AttachOutcome::Upgraded;
        report.program_id = program.info().ok().map(|i| i.id());
        let engine = Engine::new(
            maps,
            Box::new(NetlinkHost {
                iface: iface.to_owned(),
            }),
        )?;
        Ok(Self {
            engine,
            ebpf: None,
            pin_dir: Some(dir.to_path_buf()),
            report: Some(report),
        })
    }

    /// Opens the pinned state of `iface` under `pin_root` (no attach, no detach: traffic
    /// is not touched). Checks `META` and every map's layout first.
    pub fn open(iface: &str, pin_root: &Path) -> Result<Self> {
        validate_iface(iface)?;
        let dir = pin_dir(pin_root, iface);
        if !dir.join(map_names::META).exists() {
            // Say "unknown interface" rather than "not attached" when that is the cause.
            ifindex(iface)?;
            return Err(Error::NotAttached {
                iface: iface.to_owned(),
                dir,
            });
        }
        Self::open_dir(iface, &dir)
    }

    fn open_dir(iface: &str, dir: &Path) -> Result<Self> {
        if kernel::check_pinned(dir)? == Pinned::Nothing {
            return Err(Error::NotAttached {
                iface: iface.to_owned(),
                dir: dir.to_path_buf(),
            });
        }
        let maps = KernelMaps::from_maps(kernel::open_pinned(dir)?)?;
        let engine = Engine::new(
            maps,
            Box::new(NetlinkHost {
                iface: iface.to_owned(),
            }),
        )?;
        Ok(Self {
            engine,
            ebpf: None,
            pin_dir: Some(dir.to_path_buf()),
            report: None,
        })
    }

    /// Detaches the program from `iface` by removing its link pin, and removes the program
    /// pin and (unless `keep_maps`) the map pins and the directory. Works when the
    /// interface no longer exists. Needs no `Redirector`: nothing here relies on `Drop`.
    pub fn detach(iface: &str, pin_root: &Path, keep_maps: bool) -> Result<DetachReport> {
        validate_iface(iface)?;
        let dir = pin_dir(pin_root, iface);
        if !dir.is_dir() {
            ifindex(iface)?;
            return Err(Error::NotAttached {
                iface: iface.to_owned(),
                dir,
            });
        }
        let link_path = dir.join(LINK_PIN);
        let link_prog = PinnedLink::from_pin(&link_path)
            .ok()
            .map(FdLink::from)
            .and_then(|l| l.info().ok())
            .map(|i| i.program_id());
        let remove = |path: &Path| -> Result<bool> {
            match fs::remove_file(path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(Error::io("remove", path, e)),
            }
        };
        let link_removed = remove(&link_path)?;
        let program_removed = remove(&dir.join(PROGRAM_NAME))?;
        remove(&dir.join(PROGRAM_PIN_TMP))?;
        let mut maps_removed = 0;
        if !keep_maps {
            for name in map_names::ALL {
                if remove(&dir.join(name))? {
                    maps_removed += 1;
                }
            }
            if let Err(e) = fs::remove_dir(&dir) {
                warn!("{}: not removed ({e})", dir.display());
            }
        }
        if !link_removed && !program_removed && maps_removed == 0 {
            return Err(Error::NotAttached {
                iface: iface.to_owned(),
                dir,
            });
        }
        // The kernel releases a link whose last pin is removed asynchronously (the pin's inode
        // and the link are freed from deferred work), so the program may still show on the
        // interface for a moment: wait for it, bounded.
        let still_attached = match (link_prog, ifindex(iface)) {
            (Some(prog), Ok(index)) => {
                let mut netlink = Netlink::new()?;
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
                loop {
                    let attached = netlink.xdp_state(index)?.prog_id == Some(prog);
                    if !attached || std::time::Instant::now() >= deadline {
                        break attached;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            _ => false,
        };
        Ok(DetachReport {
            link_removed,
            program_removed,
            maps_removed,
            maps_kept: keep_maps,
            still_attached,
        })
    }

    /// Loads the program and fresh maps with no pinning and no attach, for
    /// `BPF_PROG_TEST_RUN` tests and benchmarks ([`Self::test_run`]). Everything is
    /// released when the value is dropped. Peers need an explicit `src` (no interface).
    pub fn load_unattached(options: &LoadOptions) -> Result<Self> {
        validate_capacity("flow capacity", options.flow_capacity)?;
        validate_capacity("guard capacity", options.guard_capacity)?;
        privilege::require()?;
        let mut ebpf = load_object(None, options.flow_capacity, options.guard_capacity)?;
        let mut maps = KernelMaps::from_maps(take_maps(&mut ebpf))?;
        maps.write_meta(&BUILT_META)?;
        maps.set_config(&ConfigSpec::default().to_config()?)?;
        xdp_program(&mut ebpf)?
            .load()
            .map_err(|e| Error::bpf("load the XDP program", e))?;
        let engine = Engine::new(maps, Box::new(NoHost))?;
        Ok(Self {
            engine,
            ebpf: Some(ebpf),
            pin_dir: None,
            report: None,
        })
    }

    /// Runs the program once per `repeat` on `data_in` with `BPF_PROG_TEST_RUN`; the
    /// output packet is written to `data_out` (see `data_size_out`). Only for
    /// [`Self::load_unattached`] instances.
    pub fn test_run(
        &mut self,
        data_in: &[u8],
        data_out: &mut [u8],
        repeat: u32,
    ) -> Result<TestRunResult> {
        let program = self.program()?;
        program
            .test_run(TestRunOptions {
                data_in: Some(data_in),
                data_out: Some(data_out),
                repeat,
                ..TestRunOptions::default()
            })
            .map_err(|e| Error::bpf("BPF_PROG_TEST_RUN", e))
    }

    /// The loaded XDP program (unattached instances only).
    pub fn program(&mut self) -> Result<&mut Xdp> {
        let ebpf = self
            .ebpf
            .as_mut()
            .ok_or(Error::NoProgram { op: "test_run" })?;
        xdp_program(ebpf)
    }

    /// What `attach` did (`None` for opened or unattached instances).
    pub fn attach_report(&self) -> Option<&AttachReport> {
        self.report.as_ref()
    }

    /// The pin directory (`None` when unattached).
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// Attachment, schema and counts.
    pub fn status(&self) -> Result<Status> {
        let meta = self.engine.maps.read_meta()?;
        let iface = self.engine.iface().map(str::to_owned);
        let mut status = Status {
            iface: iface.clone(),
            pin_dir: self.pin_dir.clone(),
            attached: false,
            mode: None,
            program_id: None,
            link_id: None,
            schema_version: meta.schema_version,
            services: self.services()?.len(),
            peers: self.peers()?.len(),
            decap_allowed: self.decap_allowed()?.len(),
            flows: self.engine.maps.flow_count()?,
            flow_capacity: self.engine.maps.flow_capacity(),
            guard_capacity: self.engine.maps.guard_capacity(),
        };
        let (Some(dir), Some(iface)) = (&self.pin_dir, iface) else {
            return Ok(status);
        };
        if let Ok(info) = PinnedLink::from_pin(dir.join(LINK_PIN))
            .map(FdLink::from)
            .and_then(|l| l.info())
        {
            status.link_id = Some(info.id());
            status.program_id = Some(info.program_id());
            status.attached = true;
        }
        // The interface may live in another network namespace than the caller's.
        if let Ok(index) = ifindex(&iface) {
            let xdp = Netlink::new()?.xdp_state(index)?;
            status.attached = status.attached && xdp.prog_id == status.program_id;
            if status.attached {
                status.mode = active_mode(xdp.attached);
            }
        }
        Ok(status)
    }

    /// The current Maglev ring of service `id` (peer slots, `PEER_NONE` for none).
    pub fn ring(&mut self, id: u32) -> Result<Vec<u32>> {
        self.engine.ring(id)
    }

    /// `PORTS[port]`: how many service addresses use this port.
    pub fn port_refs(&self, port: u16) -> Result<u32> {
        self.engine.maps.port(port)
    }

    /// `BUCKETS[index]` (services first, then peers: `redirector_ebpf::peer_bucket`).
    pub fn bucket(&self, index: u32) -> Result<Bucket> {
        self.engine.maps.bucket(index)
    }

    /// Resets `BUCKETS[index]` to `bucket` (tests and benchmarks refill buckets with it).
    pub fn set_bucket(&mut self, index: u32, bucket: Bucket) -> Result<()> {
        self.engine.maps.set_bucket(index, &bucket)
    }

    /// `SVC_CONF[id]` as stored.
    pub fn service_conf(&self, id: u32) -> Result<ServiceConf> {
        self.engine.maps.svc_conf(id)
    }

    /// `PEERS[slot]` as stored.
    pub fn peer_conf(&self, slot: u32) -> Result<PeerConf> {
        self.engine.maps.peer(slot)
    }

    /// The flow table (a bounded walk of the LRU map).
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>> {
        self.engine.maps.flows()
    }

    /// Deletes every flow-table entry.
    pub fn clear_flows(&mut self) -> Result<usize> {
        let keys: Vec<FlowKey> = self.flows()?.into_iter().map(|(k, _)| k).collect();
        for key in &keys {
            self.engine.maps.remove_flow(key)?;
        }
        Ok(keys.len())
    }
}

impl Dataplane for Redirector {
    fn config(&self) -> Result<ConfigSpec> {
        self.engine.config()
    }
    fn set_config(&mut self, config: &ConfigSpec) -> Result<()> {
        self.engine.set_config(config)
    }
    fn upsert_service(&mut self, spec: &ServiceSpec) -> Result<u32> {
        self.engine.upsert_service(spec)
    }
    fn remove_service(&mut self, name: &str) -> Result<()> {
        self.engine.remove_service(name)
    }
    fn services(&self) -> Result<Vec<ServiceInfo>> {
        self.engine.services()
    }
    fn set_peer(&mut self, spec: &PeerSpec) -> Result<u32> {
        self.engine.set_peer(spec)
    }
    fn remove_peer(&mut self, name: &str) -> Result<()> {
        self.engine.remove_peer(name)
    }
    fn peers(&self) -> Result<Vec<PeerInfo>> {
        self.engine.peers()
    }
    fn allow_decap(&mut self, addr: IpAddr) -> Result<bool> {
        self.engine.allow_decap(addr)
    }
    fn deny_decap(&mut self, addr: IpAddr) -> Result<bool> {
        self.engine.deny_decap(addr)
    }
    fn decap_allowed(&self) -> Result<Vec<IpAddr>> {
        self.engine.decap_allowed()
    }
    fn decap_stats(&self) -> Result<Vec<DecapCounters>> {
        self.engine.decap_stats()
    }
    fn stats(&self) -> Result<Stats> {
        self.engine.stats()
    }
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic with a message on failure"
)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_safe_path_components() {
        for good in ["eth0", "veth-edge", "enp5s0f1.100"] {
            validate_iface(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../etc",
            "sixteen-bytes-xx",
            "a b",
            "a:1",
        ] {
            let err = validate_iface(bad).expect_err(bad);
            assert!(err.is_bad_input(), "{bad}: {err}");
        }
    }

    #[test]
    fn pin_dirs_have_no_dots() {
        let root = Path::new("/sys/fs/bpf/p2pcdn");
        assert_eq!(pin_dir(root, "eth0"), root.join("eth0"));
        assert_eq!(pin_dir(root, "eth0.100"), root.join("eth0:100"));
    }

    #[test]
    fn attach_modes_parse() {
        assert_eq!("auto".parse::<AttachMode>().unwrap(), AttachMode::Auto);
        assert_eq!("driver".parse::<AttachMode>().unwrap(), AttachMode::Driver);
        assert_eq!("skb".parse::<AttachMode>().unwrap(), AttachMode::Skb);
        assert!("hw".parse::<AttachMode>().is_err());
    }

    #[test]
    fn capacities_are_bounded() {
        assert!(validate_capacity("flow capacity", None).is_ok());
        assert!(validate_capacity("flow capacity", Some(262_144)).is_ok());
        assert!(validate_capacity("flow capacity", Some(10)).is_err());
        assert!(validate_capacity("flow capacity", Some(u32::MAX)).is_err());
    }
}
