//! A 50 MiB file is hashed correctly and streamed: the process's peak resident memory grows by
//! far less than the file's size. (One test in its own binary, so nothing else allocates
//! meanwhile.)
#![expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]

use std::io::Write as _;

use p2pcdn_controller::{
    manifest::{BuildOptions, build_from_dir},
    model::Fingerprint,
};
use sha2::{Digest as _, Sha256};

const SIZE: usize = 50 * 1024 * 1024;

/// Peak resident set size (VmHWM) in KiB.
fn peak_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Resets VmHWM to the current RSS (Linux `clear_refs`, value 5), where allowed.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[tokio::test]
async fn a_50_mib_file_is_hashed_streaming() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("video").join("big.mp4");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // Pseudo-random content written 1 MiB at a time, hashed as it is written.
    let mut expected = Sha256::new();
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut chunk = vec![0u8; 1024 * 1024];
        for _ in 0..SIZE / chunk.len() {
            for word in chunk.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes());
            }
            expected.update(&chunk);
            file.write_all(&chunk).unwrap();
        }
        file.flush().unwrap();
    }
    let expected: [u8; 32] = expected.finalize().into();

    reset_peak();
    let before = peak_kib();
    let opts = BuildOptions::new(Fingerprint([3; 32]), "video", "http://127.0.0.1:8080");
    let m = build_from_dir(dir.path(), opts).await.unwrap();
    let after = peak_kib();

    let entry = m.entry("/video/big.mp4").unwrap();
    assert_eq!(entry.size, SIZE as u64);
    assert_eq!(entry.sha256, expected, "hashed correctly");
    assert_eq!(entry.content_type, "video/mp4");
    // Without clear_refs the baseline is the peak of the writing above (a few MiB): the
    // bound still holds.
    let grown_kib = after.saturating_sub(before);
    assert!(
        grown_kib < 16 * 1024,
        "peak memory grew by {grown_kib} KiB while hashing a {} KiB file",
        SIZE / 1024
    );
}
