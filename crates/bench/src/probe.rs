//! What the benchmark reads off the endpoint from outside: its CPU time and memory from
//! `/proc`, the registry writes it makes (inotify on the registry folder, or the API
//! stand-in's request log), and its heap allocations from its `/metrics` when it has them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

/// CPU time (user + system) of process `pid`, all its threads including those that already
/// exited (the endpoint's blocking-pool threads come and go), in nanoseconds, from
/// `/proc/PID/stat` (clock ticks, 10 ms each at the usual 100 Hz: runs are long enough that
/// this is well under 1 % of what is measured).
pub fn cpu_ns(pid: u32) -> Result<u64> {
    cpu_split_ns(pid).map(|(user, system)| user + system)
}

/// [`cpu_ns`] as (user, system).
pub fn cpu_split_ns(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unexpected /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Ok((ticks(11) * 1_000_000_000 / hz, ticks(12) * 1_000_000_000 / hz))
}

/// Resident memory of `pid` now and at its peak, in bytes.
pub fn rss(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// Counts the files the endpoint writes or removes under a directory registry: every
/// write is a rename of a finished temporary file into place, every removal an unlink, so
/// `IN_MOVED_TO` and `IN_DELETE` of non-hidden names count registry writes exactly (the
/// temporary file's `IN_CLOSE_WRITE` may arrive under the final name, after the rename, so it
/// is not counted).
pub struct Writes {
    count: Arc<AtomicU64>,
    _thread: std::thread::JoinHandle<()>,
}

impl Writes {
    /// Watches `root` and each folder below it (`<namespace>/<kind>`), which must exist.
    pub fn watch(root: &Path) -> Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC).context("inotify_init")?;
        for dir in folders(root) {
            inotify
                .add_watch(&dir, AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_DELETE)
                .with_context(|| format!("watching {}", dir.display()))?;
        }
        let count = Arc::new(AtomicU64::new(0));
        let counter = count.clone();
        let debug = std::env::var_os("GANGPLANK_BENCH_DEBUG_WRITES").is_some();
        let thread = std::thread::spawn(move || {
            while let Ok(events) = inotify.read_events() {
                for e in events {
                    let hidden = e
                        .name
                        .as_ref()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'));
                    let folder = e.mask.contains(AddWatchFlags::IN_ISDIR);
                    if !hidden && !folder {
                        if debug {
                            eprintln!(
                                "registry write: {:?} {:?} {:?}",
                                std::time::SystemTime::now(),
                                e.mask,
                                e.name
                            );
                        }
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Ok(Self {
            count,
            _thread: thread,
        })
    }

    /// Writes seen so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

fn folders(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_owned()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(rd) = std::fs::read_dir(&out[i]) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

/// The endpoint's heap allocations so far, from its `/metrics`
/// (`gangplank_endpoint_heap_allocations_total`), or `None` when it does not count them.
pub async fn allocations(monitoring: std::net::SocketAddr) -> Option<u64> {
    let body = http_get(monitoring, "/metrics").await.ok()?;
    body.lines()
        .find(|l| l.starts_with("gangplank_endpoint_heap_allocations_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

/// A plain HTTP/1.1 GET on the endpoint's monitoring port (loopback only).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut out = String::new();
        tcp.read_to_string(&mut out).await?;
        anyhow::Ok(out)
    };
    tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .context("monitoring port did not answer in 10s")?
}
