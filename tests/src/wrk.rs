//! Running [wrk](https://github.com/wg/wrk) (Debian's package) and reading its results.
//!
//! wrk is given a Lua script ([`DONE_SCRIPT`]) that defines only `done()`: it prints one line,
//! `WRK_RESULT {json}`, with the exact figures of the run (requests, duration and latency
//! percentiles in microseconds, errors by kind). A script without `request()` or
//! `response()` keeps wrk on its pre-built request path, so the script costs nothing while
//! the load runs. wrk's own human summary (with `--latency`) is kept for the log.
//!
//! wrk is a closed-loop generator: each connection sends its next request when the previous
//! answer is complete (no pipelining), so the latency it reports is the service time under
//! that concurrency, not the latency of an open-loop crowd.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// Marks the line of the [`DONE_SCRIPT`] among wrk's output.
pub const RESULT_MARKER: &str = "WRK_RESULT ";

/// wrk Lua script printing the results as one JSON line (microseconds throughout).
pub const DONE_SCRIPT: &str = r#"-- p2pcdn-tests: print wrk's results as one JSON line.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.3f,"stdev":%.3f,"max":%d,' ..
    '"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
"#;

/// Errors of running wrk or reading its output.
#[derive(Debug, thiserror::Error)]
pub enum WrkError {
    #[error(
        "wrk printed no {marker:?} line (is the Lua script loaded, is this wrk built with LuaJIT?); its output ended with: {tail:?}",
        marker = RESULT_MARKER.trim_end()
    )]
    NoResult { tail: String },
    #[error("wrk printed {count} result lines, expected one")]
    SeveralResults { count: usize },
    #[error("malformed wrk result line {line:?}: {source}")]
    Malformed {
        line: String,
        source: serde_json::Error,
    },
    #[error("implausible wrk result: {reason} (line {line:?})")]
    Implausible { line: String, reason: &'static str },
    #[error(
        "cannot run {program}: {source} (install it: apt-get install wrk, or cargo xtask setup)"
    )]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the wrk script {path}: {source}")]
    Script {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("wrk failed ({status}): {stderr}")]
    Failed { status: String, stderr: String },
    #[error("wrk did not finish within {0:?}; killed")]
    TimedOut(Duration),
    #[error("interrupted")]
    Interrupted,
    #[error("waiting for wrk: {0}")]
    Wait(std::io::Error),
}

/// Socket errors and bad answers wrk counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Errors {
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    /// Answers with a status outside 2xx and 3xx.
    pub status: u64,
    pub timeout: u64,
}

impl Errors {
    /// Socket errors of any kind (connect, read, write, timeout).
    pub fn socket(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout
    }
}

/// Latency of the completed requests, microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Latency {
    pub min: u64,
    pub mean: f64,
    pub stdev: f64,
    pub max: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
}

/// What one wrk run measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrkResult {
    /// Completed responses (of any status).
    pub requests: u64,
    pub duration_us: u64,
    /// Bytes read, headers included.
    pub bytes: u64,
    pub errors: Errors,
    pub latency_us: Latency,
}

impl WrkResult {
    /// Completed responses per second.
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds()
    }

    /// Bytes read per second, in MiB/s.
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / self.seconds() / f64::from(1 << 20)
    }

    pub fn p99_ms(&self) -> f64 {
        self.latency_us.p99 as f64 / 1000.0
    }

    pub fn p50_ms(&self) -> f64 {
        self.latency_us.p50 as f64 / 1000.0
    }

    fn seconds(&self) -> f64 {
        (self.duration_us as f64 / 1e6).max(1e-6)
    }
}

