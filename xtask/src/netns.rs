//! `cargo xtask clean-netns`: removes what an interrupted test run can leave behind — network
//! namespaces (and the processes still in them), veth links in the host namespace, and bpffs
//! pins — all recognised by a name prefix that only p2pcdn tests use.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::run;

/// Names of `ip netns list` output (`p2p-edge (id: 3)` or `p2p-edge`).
pub fn parse_netns_list(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Interface names of `ip -o link show` output (`7: p2p-e0@if6: <BROADCAST,...> ...`).
pub fn parse_link_list(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .collect()
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    let output = run::probe(Command::new("ip").args(args))
        .context("cannot run `ip` (package iproute2; `cargo xtask setup` installs it)")?;
    if !output.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn matching(names: Vec<String>, prefix: &str) -> Vec<String> {
    names
        .into_iter()
        .filter(|name| name.starts_with(prefix))
        .collect()
}

/// `cargo xtask clean-netns [--prefix P] [--bpffs DIR] [--dry-run]`.
pub fn clean(prefix: &str, bpffs: &Path, dry_run: bool) -> anyhow::Result<()> {
    if prefix.is_empty() {
        bail!("--prefix must not be empty: it would match every namespace");
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    let mut removed = 0usize;
    let mut failures = Vec::new();

    for name in matching(parse_netns_list(&ip(&["netns", "list"])?), prefix) {
        // A leftover server keeps its namespace (and its veths) alive after `ip netns delete`.
        let pids = ip(&["netns", "pids", &name]).unwrap_or_default();
        let pids: Vec<&str> = pids.split_whitespace().collect();
        if !dry_run {
            for pid in &pids {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
            }
            if let Err(err) = ip(&["netns", "delete", &name]) {
                failures.push(err.to_string());
                continue;
            }
        }
        let processes = if pids.is_empty() {
            String::new()
        } else {
            format!(" (stopped processes {})", pids.join(" "))
        };
        println!("{verb} network namespace {name}{processes}");
        removed += 1;
    }

    for name in matching(
        parse_link_list(&ip(&["-o", "link", "show", "type", "veth"])?),
        prefix,
    ) {
        // Deleting one end of a veth pair deletes both, so the peer may already be gone.
        if !dry_run && let Err(err) = ip(&["link", "delete", &name]) {
            if ip(&["link", "show", &name]).is_ok() {
                failures.push(err.to_string());
            }
            continue;
        }
        println!("{verb} veth {name}");
        removed += 1;
    }

    if let Ok(entries) = fs::read_dir(bpffs) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with(prefix) {
                continue;
            }
            let path = entry.path();
            if !dry_run {
                // Unlinking a pinned link detaches its program once nothing else holds it.
                let result = if path.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                if let Err(err) = result {
                    failures.push(format!("cannot remove {}: {err}", path.display()));
                    continue;
                }
            }
            println!("{verb} pins {}", path.display());
            removed += 1;
        }
    }

    if !failures.is_empty() {
        bail!(
            "clean-netns could not remove everything (root needed?): {}",
            failures.join("; ")
        );
    }
    if removed == 0 {
        println!("nothing to clean (no namespace, veth or pin named {prefix}*)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_names_parse_with_and_without_ids() {
        let output = "p2p-edge (id: 3)\np2p-peer1\nother (id: 0)\n";
        assert_eq!(
            matching(parse_netns_list(output), "p2p"),
            vec!["p2p-edge".to_owned(), "p2p-peer1".to_owned()]
        );
    }

    #[test]
    fn link_names_drop_the_peer_suffix() {
        let output = "7: p2p-e0@if6: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue\\    link/ether aa:bb\n\
                      9: veth-x@p2p-e0: <BROADCAST> mtu 1500\n";
        assert_eq!(
            parse_link_list(output),
            vec!["p2p-e0".to_owned(), "veth-x".to_owned()]
        );
        assert_eq!(
            matching(parse_link_list(output), "p2p"),
            vec!["p2p-e0".to_owned()]
        );
    }
}
