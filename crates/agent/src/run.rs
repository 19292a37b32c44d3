//! The onboarding loop.
//!
//! Discover → credential → Onboard → write boot files → start the sidecar → Session stream
//! (heartbeats, health, token renewal, config changes) for as long as the agent lives;
//! on shutdown, Leave → wait the propagation delay → stop the sidecar.
//!
//! Every failure is retried with capped exponential backoff and full jitter: the endpoint
//! may be down, the WorkloadGroup or an allowing OnboardingPolicy may not exist yet. A
//! broken Session stream is reopened with the same session; a session the endpoint no
//! longer knows (UNAUTHENTICATED, NOT_FOUND) means onboarding again from scratch.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gangplank_api::NamespacedName;
use gangplank_api::proto::{self, onboarding_client::OnboardingClient};
use gangplank_identity::{Challenge, Provider};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::backoff::Backoff;
use crate::config;
use crate::files::{self, Changed, Name};
use crate::health::Health;
use crate::host;
use crate::launcher::{self, Launcher};
use crate::readiness::Readiness;
use crate::status::{self as report, Phase};

/// Heartbeat interval when neither the endpoint nor the config gives one.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);
/// How often the sidecar's health is checked for changes to report.
pub const HEALTH_POLL: Duration = Duration::from_secs(1);
/// How long Leave may take before the agent gives up on it.
pub const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a shutdown waits for an onboarding in flight to finish.
pub const ONBOARD_FINISH: Duration = Duration::from_secs(15);
/// How long a stopping agent waits for its final status to reach the status file.
pub const STATUS_FINISH: Duration = Duration::from_secs(3);

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The TLS client for the endpoint could not be set up (CA bundle, SNI).
    #[error(
        "cannot set up TLS to the onboarding endpoint {endpoint}: {source}; check onboardingEndpoint.transportSecurity in the onboarding configuration"
    )]
    Tls {
        /// `host:port`.
        endpoint: String,
        /// What failed.
        source: gangplank_tls::Error,
    },
    /// Leave failed; the sidecar was stopped anyway.
    #[error(
        "cannot deregister from the onboarding endpoint {endpoint}: {message}; the sidecar was stopped, and the endpoint removes this VM's WorkloadEntry after its grace period"
    )]
    Leave {
        /// `host:port`.
        endpoint: String,
        /// What failed.
        message: String,
    },
    /// The sidecar could not be stopped.
    #[error("cannot stop the sidecar: {0}")]
    Stop(#[source] launcher::Error),
}

/// A result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the agent is doing, for whoever embeds it (tests, `gangplank quickstart`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Not registered yet; `last_error` says why the last attempt failed.
    Onboarding {
        /// The last attempt's failure.
        last_error: Option<String>,
    },
    /// Registered as a WorkloadEntry; `connected` while the Session stream is open.
    Registered {
        /// The WorkloadEntry.
        entry: NamespacedName,
        /// The address it was registered with.
        address: String,
        /// Whether the Session stream is open.
        connected: bool,
    },
    /// Shutting down: deregistering and stopping the sidecar.
    Leaving,
    /// Stopped without leaving ([`OnStop::Stay`]): the entry and the sidecar remain.
    Stopped,
}

/// The session bearer credential. Never printed.
#[derive(Clone)]
struct Session(String);

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Session(<redacted>)")
    }
}

/// How the agent obtains its credential.
enum Identity {
    /// Built from the configuration on every attempt, so a join token file placed (or a
    /// JWT rotated) after the agent started is picked up.
    Config(config::Identity),
    /// A provider given by the embedder.
    Fixed(Arc<dyn Provider>),
}

/// Builds the credential provider the configuration names.
pub fn provider(identity: &config::Identity) -> gangplank_identity::Result<Box<dyn Provider>> {
    Ok(match identity {
        config::Identity::JoinToken { file } => {
            Box::new(gangplank_identity::token::Provider::from_file(file)?)
        }
        config::Identity::JwtFile { file } => {
            Box::new(gangplank_identity::jwt::Provider::from_file(file.clone())?)
        }
        config::Identity::JwtCommand { command } => {
            Box::new(gangplank_identity::jwt::Provider::from_command(command.clone())?)
        }
        config::Identity::Platform { host, urls, key_file } => Box::new(
            gangplank_identity::detect::PlatformProvider::new(*host, urls.clone(), key_file.clone()),
        ),
    })
}

/// The TLS options of the configured endpoint.
pub fn tls_options(endpoint: &config::Endpoint) -> gangplank_tls::ClientOptions {
    gangplank_tls::ClientOptions {
        ca_bundle: endpoint.ca_bundle.clone(),
        sni: endpoint.sni.clone(),
        insecure_skip_verify: endpoint.insecure_skip_verify,
    }
}

