//! `gangplank-bench`: measures the onboarding endpoint from outside.
//!
//! `gangplank-bench onboard` starts a real `gangplank-endpoint` process on a fresh registry,
//! then plays N VMs in this one process (real TLS connections, real credentials, a bound key
//! each; see [`agents`]) and reports onboardings/s, latency percentiles, the endpoint's CPU,
//! allocations, memory and registry writes per onboarding, the steady state of N connected
//! sessions, and, in the same run, the floor: full TLS handshakes against the same port and
//! the signature operations an onboarding needs, timed alone.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

mod agents;
mod floor;
mod plane;
mod probe;

use plane::{CredentialKind, Plane, RegistryKind};

#[derive(Parser)]
#[command(
    name = "gangplank-bench",
    version,
    about = "Measures the onboarding endpoint with simulated agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// N simulated agents onboard, hold their sessions with heartbeats, and leave; the
    /// endpoint's cost is compared with TLS handshakes measured in the same run.
    Onboard(Onboard),
}

#[derive(clap::Args)]
struct Onboard {
    /// Agents per run; one run (with a fresh endpoint and registry) per value.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    agents: Vec<usize>,
    /// The registry the endpoint runs on.
    #[arg(long, value_enum, default_value = "dir")]
    registry: RegistryKind,
    /// The first-join credential the agents present.
    #[arg(long, value_enum, default_value = "join-token")]
    credential: CredentialKind,
    /// Agents onboarding at once (the rest wait their turn; all stay connected).
    #[arg(long, default_value_t = 1000)]
    concurrency: usize,
    /// Full TLS handshakes for the floor.
    #[arg(long, default_value_t = 2000)]
    handshakes: u64,
    /// How long the steady state (every agent connected, heartbeats only) is measured.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    steady: Duration,
    /// The endpoint's `workloads.heartbeat` (the interval its Welcome tells agents); the
    /// endpoint's default when not given.
    #[arg(long, value_parser = humantime::parse_duration)]
    heartbeat: Option<Duration>,
    /// How long the agents may take to onboard; those not done by then count as failed.
    #[arg(long, default_value = "600s", value_parser = humantime::parse_duration)]
    deadline: Duration,
    /// The endpoint binary (default: `gangplank-endpoint` next to this one).
    #[arg(long)]
    endpoint_bin: Option<PathBuf>,
    /// Output: a table, or JSON.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

/// One run's measurements.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Run {
    agents: usize,
    registry: RegistryKind,
    credential: CredentialKind,
    concurrency: usize,
    failures: usize,
    first_failure: Option<String>,
    onboardings_per_second: f64,
    latency_ms: Latency,
    endpoint_cpu_ms_per_onboarding: f64,
    /// The part of it spent in the kernel (system time: sockets, files, fsync).
    endpoint_system_cpu_ms_per_onboarding: f64,
    allocations_per_onboarding: Option<f64>,
    registry_writes_per_onboarding: f64,
    rss_after_onboarding_mib: f64,
    steady: Steady,
    /// The heartbeat interval the endpoint gave the agents.
    heartbeat: String,
    leave_registry_writes_per_agent: f64,
    floor: floor::Handshakes,
    /// Endpoint CPU per onboarding ÷ endpoint CPU per TLS handshake.
    ratio_to_handshake: f64,
}

