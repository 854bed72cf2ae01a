//! Where the workspace is and what `cargo metadata` says about it (target directory, binaries).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};

use crate::run;

/// The repository root: the parent of xtask's manifest directory.
pub fn root() -> anyhow::Result<PathBuf> {
    // `cargo run` sets the variable at run time; the compile-time value covers a direct run of
    // the binary.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest.parent().map(Path::to_path_buf).ok_or_else(|| {
        anyhow!(
            "xtask's manifest directory {} has no parent",
            manifest.display()
        )
    })
}

/// What the workflows need to know from `cargo metadata --no-deps` (runs no build script).
pub struct Metadata {
    pub target_dir: PathBuf,
    /// `(package, binary)` pairs of every workspace member.
    pub bins: Vec<(String, String)>,
}

impl Metadata {
    pub fn load(root: &Path) -> anyhow::Result<Self> {
        let output =
            run::probe(run::cargo(root).args(["metadata", "--no-deps", "--format-version", "1"]))
                .context("cannot run `cargo metadata`")?;
        if !output.status.success() {
            bail!(
                "`cargo metadata` failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Self::parse(&output.stdout)
    }

    pub fn parse(json: &[u8]) -> anyhow::Result<Self> {
        let value: serde_json::Value =
            serde_json::from_slice(json).context("`cargo metadata` printed invalid JSON")?;
        let target_dir = value
            .get("target_directory")
            .and_then(serde_json::Value::as_str)
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("`cargo metadata` gave no target_directory"))?;
        let mut bins = Vec::new();
        for package in value
            .get("packages")
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(name) = package.get("name").and_then(serde_json::Value::as_str) else {
                continue;
            };
            for target in package
                .get("targets")
                .and_then(serde_json::Value::as_array)
                .into_iter()
                .flatten()
            {
                let is_bin = target
                    .get("kind")
                    .and_then(serde_json::Value::as_array)
                    .is_some_and(|kinds| kinds.iter().any(|kind| kind == "bin"));
                if let (true, Some(bin)) = (
                    is_bin,
                    target.get("name").and_then(serde_json::Value::as_str),
                ) {
                    bins.push((name.to_owned(), bin.to_owned()));
                }
            }
        }
        Ok(Self { target_dir, bins })
    }

    /// Fails with a clear line when a workflow's binary does not exist (yet).
    pub fn require_bin(&self, package: &str, bin: &str) -> anyhow::Result<()> {
        if self
            .bins
            .iter()
            .any(|(p, b)| p.as_str() == package && b.as_str() == bin)
        {
            Ok(())
        } else {
            bail!("package `{package}` has no binary `{bin}` (is it declared in its Cargo.toml?)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_lists_bins_and_target_dir() {
        let json = br#"{"target_directory":"/w/target","packages":[
            {"name":"p2pcdn-tests","targets":[{"name":"p2pcdn_tests","kind":["lib"]},
                                            {"name":"demo-dataplane","kind":["bin"]}]},
            {"name":"redirector-user","targets":[{"name":"p2pcdn-redirector","kind":["bin"]}]}]}"#;
        let Ok(meta) = Metadata::parse(json) else {
            panic!("valid metadata must parse");
        };
        assert_eq!(meta.target_dir, PathBuf::from("/w/target"));
        assert!(meta.require_bin("p2pcdn-tests", "demo-dataplane").is_ok());
        assert!(meta.require_bin("p2pcdn-tests", "p2pcdn_tests").is_err());
        let Err(err) = meta.require_bin("p2pcdn-tests", "bench-dataplane") else {
            panic!("a missing bin must be an error");
        };
        assert!(err.to_string().contains("bench-dataplane"));
    }

    #[test]
    fn metadata_without_target_dir_is_an_error() {
        assert!(Metadata::parse(br#"{"packages":[]}"#).is_err());
        assert!(Metadata::parse(b"not json").is_err());
    }
}