/// When to renew a token issued at `issued_at` that expires at `expires_at` (Unix
/// seconds): after `fraction` of its lifetime, counted from `now`. `None` when the
/// endpoint gave no usable lifetime; zero when the renewal time has passed.
pub fn renewal_delay(issued_at: i64, expires_at: i64, now: SystemTime, fraction: f64) -> Option<Duration> {
    if issued_at <= 0 || expires_at <= issued_at {
        return None;
    }
    let renew_at = issued_at as f64 + fraction * (expires_at - issued_at) as f64;
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let delay = renew_at - now;
    Some(if delay > 0.0 {
        Duration::from_secs_f64(delay)
    } else {
        Duration::ZERO
    })
}

/// What a stopping agent does with this VM's place in the mesh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OnStop {
    /// Deregister (Leave: the WorkloadEntry is removed), wait the propagation delay so
    /// traffic drains, stop the sidecar.
    #[default]
    Leave,
    /// Keep the WorkloadEntry and leave the sidecar running: the stop is a restart, a
    /// reboot or an upgrade, and the next agent rejoins with this VM's bound key. An agent
    /// that never comes back is removed by the endpoint after its grace period. What the
    /// packaged systemd unit uses; `gangplank-agent leave` deregisters explicitly.
    Stay,
}

/// The onboarding agent.
pub struct Agent {
    onboarding: config::Onboarding,
    settings: config::Settings,
    channel: Channel,
    identity: Identity,
    launcher: Box<dyn Launcher>,
    readiness: Option<Readiness>,
    writer: files::Writer,
    status: watch::Sender<Status>,
    /// What the status file says (`files.stateDir/status.json`).
    report: watch::Sender<report::Report>,
    /// `files.stateDir`: the registration the VM's key is bound to.
    state_dir: std::path::PathBuf,
    /// Where the VM's bound key is.
    key_path: std::path::PathBuf,
    /// The key, once loaded (or created) by the first onboarding attempt.
    key: Option<Arc<gangplank_identity::bound::Key>>,
    /// What [`Agent::run`] does when it stops.
    on_stop: OnStop,
    /// Onboarding only authenticates (for [`Agent::leave_now`]): no boot file is written,
    /// no sidecar started.
    leave_only: bool,
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("endpoint", &self.onboarding.endpoint.to_string())
            .field("workload_group", &self.onboarding.workload_group)
            .finish_non_exhaustive()
    }
}

/// Everything one life of the agent remembers across reconnects.
#[derive(Debug, Default)]
struct State {
    session: Option<Session>,
    renew_at: Option<Instant>,
    /// The sidecar was started (or an attempt was made) by this agent.
    launched: bool,
    /// The last start or restart failed; retried on every heartbeat.
    launch_pending: bool,
    /// The entry was deleted under the running sidecar: if onboarding again fails, the
    /// sidecar is stopped (it would serve the mesh with no WorkloadEntry).
    entry_removed: bool,
    /// The session was just issued, on the connection the channel still has: its first
    /// stream needs no proof. Any later use may be on a new connection, and proves the
    /// bound key (the endpoint binds a session to the connection it was issued on).
    session_fresh: bool,
    /// How many Session streams this agent opened.
    streams: u64,
}

/// How a Session stream ended.
enum SessionEnd {
    /// The endpoint no longer knows the session: onboard again.
    Reonboard(String),
    /// The stream broke: reopen it with the same session.
    Broken(String),
    /// The endpoint says the entry was deleted: onboard again, or stop the sidecar.
    EntryRemoved(String),
}

impl Agent {
    /// An agent for `config`, talking TLS to the configured endpoint (connects lazily:
    /// nothing is contacted until [`Agent::run`]).
    pub fn new(config: &config::Config) -> Result<Self> {
        let ep = &config.onboarding.endpoint;
        let channel =
            gangplank_tls::channel(&ep.host, ep.port, &tls_options(ep)).map_err(|source| Error::Tls {
                endpoint: ep.to_string(),
                source,
            })?;
        Ok(Self::with_channel(config, channel))
    }

    /// An agent for `config` that reaches the endpoint over `channel` (e.g. plain TCP in
    /// tests). Identity, launcher and file writer come from the configuration.
    pub fn with_channel(config: &config::Config, channel: Channel) -> Self {
        let agent = &config.agent;
        Agent {
            onboarding: config.onboarding.clone(),
            settings: agent.settings,
            channel,
            identity: Identity::Config(agent.identity.clone()),
            launcher: launcher::from_config(agent),
            readiness: agent.sidecar.readiness_url.as_ref().and_then(|url| {
                Readiness::new(url)
                    .inspect_err(|e| tracing::error!("{e}; the sidecar's health is the launcher's alone"))
                    .ok()
            }),
            writer: files::Writer::new(agent.files.clone(), &agent.sidecar.proxy_user),
            status: watch::channel(Status::Onboarding { last_error: None }).0,
            report: watch::channel(report::Report::starting(config)).0,
            state_dir: agent.files.state_dir.clone(),
            key_path: crate::state::key_path(agent),
            key: None,
            on_stop: OnStop::default(),
            leave_only: false,
        }
    }