#[derive(Debug, Serialize)]
struct Latency {
    p50: f64,
    p99: f64,
    max: f64,
    #[serde(rename = "p99OverP50")]
    p99_over_p50: f64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Steady {
    seconds: f64,
    sessions: usize,
    cpu_percent_of_one_core: f64,
    rss_mib: f64,
    peak_rss_mib: f64,
    registry_writes: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    endpoint: String,
    signatures: floor::Signatures,
    runs: Vec<Run>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gangplank-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Command::Onboard(args) = cli.command;
    match runtime.block_on(onboard(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<gangplank_stdout::Error>() {
            Some(gangplank_stdout::Error::Closed) => ExitCode::from(gangplank_stdout::EXIT_CLOSED),
            _ => {
                eprintln!("gangplank-bench: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn onboard(args: Onboard) -> Result<()> {
    raise_open_files()?;
    let endpoint_bin = match &args.endpoint_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the bench's folder")?
            .join("gangplank-endpoint"),
    };
    anyhow::ensure!(
        endpoint_bin.exists(),
        "{} not found: build it (`cargo build --release -p gangplank-endpoint`) or pass --endpoint-bin",
        endpoint_bin.display()
    );
    let signatures = floor::signatures(2000)?;
    let mut runs = Vec::new();
    for &n in &args.agents {
        eprintln!(
            "gangplank-bench: {n} agents ({:?} registry, {:?})…",
            args.registry, args.credential
        );
        runs.push(run(&args, &endpoint_bin, n).await?);
    }
    let report = Report {
        endpoint: endpoint_bin.display().to_string(),
        signatures,
        runs,
    };
    let failed: usize = report.runs.iter().map(|r| r.failures).sum();
    match args.output {
        Output::Json => {
            // The table too, on stderr, so one run gives both.
            eprint!("{}", table(&report));
            gangplank_stdout::println(serde_json::to_string_pretty(&report)?)?
        }
        Output::Table => gangplank_stdout::print(table(&report))?,
    }
    // The report is out; a run in which agents failed still fails the command.
    anyhow::ensure!(
        failed == 0,
        "{failed} agents failed to onboard or leave (see first failure above)"
    );
    Ok(())
}

async fn run(args: &Onboard, endpoint_bin: &std::path::Path, n: usize) -> Result<Run> {
    let plane = Plane::start(endpoint_bin, args.registry, args.credential, args.heartbeat).await?;
    let pid = plane.pid();
    let concurrency = args.concurrency.min(n).max(1);
    let floor = floor::handshakes(
        plane.addr,
        &plane.ca_bundle,
        pid,
        args.handshakes,
        concurrency.min(256),
    )
    .await?;

    let credentials = plane.credentials(n).await?;
    let agents = credentials
        .into_iter()
        .enumerate()
        .map(|(i, c)| agents::Agent::new(i, c))
        .collect::<Result<Vec<_>>>()?;
    // Quiet before measuring: the floor's connections are closed and their CPU counted.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (cpu0, writes0, allocs0) = (
        probe::cpu_split_ns(pid)?,
        plane.writes(),
        probe::allocations(plane.monitoring).await,
    );
    let started = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (leave_tx, leave_rx) = watch::channel(false);
    let (addr, ca) = (plane.addr, plane.ca_bundle.clone());
    let fleet = tokio::spawn(async move { agents::run(agents, addr, &ca, concurrency, tx, leave_rx).await });

    let mut latencies = Vec::with_capacity(n);
    let mut failures = Vec::new();
    let deadline = tokio::time::Instant::now() + args.deadline;
    while latencies.len() + failures.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Ok(l))) => latencies.push(l),
            Ok(Some(Err(e))) => failures.push(e),
            Ok(None) => break,
            Err(_) => {
                let late = n - latencies.len() - failures.len();
                eprintln!(
                    "gangplank-bench: {late} of {n} agents had not onboarded within {:?}; endpoint log:\n{}",
                    args.deadline,
                    plane.log_tail(5)
                );
                failures.extend((0..late).map(|_| format!("not onboarded within {:?}", args.deadline)));
                break;
            }
        }
    }
    let elapsed = started.elapsed();
    // The last onboardings' writes and CPU land within moments of their Welcome (and the
    // write counter may lag a busy moment): wait until it stops moving, at most 10 s.
    let mut last = plane.writes();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = plane.writes();
        if now == last {
            break;
        }
        last = now;
    }
    let (user1, system1) = probe::cpu_split_ns(pid)?;
    let (user, system) = (user1 - cpu0.0, system1 - cpu0.1);
    let cpu = user + system;
    let writes = plane.writes() - writes0;
    let allocs = match (allocs0, probe::allocations(plane.monitoring).await) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let (rss_after, _) = probe::rss(pid)?;
    let ok = latencies.len().max(1) as f64;

    // Steady state: everyone connected, heartbeats only.
    let (cpu_s, writes_s, t_s) = (probe::cpu_ns(pid)?, plane.writes(), Instant::now());
    if std::env::var_os("GANGPLANK_BENCH_DEBUG_WRITES").is_some() {
        eprintln!("steady state from {:?}", std::time::SystemTime::now());
    }
    tokio::time::sleep(args.steady).await;
    let steady_cpu = probe::cpu_ns(pid)? - cpu_s;
    let steady_secs = t_s.elapsed().as_secs_f64();
    let steady_writes = plane.writes() - writes_s;
    if std::env::var_os("GANGPLANK_BENCH_DEBUG_WRITES").is_some() {
        for w in plane.last_writes(steady_writes as usize) {
            eprintln!("steady-state write: {w}");
        }
    }
    let (rss_steady, peak) = probe::rss(pid)?;

    let writes_l = plane.writes();
    let _ = leave_tx.send(true);
    let left = fleet.await.context("agents")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let leave_writes = plane.writes() - writes_l;
    // An agent that failed to onboard reported it already; the rest failed later.
    let later: Vec<String> = left
        .into_iter()
        .filter_map(Result::err)
        .filter(|e| !failures.contains(e))
        .collect();
    failures.extend(later);

    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .copied()
            .map(ms)
            .unwrap_or(0.0)
    };
    let (p50, p99) = (pct(0.50), pct(0.99));
    let cpu_per = cpu as f64 / 1e6 / ok;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    Ok(Run {
        agents: n,
        registry: args.registry,
        credential: args.credential,
        concurrency,
        failures: failures.len(),
        first_failure: failures.first().cloned(),
        onboardings_per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        latency_ms: Latency {
            p50,
            p99,
            max: latencies.last().copied().map(ms).unwrap_or(0.0),
            p99_over_p50: if p50 > 0.0 { p99 / p50 } else { 0.0 },
        },
        endpoint_cpu_ms_per_onboarding: cpu_per,
        endpoint_system_cpu_ms_per_onboarding: system as f64 / 1e6 / ok,
        allocations_per_onboarding: allocs.map(|a| a as f64 / ok),
        registry_writes_per_onboarding: writes as f64 / ok,
        rss_after_onboarding_mib: mib(rss_after),
        steady: Steady {
            seconds: steady_secs,
            sessions: latencies.len(),
            cpu_percent_of_one_core: steady_cpu as f64 / 1e9 / steady_secs * 100.0,
            rss_mib: mib(rss_steady),
            peak_rss_mib: mib(peak),
            registry_writes: steady_writes,
        },
        heartbeat: args
            .heartbeat
            .map(|h| humantime::format_duration(h).to_string())
            .unwrap_or_else(|| "the endpoint's default (10s)".into()),
        leave_registry_writes_per_agent: leave_writes as f64 / ok,
        ratio_to_handshake: cpu_per / floor.endpoint_cpu_ms,
        floor,
    })
}

