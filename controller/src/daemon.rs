//! (being written)
//!
//! Placeholder signature added by H4 so `p2pcdn run` compiles; the lead replaces this file.

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("the daemon is not implemented yet")]
    NotImplemented,
}

/// Runs the daemon until SIGINT/SIGTERM.
pub async fn run(config: crate::config::Config) -> Result<(), DaemonError> {
    let _ = config;
    Err(DaemonError::NotImplemented)
}
