//! Pushing to many VMs at once: up to `concurrency` hosts in parallel (tokio tasks and a
//! semaphore), a connect timeout and a step timeout per host, and one [`Outcome`] per host
//! whatever happens to the others. A host whose plan could not even be made (a missing annotation) is reported
//! like any other failure, without being contacted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Semaphore;

use crate::plan::Plan;
use crate::ssh;

/// One host's work: a plan, or the reason there is none.
#[derive(Debug)]
pub struct Job {
    /// `namespace/name` of the WorkloadEntry.
    pub entry: String,
    /// `[user@]host[:port]`, or what is known of it.
    pub host: String,
    /// The plan, or why it could not be made.
    pub plan: Result<Plan, String>,
}

/// Hosts pushed to in parallel unless told otherwise. A host costs one SSH handshake and
/// one short script, and the client waits on the network most of that time, so a fleet is
/// best served with many at once (BENCHMARKS.md, "Push").
pub const DEFAULT_CONCURRENCY: usize = 64;
/// Limit for reaching one host (TCP, SSH banner, key exchange, login).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Limit for the steps on one host once connected.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// How the fleet runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Hosts in parallel (at least 1).
    pub concurrency: usize,
    /// Limit for the steps on one host once connected; reaching it is limited by
    /// [`ssh::Options::connect_timeout`].
    pub timeout: Duration,
    /// SSH settings.
    pub ssh: ssh::Options,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            concurrency: DEFAULT_CONCURRENCY,
            timeout: DEFAULT_TIMEOUT,
            ssh: ssh::Options {
                connect_timeout: Some(DEFAULT_CONNECT_TIMEOUT),
                ..Default::default()
            },
        }
    }
}

/// How one host went.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Outcome {
    /// `namespace/name` of the WorkloadEntry.
    pub entry: String,
    /// `[user@]host[:port]`.
    pub host: String,
    /// Whether every step succeeded.
    pub ok: bool,
    /// Wall time for this host.
    #[serde(serialize_with = "millis", rename = "durationMs")]
    pub duration: Duration,
    /// What failed, and what to change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Receives progress while the fleet runs (a progress bar, or plain lines).
pub trait Observer: Send + Sync {
    /// A step line (or command output) for `entry`.
    fn line(&self, entry: &str, line: &str);
    /// A host finished.
    fn finished(&self, outcome: &Outcome);
}

/// Runs every job; outcomes come back in the jobs' order.
pub async fn run(jobs: Vec<Job>, options: &Options, observer: Arc<dyn Observer>) -> Vec<Outcome> {
    let permits = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let mut tasks = Vec::with_capacity(jobs.len());
    for job in jobs {
        let permits = Arc::clone(&permits);
        let observer = Arc::clone(&observer);
        let options = options.clone();
        tasks.push(tokio::spawn(async move {
            let Job { entry, host, plan } = job;
            let plan = match plan {
                Ok(p) => p,
                Err(error) => {
                    let outcome = Outcome {
                        entry,
                        host,
                        ok: false,
                        duration: Duration::ZERO,
                        error: Some(error),
                    };
                    observer.finished(&outcome);
                    return outcome;
                }
            };
            // The semaphore is never closed, so acquiring only waits.
            let _permit = permits.acquire_owned().await.ok();
            let started = Instant::now();
            let progress = {
                let observer = Arc::clone(&observer);
                let entry = entry.clone();
                move |line: String| observer.line(&entry, &line)
            };
            let result = ssh::execute(&plan, &options.ssh, options.timeout, &progress).await;
            let error = result.err().map(|e| e.to_string());
            let outcome = Outcome {
                entry,
                host,
                ok: error.is_none(),
                duration: started.elapsed(),
                error,
            };
            observer.finished(&outcome);
            outcome
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        match task.await {
            Ok(o) => outcomes.push(o),
            Err(e) => outcomes.push(Outcome {
                entry: "?".into(),
                host: "?".into(),
                ok: false,
                duration: Duration::ZERO,
                error: Some(format!("internal error: {e}")),
            }),
        }
    }
    outcomes
}

/// The summary table: host, entry, result, duration, error.
pub fn summary_table(outcomes: &[Outcome]) -> String {
    let rows: Vec<[String; 5]> = outcomes
        .iter()
        .map(|o| {
            [
                o.host.clone(),
                o.entry.clone(),
                if o.ok { "ok".into() } else { "FAILED".into() },
                format!("{:.1}s", o.duration.as_secs_f64()),
                o.error.clone().unwrap_or_default().replace('\n', " "),
            ]
        })
        .collect();
    let header = ["HOST", "ENTRY", "RESULT", "DURATION", "ERROR"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row.iter()).take(4) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: [&str; 5]| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i < 4 {
                s.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            } else {
                s.push_str(cell);
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header);
    for row in &rows {
        out.push_str(&line([&row[0], &row[1], &row[2], &row[3], &row[4]]));
    }
    let failed = outcomes.iter().filter(|o| !o.ok).count();
    out.push_str(&format!(
        "{} host(s): {} succeeded, {failed} failed\n",
        outcomes.len(),
        outcomes.len() - failed
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_every_host() {
        let table = summary_table(&[
            Outcome {
                entry: "bookinfo/a".into(),
                host: "root@127.0.0.2:2200".into(),
                ok: true,
                duration: Duration::from_millis(1234),
                error: None,
            },
            Outcome {
                entry: "bookinfo/b".into(),
                host: "10.0.0.9".into(),
                ok: false,
                duration: Duration::ZERO,
                error: Some("cannot connect".into()),
            },
        ]);
        assert_eq!(
            table,
            "HOST                 ENTRY       RESULT  DURATION  ERROR\n\
             root@127.0.0.2:2200  bookinfo/a  ok      1.2s\n\
             10.0.0.9             bookinfo/b  FAILED  0.0s      cannot connect\n\
             2 host(s): 1 succeeded, 1 failed\n"
        );
    }
}