/// Finds and reads the [`RESULT_MARKER`] line in wrk's standard output.
pub fn parse(stdout: &str) -> Result<WrkResult, WrkError> {
    let lines: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.trim().strip_prefix(RESULT_MARKER))
        .collect();
    let line = match lines.as_slice() {
        [line] => line.trim(),
        [] => {
            let tail: String = stdout
                .chars()
                .rev()
                .take(300)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            return Err(WrkError::NoResult {
                tail: tail.trim().to_owned(),
            });
        }
        more => return Err(WrkError::SeveralResults { count: more.len() }),
    };
    let result: WrkResult = serde_json::from_str(line).map_err(|source| WrkError::Malformed {
        line: line.to_owned(),
        source,
    })?;
    let implausible = |reason| {
        Err(WrkError::Implausible {
            line: line.to_owned(),
            reason,
        })
    };
    let l = &result.latency_us;
    if result.duration_us == 0 {
        return implausible("zero duration");
    }
    if result.requests == 0 {
        return implausible("no request completed");
    }
    if !(l.min <= l.p50 && l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.p999 && l.p999 <= l.max) {
        return implausible("latency percentiles out of order");
    }
    if !(l.mean.is_finite() && l.stdev.is_finite() && l.mean >= 0.0 && l.stdev >= 0.0) {
        return implausible("latency mean or stdev not a finite non-negative number");
    }
    Ok(result)
}

/// The load of one wrk run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Load {
    pub threads: usize,
    pub connections: usize,
    pub duration_s: u64,
    /// wrk's per-request time-out (`--timeout`), seconds: a slower answer counts as a
    /// `timeout` error.
    pub timeout_s: u64,
}

impl Load {
    /// How long a run may take before it is killed: its duration plus a margin for start,
    /// the last answers and the report.
    pub fn deadline(&self) -> Duration {
        Duration::from_secs(self.duration_s + self.timeout_s + 15)
    }
}

/// Runs wrk, with the pid of the running process published so another thread (a Ctrl-C
/// handler) can stop it.
#[derive(Debug)]
pub struct Wrk {
    program: PathBuf,
    script: PathBuf,
    running: Arc<Mutex<Option<u32>>>,
    interrupted: Arc<AtomicBool>,
}

impl Wrk {
    /// Writes [`DONE_SCRIPT`] into `dir`.
    pub fn new(program: &Path, dir: &Path, interrupted: Arc<AtomicBool>) -> Result<Self, WrkError> {
        let script = dir.join("wrk-done.lua");
        std::fs::write(&script, DONE_SCRIPT).map_err(|source| WrkError::Script {
            path: script.clone(),
            source,
        })?;
        Ok(Self {
            program: program.to_owned(),
            script,
            running: Arc::new(Mutex::new(None)),
            interrupted,
        })
    }

    /// The pid of the wrk process running now, shared (for a Ctrl-C handler).
    pub fn running(&self) -> Arc<Mutex<Option<u32>>> {
        Arc::clone(&self.running)
    }

