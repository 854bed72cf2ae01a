//! Throwaway network-namespace testbeds: hosts on one L2 segment, torn down on drop.
//!
//! Layout: every host is a namespace with one veth (`eth0`) whose other end sits in a
//! "switch" namespace, enslaved to a bridge. Addresses come from `10.99.0.0/24` and
//! `fd00:99::/64` in the order hosts are declared (`.1`, `.2`, ...). The only routes are the
//! connected ones plus those a test adds ([`Testbed::route`]) — never a default route, so
//! nothing can leave the testbed.
//!
//! Names: `p2p-<pid>-<n>-<host>` for namespaces and `/sys/fs/bpf/p2p-<pid>-<n>/<host>` for
//! the pin root of each host, so parallel runs never clash and leftovers of a killed run
//! are recognised (by the dead pid) and swept by the next testbed, or by
//! `cargo xtask clean-netns`.
//!
//! Commands run through `ip -n` for iproute2 itself and through
//! `nsenter --net=/run/netns/NAME` for everything else: `ip netns exec` remounts `/sys`, which
//! hides the host bpffs where the pins live.
//!
//! Three testbed facts the data-plane tests rely on:
//! - Transmit checksum offload is turned off on every host's `eth0`. On a veth, a sent TCP
//!   segment otherwise carries only the pseudo-header sum (CHECKSUM_PARTIAL) to the receiver;
//!   once a driver-mode XDP program has tunnelled it with `XDP_TX`, the metadata saying
//!   "finish this checksum" is gone and the peer drops the segment (seen: every steered
//!   connection times out; skb mode is not affected). Real NICs never hand such packets to
//!   XDP.
//! - An XDP program that passes everything is attached (driver mode) to every switch-side
//!   veth end. A frame a host sends with `XDP_TX` lands in the ring of the other end, and
//!   veth wakes that end's NAPI after the batch only if it has an XDP program
//!   (`drivers/net/veth.c`, `veth_xdp_flush`). With GRO alone enabling NAPI there, tunnelled
//!   frames waited until some other packet came by (seen: the last SYNs of every burst and
//!   their retransmissions were lost). A real NIC's transmit ring has no such condition.
//! - Neighbour entries between all hosts are permanent, so the first steered SYN never meets
//!   an unresolved next hop (which the program would serve locally, counted `fib_no_neigh`).

use std::{
    fs,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread::JoinHandle,
};

/// Errors of testbed setup and namespace helpers.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("setns into {namespace}: {source}")]
    Setns {
        namespace: String,
        source: std::io::Error,
    },
    #[error("{what} on {iface} in {namespace}: {source}")]
    Device {
        what: &'static str,
        iface: String,
        namespace: String,
        source: std::io::Error,
    },
    #[error("writing {value} to {key} in {namespace}: {source}")]
    Sysctl {
        key: String,
        value: String,
        namespace: String,
        source: std::io::Error,
    },
    #[error("cannot read the MAC address of {iface} in {namespace}: {detail}")]
    Mac {
        iface: String,
        namespace: String,
        detail: String,
    },
    #[error("the thread in namespace {namespace} panicked")]
    ThreadPanicked { namespace: String },
    #[error("host name {0:?}: use 1 to 10 characters [a-z0-9]")]
    BadHostName(String),
    #[error("a testbed has at most 200 hosts, and needs at least one")]
    HostCount,
}

/// Prefix of every namespace and pin directory a testbed creates.
pub const PREFIX: &str = "p2p-";
/// Name of each host's interface.
pub const HOST_IFACE: &str = "eth0";
/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// The testbed's IPv4 subnet (a /24).
pub const SUBNET_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 0);
/// The testbed's IPv6 subnet (a /64).
pub const SUBNET_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0);

/// One host of a testbed.
#[derive(Clone, Debug)]
pub struct Host {
    /// Short name given to the builder (`client`, `edge`, ...).
    pub name: String,
    /// Namespace name (`p2p-<pid>-<n>-<name>`).
    pub ns: String,
    /// The host's interface to the segment (always [`HOST_IFACE`]).
    pub iface: String,
    pub mac: [u8; 6],
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    /// Pin root to pass to `p2pcdn-redirector --pin-root` for this host (each host has its
    /// own: all of them pin on the one host bpffs, and all name their interface `eth0`).
    pub pin_root: PathBuf,
}