/// Thousands of agents need thousands of sockets, here and in the endpoint (which inherits
/// the limit): the soft limit is raised to the hard one.
fn raise_open_files() -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raising RLIMIT_NOFILE")?;
    Ok(())
}

fn table(report: &Report) -> String {
    let s = &report.signatures;
    let mut out = format!(
        "signatures per onboarding, alone: {:.3} ms (Ed25519 verify {:.1} µs, ES256 sign {:.1} µs, HS256 {:.1} µs + 2 × {:.1} µs; an ES256 verify is {:.1} µs)\n\n",
        s.per_onboarding_ms,
        s.ed25519_verify_us,
        s.es256_sign_us,
        s.hs256_sign_us,
        s.hs256_verify_us,
        s.es256_verify_us
    );
    out.push_str(
        "agents  registry  credential  fail  onb/s   p50 ms  p99 ms  max ms  p99/p50  cpu ms/onb (sys)  allocs/onb  writes/onb  rss MiB  | steady: cpu %  rss MiB  writes  | floor: hs/s   cpu ms/hs  | ratio\n",
    );
    for r in &report.runs {
        out.push_str(&format!(
            "{:<7} {:<9} {:<11} {:<5} {:<7.0} {:<7.1} {:<7.1} {:<7.1} {:<8.2} {:<5.3} ({:.3})  {:<11} {:<11.2} {:<8.1} | {:>13.2}  {:<7.1}  {:<6}  | {:>10.0}   {:<9.3}  | {:.2}\n",
            r.agents,
            format!("{:?}", r.registry).to_lowercase(),
            match r.credential {
                CredentialKind::JoinToken => "join-token",
                CredentialKind::Jwt => "jwt",
            },
            r.failures,
            r.onboardings_per_second,
            r.latency_ms.p50,
            r.latency_ms.p99,
            r.latency_ms.max,
            r.latency_ms.p99_over_p50,
            r.endpoint_cpu_ms_per_onboarding,
            r.endpoint_system_cpu_ms_per_onboarding,
            r.allocations_per_onboarding.map(|a| format!("{a:.0}")).unwrap_or_else(|| "n/a".into()),
            r.registry_writes_per_onboarding,
            r.rss_after_onboarding_mib,
            r.steady.cpu_percent_of_one_core,
            r.steady.rss_mib,
            r.steady.registry_writes,
            r.floor.per_second,
            r.floor.endpoint_cpu_ms,
            r.ratio_to_handshake,
        ));
        if let Some(f) = &r.first_failure {
            out.push_str(&format!("        first failure: {f}\n"));
        }
    }
    out
}