    /// What [`Agent::run`] does when its shutdown completes (default: [`OnStop::Leave`]).
    pub fn with_on_stop(mut self, on_stop: OnStop) -> Self {
        self.on_stop = on_stop;
        self
    }

    /// Uses `provider` for credentials instead of the configured identity.
    pub fn with_provider(mut self, provider: Arc<dyn Provider>) -> Self {
        self.identity = Identity::Fixed(provider);
        self
    }

    /// Uses `launcher` instead of the configured one.
    pub fn with_launcher(mut self, launcher: Box<dyn Launcher>) -> Self {
        self.launcher = launcher;
        self
    }

    /// Uses `writer` instead of the configured one.
    pub fn with_writer(mut self, writer: files::Writer) -> Self {
        self.writer = writer;
        self
    }

    /// Follows what the agent is doing.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// Changes what the status file says (written later, off this task, if it changed).
    fn report(&self, change: impl FnOnce(&mut report::Report)) {
        self.report.send_if_modified(|r| {
            let before = r.clone();
            change(r);
            *r != before
        });
    }

    /// What the status file would say about the sidecar token once `files` are written:
    /// `None` when they hold no token.
    fn expiry(&self, files: &[proto::BootFile], fallback: i64) -> Option<Option<report::Token>> {
        let has_token = files.iter().any(|f| Name::parse(&f.name) == Some(Name::Token));
        has_token.then(|| {
            let mut r = self.report.borrow().clone();
            r.token(files, fallback);
            r.sidecar_token
        })
    }