impl Host {
    /// `/run/netns/<ns>`.
    pub fn ns_path(&self) -> PathBuf {
        netns_path(&self.ns)
    }

    /// `program` run inside this host's namespace (with `nsenter --net=...`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        ns_command(&self.ns, program)
    }

    /// Runs `program args` in this namespace and returns its output if it exits 0.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Output, NetnsError> {
        let mut cmd = self.command(program);
        cmd.args(args);
        run_checked(&mut cmd)
    }

    /// Runs `f` on a new thread inside this host's namespace and waits for it.
    pub fn in_ns<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        run_in_netns(&self.ns, f)
    }

    /// Reads a sysctl of this namespace (`net.ipv4.conf.eth0.forwarding`).
    pub fn sysctl(&self, key: &str) -> Result<String, NetnsError> {
        let path = sysctl_path(key);
        let ns = self.ns.clone();
        self.in_ns(move || fs::read_to_string(&path))?
            .map(|s| s.trim().to_owned())
            .map_err(|source| NetnsError::Open {
                path: PathBuf::from(format!("{} (in {ns})", sysctl_path(key).display())),
                source,
            })
    }
}

/// `/run/netns/<name>`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// `nsenter --net=/run/netns/<ns> -- <program>`.
pub fn ns_command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns_path(ns).display()))
        .arg("--")
        .arg(program);
    cmd
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd`, returning its output if it exited 0 and an error with its stderr otherwise.
pub fn run_checked(cmd: &mut Command) -> Result<Output, NetnsError> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn {
            command: describe(cmd),
            source,
        })?;
    if !output.status.success() {
        return Err(NetnsError::Failed {
            command: describe(cmd),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output)
}

fn ip(args: &[&str]) -> Result<Output, NetnsError> {
    run_checked(Command::new("ip").args(args))
}

/// Runs many `ip` commands in one process (`ip -n NS -batch -`).
fn ip_batch(ns: &str, lines: &[String]) -> Result<(), NetnsError> {
    if lines.is_empty() {
        return Ok(());
    }
    let command = format!("ip -n {ns} -batch - ({})", lines.join("; "));
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetnsError::Spawn {
            command: command.clone(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(lines.join("\n").as_bytes())
            .map_err(|source| NetnsError::Spawn {
                command: command.clone(),
                source,
            })?;
    }
    let output = child
        .wait_with_output()
        .map_err(|source| NetnsError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(NetnsError::Failed {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

/// Enters namespace `ns` on the current thread.
fn enter(ns: &str) -> Result<(), NetnsError> {
    let path = netns_path(ns);
    let file = fs::File::open(&path).map_err(|source| NetnsError::Open {
        path: path.clone(),
        source,
    })?;
    // SAFETY: `file` is an open namespace file descriptor for the duration of the call;
    // setns only changes the calling thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(NetnsError::Setns {
            namespace: ns.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Starts `f` on a new thread that first enters namespace `ns` (`setns(CLONE_NEWNET)` on
/// that thread only). Sockets it creates live in that namespace for their whole life.
pub fn spawn_in_netns<T, F>(ns: &str, f: F) -> JoinHandle<Result<T, NetnsError>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        enter(&ns)?;
        Ok(f())
    })
}

/// Runs `f` inside namespace `ns` on a dedicated thread and returns its result.
pub fn run_in_netns<T, F>(ns: &str, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    spawn_in_netns(ns, f)
        .join()
        .map_err(|_| NetnsError::ThreadPanicked {
            namespace: ns.to_owned(),
        })?
}

/// Writes sysctls from a thread inside `ns` (`/proc/sys/net` shows the namespace of the
/// task that opens it).
fn write_sysctls(ns: &str, pairs: &[(&str, &str)]) -> Result<(), NetnsError> {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let ns_name = ns.to_owned();
    run_in_netns(ns, move || {
        for (key, value) in pairs {
            fs::write(sysctl_path(&key), &value).map_err(|source| NetnsError::Sysctl {
                key: key.clone(),
                value: value.clone(),
                namespace: ns_name.clone(),
                source,
            })?;
        }
        Ok(())
    })?
}

// ethtool ioctl numbers (`include/uapi/linux/ethtool.h`, `include/uapi/linux/sockios.h`).
const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_STXCSUM: u32 = 0x17;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with the `ifr_data` member of its union (padded to the union's 24 bytes).
#[repr(C)]
struct IfreqData {
    name: [u8; libc::IFNAMSIZ],
    data: *mut EthtoolValue,
    _pad: [u8; 16],
}

/// Sets one legacy ethtool on/off feature (`ETHTOOL_S*`) of `iface` in the calling
/// thread's namespace.
fn ethtool_set(iface: &str, cmd: u32, on: bool) -> std::io::Result<()> {
    let mut value = EthtoolValue {
        cmd,
        data: u32::from(on),
    };
    let mut req = IfreqData {
        name: [0; libc::IFNAMSIZ],
        data: &mut value,
        _pad: [0; 16],
    };
    let bytes = iface.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: plain socket creation; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `req` is a valid ifreq whose data pointer refers to `value`, both alive for
    // the duration of the call; SIOCETHTOOL reads and writes only those.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req) };
    let result = if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    };
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    result
}

fn ethtool_in(
    ns: &str,
    iface: &str,
    what: &'static str,
    cmd: u32,
    on: bool,
) -> Result<(), NetnsError> {
    let iface_owned = iface.to_owned();
    run_in_netns(ns, move || ethtool_set(&iface_owned, cmd, on))?.map_err(|source| {
        NetnsError::Device {
            what,
            iface: iface.to_owned(),
            namespace: ns.to_owned(),
            source,
        }
    })
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` of the size we pass; the pointers
    // inside it refer to buffers that outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd =
        i32::try_from(rc).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn put(attr: &mut [u8], offset: usize, bytes: &[u8]) {
    attr[offset..offset + bytes.len()].copy_from_slice(bytes);
}