    /// The program's version line (`wrk -v` prints it and exits with status 1).
    pub fn version(&self) -> Result<String, WrkError> {
        let output = Command::new(&self.program)
            .arg("-v")
            .output()
            .map_err(|source| WrkError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        let text = String::from_utf8_lossy(&output.stdout);
        let line = text.lines().next().unwrap_or("wrk");
        // "wrk debian/4.1.0-3+b2 [epoll] Copyright (C) 2012 Will Glozer"
        let line = line.split(" Copyright").next().unwrap_or(line);
        Ok(line.trim().to_owned())
    }

    /// The command line of a run (for the log and the JSON).
    pub fn args(&self, load: &Load, url: &str, host: &str) -> Vec<String> {
        vec![
            format!("-t{}", load.threads),
            format!("-c{}", load.connections),
            format!("-d{}s", load.duration_s),
            format!("--timeout={}s", load.timeout_s),
            "--latency".to_owned(),
            "-H".to_owned(),
            format!("Host: {host}"),
            "-s".to_owned(),
            self.script.display().to_string(),
            url.to_owned(),
        ]
    }

    /// Runs wrk against `url` with `Host: host`; killed past [`Load::deadline`] or when
    /// interrupted. Returns the result and wrk's human summary.
    pub fn run(&self, load: &Load, url: &str, host: &str) -> Result<(WrkResult, String), WrkError> {
        let mut cmd = Command::new(&self.program);
        cmd.args(self.args(load, url, host))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Its own process group: a Ctrl-C in the terminal reaches this process only, which
        // stops wrk itself (and still tears down what it started).
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().map_err(|source| WrkError::Spawn {
            program: self.program.clone(),
            source,
        })?;
        let mut child = ChildGuard(child);
        *lock(&self.running) = Some(child.0.id());
        let outcome = self.wait(&mut child, load.deadline());
        *lock(&self.running) = None;
        let status = outcome?;
        let mut stdout = String::new();
        let mut stderr = String::new();
        if let Some(mut out) = child.0.stdout.take() {
            let _ = out.read_to_string(&mut stdout);
        }
        if let Some(mut err) = child.0.stderr.take() {
            let _ = err.read_to_string(&mut stderr);
        }
        if !status.success() {
            return Err(WrkError::Failed {
                status: status.to_string(),
                stderr: stderr.trim().to_owned(),
            });
        }
        let result = parse(&stdout)?;
        let summary = stdout
            .lines()
            .filter(|line| !line.trim().starts_with(RESULT_MARKER))
            .collect::<Vec<_>>()
            .join("\n");
        Ok((result, summary))
    }

    fn wait(
        &self,
        child: &mut ChildGuard,
        deadline: Duration,
    ) -> Result<std::process::ExitStatus, WrkError> {
        // wrk's output is a few lines: the pipes cannot fill up while it runs.
        let started = Instant::now();
        loop {
            if let Some(status) = child.0.try_wait().map_err(WrkError::Wait)? {
                return Ok(status);
            }
            if self.interrupted.load(Ordering::SeqCst) {
                return Err(WrkError::Interrupted);
            }
            if started.elapsed() > deadline {
                return Err(WrkError::TimedOut(deadline));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Kills and reaps wrk if it is still running when dropped (time-out, interruption, panic).
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HUMAN: &str = "Running 10s test @ http://127.0.0.1:8080/10KiB.bin
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   635.91us    0.89ms  12.92ms   93.69%
    Req/Sec    56.20k     8.07k   62.00k    86.54%
  Latency Distribution
     50%  250.00us
     75%  491.00us
     90%  700.00us
     99%    5.00ms
  1123260 requests in 10.00s, 11.64GB read
Requests/sec: 112323.37
Transfer/sec:      1.16GB
";

    const LINE: &str = r#"WRK_RESULT {"requests":1123260,"duration_us":10000300,"bytes":12498765432,"errors":{"connect":0,"read":1,"write":0,"status":12,"timeout":0},"latency_us":{"min":40,"mean":635.910,"stdev":890.000,"max":12920,"p50":250,"p90":700,"p99":5000,"p999":9000}}"#;

    fn parsed(text: &str) -> WrkResult {
        match parse(text) {
            Ok(result) => result,
            Err(e) => panic!("{e}"),
        }
    }

    fn error(text: &str) -> String {
        match parse(text) {
            Ok(result) => panic!("parsed {result:?} from {text:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn reads_the_result_line_among_the_human_summary() {
        let result = parsed(&format!("{HUMAN}{LINE}\n"));
        assert_eq!(result.requests, 1_123_260);
        assert_eq!(result.duration_us, 10_000_300);
        assert_eq!(
            result.errors,
            Errors {
                connect: 0,
                read: 1,
                write: 0,
                status: 12,
                timeout: 0
            }
        );
        assert_eq!(result.errors.socket(), 1);
        assert_eq!(result.latency_us.p99, 5000);
        assert!((result.p99_ms() - 5.0).abs() < 1e-9);
        assert!((result.p50_ms() - 0.25).abs() < 1e-9);
        assert!((result.rps() - 112_322.63).abs() < 0.01, "{}", result.rps());
        assert!(
            (result.mib_per_s() - 1191.9).abs() < 0.1,
            "{}",
            result.mib_per_s()
        );
        // Leading spaces (wrk indents nothing, but a wrapper might) and CRLF.
        let result = parsed(&format!("  {}\r\n", LINE));
        assert_eq!(result.requests, 1_123_260);
    }

    #[test]
    fn missing_result_line_names_the_likely_cause_and_the_output_tail() {
        let e = error(HUMAN);
        assert!(e.contains("no \"WRK_RESULT\" line"), "{e}");
        assert!(e.contains("Lua"), "{e}");
        assert!(e.contains("Transfer/sec"), "{e}");
        let e = error("");
        assert!(e.contains("no \"WRK_RESULT\" line"), "{e}");
        // A crash message is shown as it is.
        let e = error("unable to connect to 127.0.0.1:1 Connection refused\n");
        assert!(e.contains("Connection refused"), "{e}");
    }

    #[test]
    fn malformed_lines_are_refused_with_the_line() {
        // Truncated.
        let e = error(&LINE[..LINE.len() - 20]);
        assert!(e.starts_with("malformed wrk result line"), "{e}");
        assert!(e.contains("requests") && e.contains("1123260"), "{e}");
        // A field missing, an unknown field, a wrong type, a negative count.
        for bad in [
            LINE.replace("\"bytes\":12498765432,", ""),
            LINE.replace("\"bytes\"", "\"bytez\""),
            LINE.replace("\"requests\":1123260", "\"requests\":\"many\""),
            LINE.replace("\"requests\":1123260", "\"requests\":-1"),
            LINE.replace("\"p99\":5000", "\"p99\":nan"),
            format!("{RESULT_MARKER}not json"),
        ] {
            let e = error(&bad);
            assert!(e.starts_with("malformed wrk result line"), "{bad}: {e}");
        }
    }

    #[test]
    fn implausible_results_are_refused() {
        let e = error(&LINE.replace("\"duration_us\":10000300", "\"duration_us\":0"));
        assert!(e.contains("zero duration"), "{e}");
        let e = error(&LINE.replace("\"requests\":1123260", "\"requests\":0"));
        assert!(e.contains("no request completed"), "{e}");
        let e = error(&LINE.replace("\"p99\":5000", "\"p99\":50"));
        assert!(e.contains("out of order"), "{e}");
    }

    #[test]
    fn two_result_lines_are_ambiguous() {
        let e = error(&format!("{LINE}\n{LINE}\n"));
        assert!(e.contains("2 result lines"), "{e}");
    }

    #[test]
    fn the_command_line_carries_the_load_the_host_and_the_script() {
        let dir = std::env::temp_dir();
        let wrk = Wrk {
            program: PathBuf::from("wrk"),
            script: dir.join("s.lua"),
            running: Arc::default(),
            interrupted: Arc::default(),
        };
        let load = Load {
            threads: 2,
            connections: 64,
            duration_s: 10,
            timeout_s: 5,
        };
        assert_eq!(load.deadline(), Duration::from_secs(30));
        let args = wrk.args(&load, "http://127.0.0.1:1/a", "www.example");
        assert_eq!(
            args[..7],
            [
                "-t2",
                "-c64",
                "-d10s",
                "--timeout=5s",
                "--latency",
                "-H",
                "Host: www.example"
            ]
        );
        assert_eq!(
            args.last().map(String::as_str),
            Some("http://127.0.0.1:1/a")
        );
    }

    #[test]
    fn the_script_prints_every_field_the_parser_wants() {
        for field in [
            "requests",
            "duration_us",
            "bytes",
            "connect",
            "read",
            "write",
            "status",
            "timeout",
            "min",
            "mean",
            "stdev",
            "max",
            "p50",
            "p90",
            "p99",
            "p999",
        ] {
            assert!(DONE_SCRIPT.contains(&format!("\"{field}\":")), "{field}");
        }
        assert!(DONE_SCRIPT.contains(RESULT_MARKER));
        assert!(!DONE_SCRIPT.contains("request ="), "no per-request Lua");
    }
}