    /// Runs until `shutdown` completes, then deregisters (Leave), waits the propagation
    /// delay, and stops the sidecar. `Ok` only when that all succeeded. Meanwhile
    /// `files.stateDir/status.json` says what the agent is doing.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let keeper = tokio::spawn(report::keep(self.state_dir.clone(), self.report.subscribe()));
        let final_report = self.report.clone();
        let result = self.run_until(shutdown).await;
        final_report.send_modify(|r| {
            r.phase = Phase::Stopped;
            r.session = None;
            if let Err(e) = &result {
                r.error(e.to_string());
            }
        });
        drop(final_report);
        if tokio::time::timeout(STATUS_FINISH, keeper).await.is_err() {
            tracing::warn!(timeout = ?STATUS_FINISH, "the final status was not written in time");
        }
        result
    }

    async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let mut state = State::default();
        tracing::info!(
            endpoint = %self.onboarding.endpoint,
            workload_group = %self.onboarding.workload_group,
            version = gangplank_api::VERSION,
            "gangplank-agent starting"
        );
        // A shutdown waits for an onboarding in flight (bounded): its entry is then known and
        // left, and its registration saved, instead of an entry nobody can remove and a
        // first-join credential spent for nothing.
        let (stop, stopping) = watch::channel(false);
        {
            let serve = self.serve(&mut state, stopping);
            tokio::pin!(serve);
            tokio::select! {
                biased;
                () = shutdown => {
                    let _ = stop.send(true);
                    if tokio::time::timeout(ONBOARD_FINISH, &mut serve).await.is_err() {
                        tracing::warn!(timeout = ?ONBOARD_FINISH, "the onboarding in flight did not finish; leaving without it");
                    }
                }
                () = &mut serve => {}
            }
        }
        match self.on_stop {
            OnStop::Leave => self.leave(state).await,
            OnStop::Stay => {
                self.status.send_replace(Status::Stopped);
                match &state.session {
                    Some(_) => tracing::info!(
                        "stopping; this VM stays registered and its sidecar keeps running (on-stop=stay): the next agent rejoins with its bound key"
                    ),
                    None => tracing::info!("stopping before this VM was registered"),
                }
                Ok(())
            }
        }
    }

    /// Deregisters this VM now without serving it (`gangplank-agent leave`, run by the
    /// packages on removal while the agent is stopped): rejoins with the VM's bound key —
    /// never with the first-join credential —, then Leaves and stops the sidecar, within
    /// `timeout`. `Ok(false)` when this VM holds no registration for its WorkloadGroup
    /// (nothing to leave).
    pub async fn leave_now(mut self, timeout: Duration) -> Result<bool> {
        let endpoint = self.onboarding.endpoint.to_string();
        let Some(registration) = crate::state::Registration::load(&self.state_dir)
            .filter(|r| r.is_for(&self.onboarding.workload_group))
        else {
            tracing::info!("this VM holds no registration for its WorkloadGroup: nothing to leave");
            return Ok(false);
        };
        tracing::info!(workload_entry = %registration.entry, "deregistering this VM");
        self.leave_only = true;
        let mut state = State::default();
        let joined = tokio::time::timeout(timeout, self.onboard_once(&mut state))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
        if let Err(message) = joined {
            if crate::state::Registration::load(&self.state_dir).is_none() {
                // The endpoint no longer knows the binding (released, or expired): the
                // entry is already gone or will be swept.
                tracing::info!("the endpoint no longer knows this VM: nothing to leave ({message})");
                return Ok(false);
            }
            return Err(Error::Leave { endpoint, message });
        }
        // The sidecar this VM's agents started is stopped too: it would serve the mesh
        // with no WorkloadEntry and a token nobody renews.
        state.launched = true;
        let state_dir = self.state_dir.clone();
        self.leave(state).await?;
        // Left on purpose: joining again is a new first join (a later `leave` has nothing
        // to do, instead of rejoining only to leave). The key stays; a purge removes it.
        crate::state::Registration::forget(&state_dir);
        Ok(true)
    }

    /// Onboards and keeps the session until `stopping` turns true; returns at a safe point
    /// (never inside an Onboard call).
    async fn serve(&mut self, state: &mut State, mut stopping: watch::Receiver<bool>) {
        while !*stopping.borrow() {
            self.onboard(state, &mut stopping).await;
            if *stopping.borrow() {
                return;
            }
            tokio::select! {
                () = self.sessions(state) => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
        }
    }

    /// Onboards, retrying until it succeeds or the agent is stopping.
    async fn onboard(&mut self, state: &mut State, stopping: &mut watch::Receiver<bool>) {
        let mut backoff = Backoff::new(self.settings.retry);
        loop {
            if *stopping.borrow() {
                return;
            }
            match self.onboard_once(state).await {
                Ok(()) => return,
                Err(message) => {
                    if std::mem::take(&mut state.entry_removed) && state.launched {
                        tracing::error!(
                            "stopping the sidecar: its WorkloadEntry was deleted and onboarding again failed: {message}"
                        );
                        if let Err(e) = self.launcher.stop().await {
                            tracing::error!(error = %e, "cannot stop the sidecar");
                        }
                        state.launched = false;
                        state.launch_pending = false;
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(retry_in = ?delay, "onboarding failed: {message}");
                    self.report(|r| {
                        r.phase = Phase::Onboarding;
                        r.session = None;
                        r.error(&message);
                    });
                    self.status.send_replace(Status::Onboarding {
                        last_error: Some(message),
                    });
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = stopping.wait_for(|s| *s) => return,
                    }
                }
            }
        }
    }

    async fn onboard_once(&mut self, state: &mut State) -> std::result::Result<(), String> {
        let endpoint = self.onboarding.endpoint.to_string();
        let group = &self.onboarding.workload_group;
        let mut client = OnboardingClient::new(self.channel.clone());

        let discovered = client
            .discover(proto::DiscoverRequest {})
            .await
            .map_err(|s| {
                format!(
                    "cannot reach the onboarding endpoint {endpoint}: {}",
                    describe(&s)
                )
            })?
            .into_inner();
        tracing::debug!(plane = %discovered.plane_id, kinds = ?discovered.credential_kinds, "discovered the onboarding plane");
        let challenge = Challenge {
            plane_id: discovered.plane_id,
            nonce: discovered.nonce,
            aws_sts_url: discovered.aws_sts_url,
        };

        let key = match &self.key {
            Some(key) => key.clone(),
            None => {
                let loaded = gangplank_identity::bound::Key::load_or_create(&self.key_path)
                    .map_err(|e| format!("cannot load this VM's key: {e}"))?;
                self.key.insert(Arc::new(loaded)).clone()
            }
        };
        let bound = crate::state::Registration::load(&self.state_dir).filter(|r| {
            let mine = r.is_for(group);
            if !mine {
                tracing::info!(registered = %r.workload_group, "the saved registration is for another WorkloadGroup; joining with the first-join credential");
            }
            mine
        });
        let credential = match &bound {
            Some(registration) => {
                tracing::info!(workload_entry = %registration.entry, "rejoining with this VM's bound key");
                key.rejoin(&challenge, group, &registration.entry)
            }
            None => match &self.identity {
                Identity::Fixed(p) => p.credential(&challenge).await,
                Identity::Config(c) => match provider(c) {
                    Ok(p) => p.credential(&challenge).await,
                    Err(e) => Err(e),
                },
            }
            .map(|mut c| {
                key.attach(&mut c, &challenge);
                c
            }),
        }
        .map_err(|e| format!("cannot obtain this host's credential: {e}"))?;
        if !discovered.credential_kinds.is_empty() && !discovered.credential_kinds.contains(&credential.kind)
        {
            tracing::warn!(
                kind = %credential.kind,
                accepted = ?discovered.credential_kinds,
                "the endpoint does not list this credential kind; trying anyway"
            );
        }

        let facts = host::facts(&self.onboarding).await;
        tracing::debug!(hostname = %facts.hostname, addresses = ?facts.addresses, "host facts");
        let response = client
            .onboard(proto::OnboardRequest {
                workload_group: Some(proto::WorkloadGroupRef {
                    namespace: group.namespace.clone(),
                    name: group.name.clone(),
                }),
                credential: Some(credential),
                nonce: challenge.nonce.clone(),
                host: Some(facts),
            })
            .await
            .map_err(|s| {
                if bound.is_some() && s.code() == tonic::Code::Unauthenticated {
                    // Released, expired, or never made on this plane: the next attempt uses
                    // the first-join credential.
                    crate::state::Registration::forget(&self.state_dir);
                }
                onboard_refused(&s, group, &endpoint)
            })?
            .into_inner();
        let registration = response.registration.ok_or_else(|| {
            format!("the endpoint {endpoint} returned no registration: this is an endpoint bug")
        })?;
        if registration.session.is_empty() {
            return Err(format!(
                "the endpoint {endpoint} returned no session: this is an endpoint bug"
            ));
        }
        let entry = NamespacedName::new(registration.namespace.clone(), registration.name.clone());
        tracing::info!(
            workload_entry = %entry,
            address = %registration.address,
            identity = %registration.identity,
            "onboarded"
        );

        let saved = crate::state::Registration {
            workload_group: group.to_string(),
            entry: entry.name.clone(),
            endpoint: endpoint.clone(),
        };
        if bound.as_ref() != Some(&saved)
            && let Err(e) = saved.save(&self.state_dir)
        {
            tracing::error!(
                "cannot save the registration ({e}): a restarted agent needs a new first-join credential"
            );
        }
        state.entry_removed = false;

        // Registered: from here on, shutdown deregisters even if the files fail below.
        state.session = Some(Session(registration.session));
        state.session_fresh = true;
        state.renew_at = self.renewal(response.token_issued_at, response.token_expires_at);
        self.report(|r| {
            r.phase = Phase::Registered;
            r.entry = Some(entry.to_string());
            r.address = Some(registration.address.clone());
            r.token(&response.files, response.token_expires_at);
        });
        self.status.send_replace(Status::Registered {
            entry,
            address: registration.address,
            connected: false,
        });

        if self.leave_only {
            return Ok(());
        }
        let changed = self.write(response.files).await?;
        self.launch(state, &changed).await;
        Ok(())
    }

    async fn write(&self, boot: Vec<proto::BootFile>) -> std::result::Result<Changed, String> {
        let writer = self.writer.clone();
        let changed = tokio::task::spawn_blocking(move || writer.write(&boot))
            .await
            .map_err(|e| format!("writing the boot files panicked: {e}"))?
            .map_err(|e| format!("cannot write the sidecar's boot files: {e}"))?;
        if !changed.is_empty() {
            tracing::info!(changed = %changed, "boot files written");
        }
        Ok(changed)
    }

    /// Starts the sidecar the first time, restarts it when its files changed (or the last
    /// attempt failed). A failure is reported as health and retried on the next heartbeat.
    async fn launch(&mut self, state: &mut State, changed: &Changed) {
        let result = if !state.launched {
            state.launched = true;
            if changed.needs_restart() {
                self.launcher.restart().await
            } else {
                self.launcher.start().await
            }
        } else if changed.needs_restart() || state.launch_pending {
            self.launcher.restart().await
        } else {
            return;
        };
        match result {
            Ok(()) => {
                state.launch_pending = false;
                tracing::info!("sidecar started");
            }
            Err(e) => {
                state.launch_pending = true;
                tracing::error!(error = %e, "cannot start the sidecar; retrying on the next heartbeat");
                self.report(|r| r.error(format!("cannot start the sidecar: {e}")));
            }
        }
    }

    fn renewal(&self, issued_at: i64, expires_at: i64) -> Option<Instant> {
        let delay = renewal_delay(
            issued_at,
            expires_at,
            SystemTime::now(),
            self.settings.token_renewal,
        );
        match delay {
            Some(d) => tracing::debug!(renew_in = ?d, "token renewal scheduled"),
            None => tracing::debug!("the endpoint gave no token lifetime; no renewal scheduled"),
        }
        delay.map(|d| Instant::now() + d)
    }

    /// Keeps a Session stream open until the endpoint forgets the session.
    async fn sessions(&mut self, state: &mut State) {
        let mut backoff = Backoff::new(self.settings.retry);
        loop {
            match self.session(state, &mut backoff).await {
                SessionEnd::Reonboard(why) => {
                    tracing::warn!(
                        "the endpoint no longer knows this agent's session ({why}); onboarding again"
                    );
                    state.session = None;
                    self.set_connected(false);
                    self.report(|r| {
                        r.phase = Phase::Onboarding;
                        r.session = None;
                        r.error(format!(
                            "the endpoint no longer knows this agent's session: {why}"
                        ));
                    });
                    return;
                }
                SessionEnd::EntryRemoved(why) => {
                    tracing::warn!("{why}; onboarding again");
                    state.session = None;
                    state.entry_removed = true;
                    self.set_connected(false);
                    self.report(|r| {
                        r.phase = Phase::Onboarding;
                        r.session = None;
                        r.error(&why);
                    });
                    return;
                }
                SessionEnd::Broken(why) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(retry_in = ?delay, "session with the onboarding endpoint lost: {why}");
                    self.set_connected(false);
                    self.report(|r| {
                        r.phase = Phase::Reconnecting;
                        r.session = None;
                        r.error(format!("session with the onboarding endpoint lost: {why}"));
                    });
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    fn set_connected(&self, connected: bool) {
        self.status.send_if_modified(|s| match s {
            Status::Registered { connected: c, .. } if *c != connected => {
                *c = connected;
                true
            }
            _ => false,
        });
    }

    async fn session(&mut self, state: &mut State, backoff: &mut Backoff) -> SessionEnd {
        let Some(session) = state.session.clone() else {
            return SessionEnd::Reonboard("no session".to_owned());
        };
        let mut client = OnboardingClient::new(self.channel.clone());
        let proof = if std::mem::take(&mut state.session_fresh) {
            None
        } else {
            match self.session_proof(&session).await {
                Ok(p) => p,
                Err(why) => return SessionEnd::Broken(why),
            }
        };
        let (tx, rx) = mpsc::channel::<proto::AgentMessage>(16);
        let request = match authorized(ReceiverStream::new(rx), &session, proof.as_ref()) {
            Ok(r) => r,
            Err(why) => return SessionEnd::Reonboard(why),
        };
        let mut inbound = match client.session(request).await {
            Ok(r) => r.into_inner(),
            Err(status) => return session_end(&status),
        };
        state.streams += 1;
        let generation = state.streams;

        let configured = self.settings.heartbeat;
        let heartbeat_every = move |seconds: u32| {
            configured.unwrap_or(if seconds > 0 {
                Duration::from_secs(u64::from(seconds))
            } else {
                DEFAULT_HEARTBEAT
            })
        };
        let every = heartbeat_every(0);
        let mut heartbeat = ticker(every);
        let mut health_poll = tokio::time::interval(HEALTH_POLL);
        health_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported: Option<Health> = None;

        loop {
            let renew_at = state.renew_at;
            let renew = async move {
                match renew_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(m)) => {
                        let Some(kind) = m.kind else { continue };
                        match kind {
                            proto::endpoint_message::Kind::Welcome(w) => {
                                let every = heartbeat_every(w.heartbeat_seconds);
                                heartbeat = ticker(every);
                                backoff.reset();
                                self.set_connected(true);
                                self.report(|r| {
                                    r.phase = Phase::Connected;
                                    r.session = Some(report::Session {
                                        connected_since: report::rfc3339(SystemTime::now()),
                                        generation,
                                        replica: w.replica.clone(),
                                    });
                                });
                                tracing::info!(replica = %w.replica, heartbeat = ?every, "session open");
                            }
                            proto::endpoint_message::Kind::TokenRenewed(t) => self.token_renewed(state, t).await,
                            proto::endpoint_message::Kind::EntryRemoved(r) => return SessionEnd::EntryRemoved(r.reason),
                            proto::endpoint_message::Kind::ConfigChanged(c) => {
                                tracing::info!("the endpoint sent new boot configuration");
                                let expiry = self.expiry(&c.files, 0);
                                match self.write(c.files).await {
                                    Ok(changed) => {
                                        if let Some(expiry) = expiry {
                                            self.report(|r| r.sidecar_token = expiry);
                                        }
                                        self.launch(state, &changed).await;
                                    }
                                    Err(e) => {
                                        tracing::error!("{e}");
                                        self.report(|r| r.error(&e));
                                    }
                                }
                            }
                        }
                    }
                    Ok(None) => return SessionEnd::Broken("the endpoint closed the stream".to_owned()),
                    Err(status) => return session_end(&status),
                },
                _ = heartbeat.tick() => {
                    if state.launch_pending {
                        self.launch(state, &Changed::default()).await;
                    }
                    if send(&tx, proto::agent_message::Kind::Heartbeat(proto::Heartbeat {})).await.is_err() {
                        return SessionEnd::Broken("the stream to the endpoint closed".to_owned());
                    }
                }
                () = renew => {
                    tracing::info!("renewing the sidecar token");
                    // Ask again later if no TokenRenewed arrives.
                    state.renew_at = Some(Instant::now() + self.settings.retry.max);
                    if send(&tx, proto::agent_message::Kind::RenewToken(proto::RenewToken {})).await.is_err() {
                        return SessionEnd::Broken("the stream to the endpoint closed".to_owned());
                    }
                }
                _ = health_poll.tick() => {
                    let health = match &self.readiness {
                        Some(probe) => probe.check(self.launcher.health()).await,
                        None => self.launcher.health(),
                    };
                    if reported.as_ref() != Some(&health) {
                        tracing::info!(healthy = health.is_healthy(), "sidecar health: {}", health.message());
                        self.report(|r| r.health(&health));
                        let message = proto::Health { healthy: health.is_healthy(), message: health.message() };
                        if send(&tx, proto::agent_message::Kind::Health(message)).await.is_err() {
                            return SessionEnd::Broken("the stream to the endpoint closed".to_owned());
                        }
                        reported = Some(health);
                    }
                }
            }
        }
    }

    /// The bound key's proof that lets `session` be used on whatever connection the channel
    /// has now: a nonce from Discover on it, signed with the session. `None` without a key.
    async fn session_proof(&self, session: &Session) -> std::result::Result<Option<SessionProof>, String> {
        let Some(key) = &self.key else { return Ok(None) };
        let discovered = OnboardingClient::new(self.channel.clone())
            .discover(proto::DiscoverRequest {})
            .await
            .map_err(|s| format!("cannot reach the onboarding endpoint: {}", describe(&s)))?
            .into_inner();
        let challenge = Challenge {
            plane_id: discovered.plane_id,
            nonce: discovered.nonce,
            aws_sts_url: String::new(),
        };
        let proof = key.prove_session(&challenge, &session.0);
        Ok(Some(SessionProof {
            nonce: challenge.nonce,
            proof,
        }))
    }

    async fn token_renewed(&mut self, state: &mut State, renewed: proto::TokenRenewed) {
        let Some(token) = renewed.token else {
            tracing::warn!("the endpoint sent TokenRenewed without a token; asking again later");
            return;
        };
        if Name::parse(&token.name) != Some(Name::Token) {
            tracing::warn!(name = %token.name, "the endpoint sent TokenRenewed with a file that is not istio-token; ignored");
            return;
        }
        let files = vec![token];
        let expiry = self.expiry(&files, renewed.expires_at);
        match self.write(files).await {
            Ok(_) => {
                tracing::info!("sidecar token renewed");
                state.renew_at = self.renewal(renewed.issued_at, renewed.expires_at);
                if let Some(expiry) = expiry {
                    self.report(|r| r.sidecar_token = expiry);
                }
            }
            Err(e) => {
                tracing::error!("{e}; asking again later");
                self.report(|r| r.error(format!("{e}; asking again later")));
            }
        }
    }

    async fn leave(mut self, state: State) -> Result<()> {
        self.status.send_replace(Status::Leaving);
        self.report(|r| r.phase = Phase::Leaving);
        let endpoint = self.onboarding.endpoint.to_string();
        let mut failure = None;
        if let Some(session) = &state.session {
            tracing::info!("deregistering from the mesh");
            // The channel may have reconnected since the session was issued. Without a proof
            // the Leave is still tried (on the session's own connection it needs none).
            let proof = match tokio::time::timeout(LEAVE_TIMEOUT, self.session_proof(session)).await {
                Ok(Ok(proof)) => proof,
                Ok(Err(why)) => {
                    tracing::warn!("cannot prove this VM's key for Leave: {why}");
                    None
                }
                Err(_) => {
                    tracing::warn!(timeout = ?LEAVE_TIMEOUT, "no nonce from the endpoint for Leave's proof in time");
                    None
                }
            };
            let mut client = OnboardingClient::new(self.channel.clone());
            match authorized(proto::LeaveRequest {}, session, proof.as_ref()) {
                Err(why) => failure = Some(why),
                Ok(request) => match tokio::time::timeout(LEAVE_TIMEOUT, client.leave(request)).await {
                    Ok(Ok(response)) => {
                        let delay =
                            Duration::from_secs(u64::from(response.into_inner().propagation_delay_seconds));
                        tracing::info!(
                            ?delay,
                            "deregistered; waiting for the change to reach the mesh before stopping the sidecar"
                        );
                        tokio::time::sleep(delay).await;
                    }
                    Ok(Err(status)) => failure = Some(describe(&status)),
                    Err(_) => failure = Some(format!("no answer within {LEAVE_TIMEOUT:?}")),
                },
            }
        }
        let stopped = if state.launched {
            self.launcher.stop().await
        } else {
            Ok(())
        };
        self.report(|r| {
            r.health(&self.launcher.health());
            r.session = None;
        });
        if let Some(message) = failure {
            if let Err(e) = &stopped {
                tracing::error!(error = %e, "cannot stop the sidecar");
            }
            return Err(Error::Leave { endpoint, message });
        }
        stopped.map_err(Error::Stop)?;
        tracing::info!("sidecar stopped; goodbye");
        Ok(())
    }
}

/// Runs the agent for `config` until `shutdown` completes (see [`Agent::run`]).
pub async fn run(config: config::Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    Agent::new(&config)?.run(shutdown).await
}

/// An interval whose first tick is one period away and that never bursts after a stall.
fn ticker(every: Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval_at(Instant::now() + every, every);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

async fn send(
    tx: &mpsc::Sender<proto::AgentMessage>,
    kind: proto::agent_message::Kind,
) -> std::result::Result<(), ()> {
    tx.send(proto::AgentMessage { kind: Some(kind) })
        .await
        .map_err(|_| ())
}

/// A nonce and the bound key's signature of it with the session.
struct SessionProof {
    nonce: String,
    proof: String,
}

fn authorized<T>(
    message: T,
    session: &Session,
    proof: Option<&SessionProof>,
) -> std::result::Result<tonic::Request<T>, String> {
    use gangplank_identity::bound::{SESSION_NONCE_HEADER, SESSION_PROOF_HEADER};
    let header = |text: String| {
        tonic::metadata::MetadataValue::try_from(text)
            .map_err(|_| "the endpoint's session or nonce is not a valid header value".to_owned())
    };
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", header(format!("Bearer {}", session.0))?);
    if let Some(p) = proof {
        request
            .metadata_mut()
            .insert(SESSION_NONCE_HEADER, header(p.nonce.clone())?);
        request
            .metadata_mut()
            .insert(SESSION_PROOF_HEADER, header(p.proof.clone())?);
    }
    Ok(request)
}

fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// Why an Onboard was refused, for the log. Every code is retried: the group, a policy or
/// the endpoint itself may be fixed while the agent waits.
fn onboard_refused(status: &tonic::Status, group: &NamespacedName, endpoint: &str) -> String {
    use tonic::Code;
    let hint = match status.code() {
        Code::PermissionDenied => "no OnboardingPolicy allows this host yet; retrying until one does",
        Code::NotFound => "retrying until the WorkloadGroup exists",
        Code::FailedPrecondition => "retrying until the endpoint's precondition holds",
        Code::InvalidArgument => "retrying in case the endpoint is fixed; check the onboarding configuration",
        Code::Unauthenticated => "the credential was refused; check identity in the agent configuration",
        // Unreachable, or reached but unable to finish (its registry, an issuer's JWKS, a CA
        // or the Kubernetes API is down): the endpoint's operator has to act, not this VM's.
        Code::Unavailable => {
            "the endpoint, or something it depends on, is unavailable: nothing to change on this VM; retrying"
        }
        _ => "retrying",
    };
    format!(
        "onboarding into WorkloadGroup {group} at {endpoint} refused: {} ({hint})",
        describe(status)
    )
}

fn session_end(status: &tonic::Status) -> SessionEnd {
    match status.code() {
        // The entry is gone (deleted before the stream could tell it): as EntryRemoved.
        tonic::Code::NotFound => SessionEnd::EntryRemoved(describe(status)),
        tonic::Code::Unauthenticated => SessionEnd::Reonboard(describe(status)),
        _ => SessionEnd::Broken(describe(status)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn renewal_happens_at_the_configured_fraction_of_the_lifetime() {
        // Issued at 1000, expires at 4600 (1h): 70% is 2520 s after issue.
        assert_eq!(
            renewal_delay(1000, 4600, at(1000), 0.7),
            Some(Duration::from_secs(2520))
        );
        // Counted from now, not from the issue time.
        assert_eq!(
            renewal_delay(1000, 4600, at(1520), 0.7),
            Some(Duration::from_secs(2000))
        );
        assert_eq!(
            renewal_delay(1000, 1100, at(1000), 0.5),
            Some(Duration::from_secs(50))
        );
        let fraction = renewal_delay(
            1000,
            1100,
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_000_250),
            0.7,
        )
        .expect("scheduled");
        assert_eq!(fraction, Duration::from_millis(69_750));
    }

    #[test]
    fn overdue_renewal_is_immediate_and_missing_lifetime_is_none() {
        assert_eq!(renewal_delay(1000, 1100, at(1090), 0.7), Some(Duration::ZERO));
        assert_eq!(renewal_delay(1000, 1100, at(5000), 0.7), Some(Duration::ZERO));
        assert_eq!(renewal_delay(0, 0, at(5000), 0.7), None);
        assert_eq!(renewal_delay(1000, 1000, at(1000), 0.7), None);
        assert_eq!(renewal_delay(1000, 900, at(1000), 0.7), None);
    }

    #[test]
    fn session_is_never_printed() {
        let s = Session("secret-session-token".into());
        assert!(!format!("{s:?}").contains("secret"));
        let request = authorized((), &s, None).expect("header");
        assert_eq!(
            request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer secret-session-token")
        );
        assert!(authorized((), &Session("bad\nvalue".into()), None).is_err());
    }

    #[test]
    fn session_errors_are_classified() {
        assert!(matches!(
            session_end(&tonic::Status::unauthenticated("expired")),
            SessionEnd::Reonboard(_)
        ));
        assert!(matches!(
            session_end(&tonic::Status::not_found("gone")),
            SessionEnd::EntryRemoved(_)
        ));
        assert!(matches!(
            session_end(&tonic::Status::unavailable("down")),
            SessionEnd::Broken(_)
        ));
        let m = onboard_refused(
            &tonic::Status::permission_denied("no OnboardingPolicy in bookinfo allows jwt subject \"vm-7\""),
            &NamespacedName::new("bookinfo", "ratings"),
            "h:15443",
        );
        assert!(
            m.contains("bookinfo/ratings") && m.contains("vm-7") && m.contains("PermissionDenied"),
            "{m}"
        );
    }
}