/// Loads `r0 = XDP_PASS; exit` and links it to `iface` (driver mode) in the calling
/// thread's namespace. The program lives as long as the returned link.
fn xdp_pass_link(iface: &str) -> std::io::Result<OwnedFd> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PROG_TYPE_XDP: u32 = 6;
    const BPF_XDP: u32 = 37;
    const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
    let insns: [u64; 2] = [
        0x0000_0002_0000_00b7, // BPF_ALU64 | BPF_MOV | BPF_K: r0 = 2 (XDP_PASS)
        0x0000_0000_0000_0095, // BPF_JMP | BPF_EXIT
    ];
    let license = c"GPL";
    let mut attr = [0u8; 128];
    put(&mut attr, 0, &BPF_PROG_TYPE_XDP.to_ne_bytes());
    put(&mut attr, 4, &2u32.to_ne_bytes());
    put(&mut attr, 8, &(insns.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 16, &(license.as_ptr() as u64).to_ne_bytes());
    put(&mut attr, 48, b"p2p_pass");
    put(&mut attr, 68, &BPF_XDP.to_ne_bytes()); // expected_attach_type
    let prog = bpf(BPF_PROG_LOAD, &mut attr)?;

    let name = std::ffi::CString::new(iface)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut attr = [0u8; 128];
    put(&mut attr, 0, &(prog.as_raw_fd() as u32).to_ne_bytes());
    put(&mut attr, 4, &ifindex.to_ne_bytes());
    put(&mut attr, 8, &BPF_XDP.to_ne_bytes());
    put(&mut attr, 12, &XDP_FLAGS_DRV_MODE.to_ne_bytes());
    bpf(BPF_LINK_CREATE, &mut attr)
}

fn attach_xdp_pass(ns: &str, iface: &str) -> Result<OwnedFd, NetnsError> {
    let iface_owned = iface.to_owned();
    run_in_netns(ns, move || xdp_pass_link(&iface_owned))?.map_err(|source| NetnsError::Device {
        what: "attaching the pass-through XDP program",
        iface: iface.to_owned(),
        namespace: ns.to_owned(),
        source,
    })
}

static TESTBED_SEQ: AtomicU32 = AtomicU32::new(0);

/// Declares the hosts of a testbed.
#[derive(Debug, Default)]
pub struct TestbedBuilder {
    hosts: Vec<(String, Vec<IpAddr>)>,
}

impl TestbedBuilder {
    /// Adds a host (1 to 10 characters `[a-z0-9]`: it names a veth in the switch namespace).
    pub fn host(mut self, name: &str) -> Self {
        self.hosts.push((name.to_owned(), Vec::new()));
        self
    }

    /// Adds a host with extra addresses on its loopback (service addresses of a DSR setup:
    /// the host accepts packets to them, and nobody else learns them through ARP/NDP).
    pub fn host_with_loopback(mut self, name: &str, addrs: &[IpAddr]) -> Self {
        self.hosts.push((name.to_owned(), addrs.to_vec()));
        self
    }

    /// Creates everything. On error, what was created is torn down.
    pub fn build(self) -> Result<Testbed, NetnsError> {
        if self.hosts.is_empty() || self.hosts.len() > 200 {
            return Err(NetnsError::HostCount);
        }
        for (name, _) in &self.hosts {
            let ok = !name.is_empty()
                && name.len() <= 10
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
            if !ok {
                return Err(NetnsError::BadHostName(name.clone()));
            }
        }
        sweep_stale();
        let id = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            TESTBED_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let pin_base = Path::new(BPFFS).join(&id);
        let hosts: Vec<Host> = self
            .hosts
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                let n = u8::try_from(i + 1).unwrap_or(u8::MAX);
                let o = SUBNET_V4.octets();
                Host {
                    name: name.clone(),
                    ns: format!("{id}-{name}"),
                    iface: HOST_IFACE.to_owned(),
                    mac: [0; 6],
                    v4: Ipv4Addr::new(o[0], o[1], o[2], n),
                    v6: Ipv6Addr::from(u128::from(SUBNET_V6) | u128::from(n)),
                    pin_root: pin_base.join(name),
                }
            })
            .collect();
        let mut testbed = Testbed {
            inner: Arc::new(Inner {
                namespaces: Mutex::new(Vec::new()),
                links: Mutex::new(Vec::new()),
                pin_base,
            }),
            switch_ns: format!("{id}-switch"),
            id,
            hosts,
        };
        let loopbacks: Vec<Vec<IpAddr>> = self.hosts.into_iter().map(|(_, a)| a).collect();
        // On error `testbed` is dropped here, which deletes what exists so far.
        testbed.create(&loopbacks)?;
        Ok(testbed)
    }
}

/// What teardown needs, shared with [`TeardownHandle`]s.
#[derive(Debug)]
struct Inner {
    /// Namespaces created so far (emptied by teardown).
    namespaces: Mutex<Vec<String>>,
    /// BPF links of the pass-through XDP programs on the switch-side veths.
    links: Mutex<Vec<OwnedFd>>,
    pin_base: PathBuf,
}

impl Inner {
    fn teardown(&self) {
        let namespaces = match self.namespaces.lock() {
            Ok(mut guard) => std::mem::take(&mut *guard),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for ns in namespaces.iter().rev() {
            // Deleting a namespace destroys its veths (and detaches their XDP programs once
            // the last socket inside is closed).
            if let Err(e) = ip(&["netns", "delete", ns]) {
                eprintln!("teardown: {e}");
            }
        }
        match self.links.lock() {
            Ok(mut guard) => guard.clear(),
            Err(poisoned) => poisoned.into_inner().clear(),
        }
        match fs::remove_dir_all(&self.pin_base) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("teardown: removing {}: {e}", self.pin_base.display()),
        }
    }
}

/// Tears a testbed down from elsewhere (a signal handler thread); idempotent.
#[derive(Clone, Debug)]
pub struct TeardownHandle(Arc<Inner>);

impl TeardownHandle {
    pub fn teardown(&self) {
        self.0.teardown();
    }
}

/// A running testbed. Dropping it (also while unwinding from a panic) deletes its
/// namespaces and its pin directory.
#[derive(Debug)]
pub struct Testbed {
    inner: Arc<Inner>,
    /// `p2p-<pid>-<n>`.
    pub id: String,
    pub switch_ns: String,
    pub hosts: Vec<Host>,
}

impl Testbed {
    pub fn builder() -> TestbedBuilder {
        TestbedBuilder::default()
    }

    /// The host named `name`.
    ///
    /// # Panics
    /// If there is no such host (a typo in the test).
    pub fn host(&self, name: &str) -> &Host {
        match self.hosts.iter().find(|h| h.name == name) {
            Some(h) => h,
            None => panic!("testbed {} has no host {name:?}", self.id),
        }
    }

    /// The base directory of every host's pin root.
    pub fn pin_base(&self) -> &Path {
        &self.inner.pin_base
    }

    /// A handle that tears the testbed down from another thread.
    pub fn teardown_handle(&self) -> TeardownHandle {
        TeardownHandle(Arc::clone(&self.inner))
    }

    /// Deletes every namespace and pin (also done on drop; idempotent).
    pub fn teardown(&self) {
        self.inner.teardown();
    }

    /// Routes `dst` (`addr/len`) from `host` via `via` (an address on the segment).
    pub fn route(&self, host: &str, dst: &str, via: IpAddr) -> Result<(), NetnsError> {
        let h = self.host(host);
        let family = if via.is_ipv6() { "-6" } else { "-4" };
        ip(&[
            "-n",
            &h.ns,
            family,
            "route",
            "replace",
            dst,
            "via",
            &via.to_string(),
            "dev",
            &h.iface,
        ])
        .map(|_| ())
    }

    /// Adds `addr` to `host`'s loopback (`/32` or `/128`).
    pub fn add_loopback(&self, host: &str, addr: IpAddr) -> Result<(), NetnsError> {
        let h = self.host(host);
        ip_batch(&h.ns, &[loopback_line(addr)])
    }

    /// Writes sysctls in `host`'s namespace.
    pub fn set_sysctls(&self, host: &str, pairs: &[(&str, &str)]) -> Result<(), NetnsError> {
        write_sysctls(&self.host(host).ns, pairs)
    }

    fn add_ns(&self, name: &str) -> Result<(), NetnsError> {
        ip(&["netns", "add", name])?;
        match self.inner.namespaces.lock() {
            Ok(mut guard) => guard.push(name.to_owned()),
            Err(poisoned) => poisoned.into_inner().push(name.to_owned()),
        }
        Ok(())
    }

    fn create(&mut self, loopbacks: &[Vec<IpAddr>]) -> Result<(), NetnsError> {
        let switch = self.switch_ns.clone();
        self.add_ns(&switch)?;
        // The switch forwards frames only: no IPv6 autoconfiguration noise from it.
        write_sysctls(
            &switch,
            &[
                ("net.ipv6.conf.all.disable_ipv6", "1"),
                ("net.ipv6.conf.default.disable_ipv6", "1"),
            ],
        )?;
        ip_batch(
            &switch,
            &[
                "link add br0 type bridge stp_state 0 forward_delay 0".to_owned(),
                "link set br0 up".to_owned(),
            ],
        )?;
        let hosts = self.hosts.clone();
        for (host, loopback) in hosts.iter().zip(loopbacks) {
            self.add_ns(&host.ns)?;
            // Loose reverse-path filtering: DSR replies and decapsulated packets come from
            // addresses the strict check could misjudge. No accept_local needed: no host
            // receives packets from its own addresses.
            write_sysctls(
                &host.ns,
                &[
                    ("net.ipv4.conf.all.rp_filter", "2"),
                    ("net.ipv4.conf.default.rp_filter", "2"),
                    ("net.ipv6.conf.all.accept_dad", "0"),
                    ("net.ipv6.conf.default.accept_dad", "0"),
                ],
            )?;
            ip(&[
                "-n", &switch, "link", "add", "name", &host.name, "type", "veth", "peer", "name",
                HOST_IFACE, "netns", &host.ns,
            ])?;
            ip_batch(
                &switch,
                &[
                    format!("link set dev {} master br0", host.name),
                    format!("link set dev {} up", host.name),
                ],
            )?;
            let mut lines = vec![
                "link set lo up".to_owned(),
                format!("addr add {}/24 dev {HOST_IFACE}", host.v4),
                format!("addr add {}/64 dev {HOST_IFACE} nodad", host.v6),
                format!("link set {HOST_IFACE} up"),
            ];
            lines.extend(loopback.iter().map(|a| loopback_line(*a)));
            ip_batch(&host.ns, &lines)?;
            ethtool_in(
                &host.ns,
                HOST_IFACE,
                "turning tx checksum offload off",
                ETHTOOL_STXCSUM,
                false,
            )?;
            let link = attach_xdp_pass(&switch, &host.name)?;
            match self.inner.links.lock() {
                Ok(mut guard) => guard.push(link),
                Err(poisoned) => poisoned.into_inner().push(link),
            }
        }
        for host in &mut self.hosts {
            host.mac = read_mac(&host.ns, HOST_IFACE)?;
        }
        for host in &self.hosts {
            let lines: Vec<String> = self
                .hosts
                .iter()
                .filter(|other| other.name != host.name)
                .flat_map(|other| {
                    let mac = format_mac(&other.mac);
                    [other.v4.to_string(), other.v6.to_string()].map(|addr| {
                        format!("neigh replace {addr} lladdr {mac} dev {HOST_IFACE} nud permanent")
                    })
                })
                .collect();
            ip_batch(&host.ns, &lines)?;
        }
        Ok(())
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.inner.teardown();
    }
}

fn loopback_line(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => format!("addr replace {a}/32 dev lo"),
        IpAddr::V6(a) => format!("addr replace {a}/128 dev lo nodad"),
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn read_mac(ns: &str, iface: &str) -> Result<[u8; 6], NetnsError> {
    let output = ip(&["-n", ns, "-j", "link", "show", "dev", iface])?;
    let err = |detail: String| NetnsError::Mac {
        iface: iface.to_owned(),
        namespace: ns.to_owned(),
        detail,
    };
    let links: serde_json::Value =
        serde_json::from_slice(&output.stdout).map_err(|e| err(e.to_string()))?;
    let text = links
        .get(0)
        .and_then(|l| l.get("address"))
        .and_then(|a| a.as_str())
        .ok_or_else(|| err(format!("no address in {links}")))?;
    let bytes: Vec<u8> = text
        .split(':')
        .filter_map(|b| u8::from_str_radix(b, 16).ok())
        .collect();
    <[u8; 6]>::try_from(bytes).map_err(|_| err(format!("odd address {text:?}")))
}

/// Deletes every namespace and pin directory of this process's testbeds (for a signal
/// handler that may run while a testbed is still being built).
pub fn remove_own() {
    let own = format!("{PREFIX}{}-", std::process::id());
    for dir in ["/run/netns", BPFFS] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with(&own) {
                continue;
            }
            if dir == BPFFS {
                let _ = fs::remove_dir_all(entry.path());
            } else {
                let _ = ip(&["netns", "delete", &name]);
            }
        }
    }
}

/// Deletes namespaces and pin directories of testbeds whose process is gone (killed runs).
pub fn sweep_stale() {
    let owner_alive = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            return true;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            // Not named by this module: leave it alone.
            return true;
        };
        Path::new("/proc").join(pid.to_string()).exists()
    };
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(PREFIX) && !owner_alive(&name) {
                let _ = ip(&["netns", "delete", &name]);
            }
        }
    }
    if let Ok(entries) = fs::read_dir(BPFFS) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(PREFIX) && !owner_alive(&name) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Sends raw Ethernet frames out of `iface` in the calling thread's namespace
/// (`AF_PACKET`): crafted packets reach the wire exactly as built.
pub fn send_frames(iface: &str, frames: &[Vec<u8>]) -> std::io::Result<usize> {
    let name = std::ffi::CString::new(iface)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Protocol 0: the socket sends but receives nothing.
    // SAFETY: plain socket creation; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut sent = 0;
    let mut result = Ok(());
    for frame in frames {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        if let Some(dst) = frame.get(..6) {
            addr.sll_addr[..6].copy_from_slice(dst);
        }
        // SAFETY: the buffer and address are valid for the duration of the call.
        let rc = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            result = Err(std::io::Error::last_os_error());
            break;
        }
        sent += 1;
    }
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    result.map(|()| sent)
}

/// A UDP socket in a namespace that counts the datagrams it receives (to prove a packet
/// did, or did not, reach a host's stack). Stopped on drop.
#[derive(Debug)]
pub struct UdpSink {
    received: Arc<AtomicU32>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<Result<(), NetnsError>>>,
}

impl UdpSink {
    /// Binds `addr` in namespace `ns` and counts what arrives.
    pub fn start(ns: &str, addr: std::net::SocketAddr) -> Result<Self, NetnsError> {
        let received = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
        let thread = {
            let received = Arc::clone(&received);
            let stop = Arc::clone(&stop);
            spawn_in_netns(ns, move || {
                let socket = match std::net::UdpSocket::bind(addr).and_then(|s| {
                    s.set_read_timeout(Some(std::time::Duration::from_millis(50)))?;
                    Ok(s)
                }) {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if socket.recv(&mut buf).is_ok() {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                received,
                stop,
                thread: Some(thread),
            }),
            Ok(Err(source)) => Err(NetnsError::Open {
                path: PathBuf::from(format!("udp socket {addr} in {ns}")),
                source,
            }),
            Err(_) => match thread.join() {
                Ok(Err(e)) => Err(e),
                _ => Err(NetnsError::ThreadPanicked {
                    namespace: ns.to_owned(),
                }),
            },
        }
    }

    /// Datagrams received so far.
    pub fn received(&self) -> u32 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
