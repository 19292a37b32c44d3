//! The `Onboarding` gRPC service: Discover, Onboard, Session, Leave, and Check (what Onboard
//! would decide, for `gangplank-agent doctor`).
//!
//! Every refusal is a gRPC status whose message says what to change; credentials never
//! appear in a message or a log line.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::Stream;
use gangplank_api::binding::{WorkloadBinding, WorkloadBindingSpec, WorkloadBindingStatus};
use gangplank_api::istio::WorkloadEntry;
use gangplank_api::meta::OwnerReference;
use gangplank_api::names::{annotation, label};
use gangplank_api::proto::onboarding_server::Onboarding;
use gangplank_api::proto::{self, agent_message, endpoint_message};
use gangplank_api::{NamespacedName, Resource};
use gangplank_identity::Challenge;
use gangplank_registry::AnnotationPatch;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::keys::{Keys, NONCE_TTL};
use crate::plane::{Live, Plane, now_rfc3339, registry_status};
use crate::server::Connection;

/// Largest credential payload accepted (a JWT or a signed document is far smaller).
const MAX_CREDENTIAL: usize = 64 * 1024;
/// How long a stream told EntryRemoved stays open for the agent to read it and close.
const REMOVED_LINGER: std::time::Duration = std::time::Duration::from_secs(5);
/// Lifetime of an agent session token; the entry's session annotation is what really ends it.
const SESSION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// What a request is before anything is written for it: verified and judged by policy.
struct Assessed {
    group: gangplank_api::istio::WorkloadGroup,
    identity: gangplank_identity::Identity,
    host: proto::HostFacts,
    credential: proto::Credential,
    challenge: Challenge,
    verifier: Arc<dyn gangplank_identity::Verifier>,
    decision: gangplank_policy::Decision,
}

impl Assessed {
    /// Whether the credential is a rejoin with the VM's bound key.
    fn rejoin(&self) -> bool {
        self.credential.kind == gangplank_api::kind::BOUND_KEY
    }
}

/// The service.
#[derive(Clone)]
pub struct Service {
    plane: Arc<Plane>,
    generation: Arc<AtomicU64>,
}

impl Service {
    /// A service over `plane`.
    pub fn new(plane: Arc<Plane>) -> Self {
        Self {
            plane,
            generation: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Checks the bearer session of a Session or Leave call and that it is the entry's
    /// current session.
    async fn authenticate<T>(&self, request: &Request<T>) -> Result<(NamespacedName, WorkloadEntry), Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("missing `authorization: Bearer <session>`: onboard first")
            })?;
        let session = self
            .plane
            .keys
            .verify_session(header)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let key: NamespacedName = session
            .sub
            .parse()
            .map_err(|_| Status::unauthenticated("session names no WorkloadEntry: onboard again"))?;
        // (A service embedded without the TLS server sees no connections, and binds to none.)
        let here = request.extensions().get::<Connection>().map(Connection::id);
        if here.unwrap_or_default() != session.cnx {
            self.check_moved_session(request, &key, header).await?;
        }
        let entry = self.plane.registry.entry(&key).await.map_err(registry_status)?.ok_or_else(|| {
            Status::not_found(format!("WorkloadEntry {key} no longer exists (removed after a disconnect or by an admin): onboard again"))
        })?;
        let current = entry
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(annotation::SESSION));
        if current.map(String::as_str) != Some(session.jti.as_str()) {
            return Err(Status::unauthenticated(format!(
                "WorkloadEntry {key} was onboarded again by a newer session; this session is over: onboard again"
            )));
        }
        Ok((key, entry))
    }

    /// Lets a session be used on a connection other than the one it was issued on (the
    /// agent reconnected, or reached another replica) only with a proof by the VM's bound
    /// key over a fresh nonce of this replica: a copied session token alone opens no stream
    /// and deregisters nothing.
    async fn check_moved_session<T>(
        &self,
        request: &Request<T>,
        key: &NamespacedName,
        session: &str,
    ) -> Result<(), Status> {
        use gangplank_identity::bound::{SESSION_NONCE_HEADER, SESSION_PROOF_HEADER};
        let refuse = |why: &str| {
            let reference = reference_id();
            tracing::warn!(%reference, entry = %key, "session refused on a new connection: {why}");
            Status::unauthenticated(format!(
                "this session was issued on another connection; on a new one it needs a proof by the VM's bound key (reference {reference}): onboard again"
            ))
        };
        let header = |name: &str| request.metadata().get(name).and_then(|v| v.to_str().ok());
        let (Some(nonce), Some(proof)) = (header(SESSION_NONCE_HEADER), header(SESSION_PROOF_HEADER)) else {
            return Err(refuse("no bound-key proof"));
        };
        self.plane
            .keys
            .check_nonce(nonce)
            .map_err(|e| refuse(&e.to_string()))?;
        let binding = self
            .plane
            .registry
            .binding(key)
            .await
            .map_err(registry_status)?
            .ok_or_else(|| refuse("the entry has no bound key"))?;
        let challenge = Challenge {
            plane_id: self.plane.config.file.plane_id.clone(),
            nonce: nonce.to_owned(),
            ..Default::default()
        };
        if !gangplank_identity::bound::check_session_proof(
            &binding.spec.public_key,
            &challenge,
            session,
            proof,
        ) {
            return Err(refuse(
                "the proof is not the bound key's signature of this session and nonce",
            ));
        }
        Ok(())
    }

    /// What Onboard and Check both do before anything is written: the request's shape, the
    /// nonce, the credential (verified before anything else, so an unauthenticated caller
    /// learns nothing about groups), the group, the addresses it allows, and policy.
    async fn assess(&self, req: proto::OnboardRequest) -> Result<Assessed, Status> {
        let plane = &self.plane;
        let group_ref = req.workload_group.ok_or_else(|| {
            Status::invalid_argument(
                "workload_group is required: set workloadGroup.namespace and .name in the agent config",
            )
        })?;
        let group_key = NamespacedName::new(group_ref.namespace, group_ref.name);
        if !gangplank_api::meta::is_dns1123_label(&group_key.namespace)
            || !gangplank_api::meta::is_dns1123_subdomain(&group_key.name)
        {
            return Err(Status::invalid_argument(format!(
                "workload group {group_key:?} is not a valid namespace/name (lower-case DNS names)"
            )));
        }
        let credential = req
            .credential
            .ok_or_else(|| Status::invalid_argument("credential is required"))?;
        if credential.payload.len() + credential.proof.len() + credential.public_key.len() > MAX_CREDENTIAL {
            return Err(Status::invalid_argument(format!(
                "credential is larger than {MAX_CREDENTIAL} bytes"
            )));
        }
        let host = req.host.unwrap_or_default();
        // Syntactic, so before the nonce is spent and the credential verified.
        crate::facts::check(&host)?;
        plane
            .keys
            .check_nonce(&req.nonce)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let verifier = plane
            .verifiers
            .get(credential.kind.as_str())
            .cloned()
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "credential kind {:?} is not accepted by this endpoint (accepted: {})",
                    credential.kind,
                    plane.kinds().join(", ")
                ))
            })?;

        let challenge = Challenge {
            plane_id: plane.config.file.plane_id.clone(),
            nonce: req.nonce.clone(),
            ..Default::default()
        };
        let identity = verifier
            .verify(&credential, &challenge, &group_key)
            .await
            .map_err(identity_status)?;

        let group = plane.registry.workload_group(&group_key).await.map_err(registry_status)?.ok_or_else(|| {
            Status::not_found(format!(
                "WorkloadGroup {group_key} not found: create it, or fix workloadGroup in the agent's onboarding config"
            ))
        })?;
        // Which addresses the group allows is its admin's choice; checked before policy, so
        // a refusal names the address whatever the policy says.
        crate::facts::Allowed::of(&group)?.check(&host, identity.address)?;
        let policies = plane
            .registry
            .policies(&group_key.namespace)
            .await
            .map_err(registry_status)?;
        let decision = gangplank_policy::evaluate(&policies, &group, &identity);
        Ok(Assessed {
            group,
            identity,
            host,
            credential,
            challenge,
            verifier,
            decision,
        })
    }

    /// The entry an allowed request gets (its session annotation `session_id`), and the key
    /// the VM proves itself with from now on: the rejoin's, the one the AWS verifier
    /// checked, or the one a first join carries (checked here).
    fn admit(&self, a: &Assessed, session_id: &str) -> Result<(WorkloadEntry, Option<String>), Status> {
        let entry = self.plane.entry(&a.group, &a.identity, &a.host, session_id)?;
        let agent_key = match &a.identity.facts {
            _ if a.rejoin() => Some(gangplank_identity::bound::encode_public_key(
                &a.credential.public_key,
            )),
            gangplank_identity::Facts::Aws(f) => Some(f.agent_public_key.clone()).filter(|k| !k.is_empty()),
            _ => gangplank_identity::bound::check_first_join_proof(&a.credential, &a.challenge)
                .map_err(identity_status)?,
        };
        Ok((entry, agent_key))
    }

    /// Check: what Onboard would decide, with nothing spent or written.
    async fn check_inner(&self, req: proto::OnboardRequest) -> Result<proto::CheckResponse, Status> {
        let a = self.assess(req).await?;
        let mut response = proto::CheckResponse {
            explanation: a.decision.to_string(),
            identity: a.identity.to_string(),
            ..Default::default()
        };
        if let gangplank_policy::Decision::Allowed { policy, rule } = &a.decision {
            // The session id is the only part of the entry that is new at every onboarding;
            // this one is thrown away with the entry.
            let (entry, _) = self.admit(&a, "")?;
            let key = entry.key();
            response.allowed = true;
            response.policy = policy.clone();
            response.rule = u32::try_from(*rule).unwrap_or(u32::MAX);
            response.entry_namespace = key.namespace;
            response.entry_name = key.name;
        }
        tracing::info!(group = %a.group.key(), identity = %a.identity, allowed = response.allowed, "checked: {}", response.explanation);
        response.server_time_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Ok(response)
    }

    async fn onboard_inner(
        &self,
        req: proto::OnboardRequest,
        connection: Option<Connection>,
    ) -> Result<proto::OnboardResponse, Status> {
        let plane = &self.plane;
        let assessed = self.assess(req).await?;
        if !assessed.decision.is_allowed() {
            plane.metrics.onboard("denied");
            tracing::warn!(group = %assessed.group.key(), identity = %assessed.identity, "onboarding denied: {}", assessed.decision);
            return Err(Status::permission_denied(assessed.decision.to_string()));
        }

        let session_id = Keys::random_id();
        let (entry, agent_key) = self.admit(&assessed, &session_id)?;
        let rejoin = assessed.rejoin();
        let Assessed {
            group,
            identity,
            credential,
            verifier,
            ..
        } = assessed;
        let key = entry.key();
        let existing = plane.registry.entry(&key).await.map_err(registry_status)?;
        if rejoin && let Some(current) = &existing {
            self.refuse_if_held_elsewhere(current)?;
        }
        let existing_binding = match &agent_key {
            Some(_) => plane.registry.binding(&key).await.map_err(registry_status)?,
            None => None,
        };
        // A fresh first-join credential with another key rebinds the name (a re-imaged VM
        // proving its identity again), but not while the holder of the old key is connected.
        if !rejoin
            && let (Some(bound), Some(presented), Some(current)) = (&existing_binding, &agent_key, &existing)
            && &bound.spec.public_key != presented
        {
            self.refuse_if_held_elsewhere(current)?;
        }

        // Everything that can fail on the endpoint's side happens before the credential is
        // spent, and a failure after a write undoes what this onboarding created.
        let (files, token) = plane.boot_files(&group, &entry).await?;
        let stored = plane
            .registry
            .apply_entry(&entry)
            .await
            .map_err(registry_status)?;
        let undo = async |binding_created: bool| {
            if existing.is_none()
                && let Err(err) = plane.registry.delete_entry(&key).await
            {
                tracing::warn!(entry = %key, %err, "could not undo the entry of a failed onboarding; the sweep removes it");
            }
            let undone = match (&existing_binding, binding_created) {
                (_, true) => plane.registry.delete_binding(&key).await.map(drop),
                // A rebinding to a new key is put back as it was.
                (Some(old), false) if !rejoin => plane.registry.apply_binding(old).await.map(drop),
                _ => Ok(()),
            };
            if let Err(err) = undone {
                tracing::warn!(entry = %key, %err, "could not undo the binding of a failed onboarding");
            }
        };
        let mut binding_created = false;
        if let Some(public_key) = &agent_key {
            let binding = binding_for(
                &group,
                &key,
                &identity,
                public_key,
                existing_binding.as_ref(),
                &credential.kind,
            );
            if let Err(err) = plane.registry.apply_binding(&binding).await {
                undo(false).await;
                return Err(registry_status(err));
            }
            binding_created = existing_binding.is_none();
        }
        if !rejoin && let Err(err) = verifier.commit(&identity, &credential).await {
            undo(binding_created).await;
            return Err(identity_status(err));
        }
        let session = plane
            .keys
            .session(
                &key.to_string(),
                &session_id,
                &connection.map(|c| c.id()).unwrap_or_default(),
                SESSION_LIFETIME,
            )
            .map_err(|e| Status::internal(e.to_string()))?;
        plane.metrics.onboard("allowed");
        tracing::info!(entry = %key, identity = %identity, address = %stored.spec.address, rejoin, bound = agent_key.is_some(), "onboarded");
        Ok(proto::OnboardResponse {
            registration: Some(proto::Registration {
                namespace: key.namespace,
                name: key.name,
                address: stored.spec.address.clone(),
                labels: stored.spec.labels.clone().into_iter().collect(),
                session,
                identity: identity.to_string(),
            }),
            files,
            token_expires_at: token.expires_at,
            token_issued_at: token.issued_at,
        })
    }

    /// Refuses a rejoin into `entry` while another agent holds it: connected through another
    /// replica, or through a stream this replica holds. A copy of a VM's key cannot join
    /// while the original is connected. An entry marked connected here with no stream here is
    /// stale (the agent died with its stream) and is taken over.
    fn refuse_if_held_elsewhere(&self, entry: &WorkloadEntry) -> Result<(), Status> {
        let key = entry.key();
        let annotations = entry.metadata.annotations.clone().unwrap_or_default();
        if !annotations.contains_key(annotation::CONNECTED_AT)
            || annotations.contains_key(annotation::DISCONNECTED_AT)
        {
            return Ok(());
        }
        let replica = annotations
            .get(annotation::ENDPOINT_REPLICA)
            .cloned()
            .unwrap_or_default();
        let live_here = self
            .plane
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&key);
        if replica == self.plane.config.replica && !live_here {
            return Ok(());
        }
        Err(Status::failed_precondition(format!(
            "WorkloadEntry {key} is held by a connected agent (through endpoint replica {replica:?}): a copy of this VM's key cannot join while the original is connected; if this VM's agent just restarted, the endpoint notices its old stream's end within seconds (retrying)"
        )))
    }

    /// Whether a removal notice means `key` is gone: it names `key`, or notices were lost
    /// (the receiver lagged) and the entry is no longer there.
    async fn entry_gone(
        plane: &Plane,
        key: &NamespacedName,
        removed: Result<NamespacedName, tokio::sync::broadcast::error::RecvError>,
    ) -> bool {
        use tokio::sync::broadcast::error::RecvError;
        match removed {
            Ok(gone) => &gone == key && matches!(plane.registry.entry(key).await, Ok(None)),
            Err(RecvError::Lagged(_)) => matches!(plane.registry.entry(key).await, Ok(None)),
            // The registry stopped following removals: the stream lives on without them.
            Err(RecvError::Closed) => {
                std::future::pending::<()>().await;
                false
            }
        }
    }

    /// Whether the stream `generation` is still this replica's live stream of `key` (no newer
    /// stream of the same agent took over).
    fn current(plane: &Plane, key: &NamespacedName, generation: u64) -> bool {
        plane
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .is_some_and(|l| l.generation == generation)
    }

    /// Records a stream's end on the entry, unless a newer stream of the same agent took over.
    async fn disconnected(plane: &Plane, key: &NamespacedName, generation: u64) {
        let mine = {
            let mut live = plane.live.lock().unwrap_or_else(|p| p.into_inner());
            match live.get(key) {
                Some(l) if l.generation == generation => {
                    live.remove(key);
                    true
                }
                _ => false,
            }
        };
        plane
            .metrics
            .sessions
            .set(plane.live.lock().map(|l| l.len() as i64).unwrap_or(0));
        if !mine {
            return;
        }
        let patch = AnnotationPatch {
            set: [(annotation::DISCONNECTED_AT.to_string(), now_rfc3339())].into(),
            remove: vec![annotation::CONNECTED_AT.into()],
        };
        match plane.registry.annotate_entry(key, &patch).await {
            Ok(()) => tracing::info!(entry = %key, "agent disconnected"),
            Err(gangplank_registry::Error::NotFound { .. }) => {}
            Err(err) => tracing::warn!(entry = %key, %err, "could not record the disconnect"),
        }
    }
}

type EndpointStream = Pin<Box<dyn Stream<Item = Result<proto::EndpointMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Onboarding for Service {
    async fn discover(
        &self,
        _: Request<proto::DiscoverRequest>,
    ) -> Result<Response<proto::DiscoverResponse>, Status> {
        Ok(Response::new(proto::DiscoverResponse {
            plane_id: self.plane.config.file.plane_id.clone(),
            credential_kinds: self.plane.kinds(),
            nonce: self.plane.keys.nonce(),
            nonce_ttl_seconds: NONCE_TTL.as_secs() as u32,
            aws_sts_url: self
                .plane
                .config
                .file
                .identities
                .aws_ec2
                .as_ref()
                .and_then(|aws| aws.sts.url_template())
                .unwrap_or_default()
                .to_string(),
        }))
    }

    async fn onboard(
        &self,
        request: Request<proto::OnboardRequest>,
    ) -> Result<Response<proto::OnboardResponse>, Status> {
        let connection = request.extensions().get::<Connection>().copied();
        match self.onboard_inner(request.into_inner(), connection).await {
            Ok(r) => Ok(Response::new(r)),
            Err(status) => {
                if status.code() != tonic::Code::PermissionDenied {
                    self.plane.metrics.onboard("refused");
                    tracing::warn!(code = ?status.code(), "onboarding refused: {}", status.message());
                }
                Err(status)
            }
        }
    }

    async fn check(
        &self,
        request: Request<proto::OnboardRequest>,
    ) -> Result<Response<proto::CheckResponse>, Status> {
        self.check_inner(request.into_inner())
            .await
            .map(Response::new)
            .inspect_err(|status| {
                tracing::warn!(code = ?status.code(), "check refused: {}", status.message());
            })
    }

    type SessionStream = EndpointStream;

    async fn session(
        &self,
        request: Request<Streaming<proto::AgentMessage>>,
    ) -> Result<Response<EndpointStream>, Status> {
        // Follow removals before reading the entry, so one right after the read is seen.
        let mut removals = self.plane.registry.entry_removals();
        let (key, entry) = self.authenticate(&request).await?;
        let plane = self.plane.clone();
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        // Onboard already recorded this replica as connected: the first stream after it then
        // writes nothing (one write per onboarding). A reconnect after a disconnect, or to
        // another replica, records itself.
        let annotations = entry.metadata.annotations.unwrap_or_default();
        let recorded = annotations.get(annotation::ENDPOINT_REPLICA) == Some(&plane.config.replica)
            && annotations.contains_key(annotation::CONNECTED_AT)
            && !annotations.contains_key(annotation::DISCONNECTED_AT);
        let patch = AnnotationPatch {
            set: [
                (annotation::CONNECTED_AT.to_string(), now_rfc3339()),
                (
                    annotation::ENDPOINT_REPLICA.to_string(),
                    plane.config.replica.clone(),
                ),
            ]
            .into(),
            remove: vec![annotation::DISCONNECTED_AT.into()],
        };
        if !recorded {
            plane
                .registry
                .annotate_entry(&key, &patch)
                .await
                .map_err(registry_status)?;
        }
        // The health already recorded (by this or another replica): a reconnect that reports
        // the same health writes nothing.
        let mut health = HealthWrites::new(
            plane.config.file.workloads.health_write_interval,
            recorded_health(entry.status.as_ref()),
        );
        plane
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), Live { generation });
        plane
            .metrics
            .sessions
            .set(plane.live.lock().map(|l| l.len() as i64).unwrap_or(0));
        tracing::info!(entry = %key, "agent connected");

        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let welcome = proto::Welcome {
            replica: plane.config.replica.clone(),
            heartbeat_seconds: plane.config.file.workloads.heartbeat.as_secs().max(1) as u32,
        };
        let _ = tx
            .send(Ok(message(endpoint_message::Kind::Welcome(welcome))))
            .await;
        let mut inbound = request.into_inner();
        let deadline = plane.config.heartbeat_deadline();
        // Tracked, so a shutdown waits for the stream's last write (its disconnect).
        plane.clone().tasks.spawn(async move {
            // A silent agent (frozen, cut off, or its host gone) is noticed here, whatever
            // HTTP/2 keepalive makes of its connection: every message moves the deadline.
            let mut silent_until = Instant::now() + deadline;
            loop {
                let due = health.due();
                let msg = tokio::select! {
                    msg = inbound.next() => msg,
                    () = tokio::time::sleep_until(silent_until) => {
                        tracing::info!(entry = %key, ?deadline, "agent sent nothing within workloads.heartbeatDeadline; ending its stream");
                        break;
                    }
                    () = sleep_until_some(due) => {
                        if let Some((h, changes)) = health.flush(Instant::now()) {
                            if changes > 1 {
                                tracing::info!(entry = %key, changes, interval = ?health.interval, healthy = h.healthy,
                                    "sidecar health is flapping; recording the latest");
                            }
                            if Self::current(&plane, &key, generation) {
                                Self::record_health(&plane, &key, &h).await;
                            }
                        }
                        continue;
                    }
                    removed = removals.recv() => {
                        if Self::entry_gone(&plane, &key, removed).await {
                            let reason = format!(
                                "WorkloadEntry {key} was deleted (by an admin, `gangplank instance release`, \
                                 the garbage collector after its WorkloadGroup was deleted, or a sweep)"
                            );
                            tracing::info!(entry = %key, "entry removed while its agent was connected; telling the agent");
                            plane.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                            let _ = tx
                                .send(Ok(message(endpoint_message::Kind::EntryRemoved(proto::EntryRemoved { reason }))))
                                .await;
                            // Keep reading until the agent, having read it, closes its side:
                            // ending the stream at once could make the agent see a broken
                            // stream before the message.
                            let _ = tokio::time::timeout(REMOVED_LINGER, async {
                                while let Some(Ok(_)) = inbound.next().await {}
                            })
                            .await;
                            return;
                        }
                        continue;
                    }
                    _ = plane.stopping.cancelled() => break,
                };
                let Some(Ok(msg)) = msg else { break };
                silent_until = Instant::now() + deadline;
                match msg.kind {
                    Some(agent_message::Kind::Heartbeat(_)) | None => {}
                    Some(agent_message::Kind::Health(h)) => {
                        if let Some(h) = health.report(h, Instant::now())
                            && Self::current(&plane, &key, generation)
                        {
                            Self::record_health(&plane, &key, &h).await;
                        }
                    }
                    Some(agent_message::Kind::RenewToken(_)) => {
                        let reply = Self::renew(&plane, &key).await;
                        if tx.send(reply).await.is_err() {
                            break;
                        }
                    }
                }
            }
            // The last report is what the entry keeps, even when the stream ends inside an
            // interval.
            // (Not when a newer stream of the same agent took over: it records its own.)
            if let Some(h) = health.finish()
                && Self::current(&plane, &key, generation)
            {
                Self::record_health(&plane, &key, &h).await;
            }
            Self::disconnected(&plane, &key, generation).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn leave(
        &self,
        request: Request<proto::LeaveRequest>,
    ) -> Result<Response<proto::LeaveResponse>, Status> {
        let key = match self.authenticate(&request).await {
            Ok((key, _)) => key,
            // The entry is already gone (swept, released, or its group deleted): there is
            // nothing left to deregister, and no traffic to drain.
            Err(status) if status.code() == tonic::Code::NotFound => {
                tracing::info!("agent left; its entry was already gone");
                return Ok(Response::new(proto::LeaveResponse {
                    propagation_delay_seconds: 0,
                }));
            }
            Err(status) => return Err(status),
        };
        self.plane
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        self.plane
            .registry
            .delete_entry(&key)
            .await
            .map_err(registry_status)?;
        self.plane.metrics.deleted("leave");
        tracing::info!(entry = %key, "agent left; entry removed");
        Ok(Response::new(proto::LeaveResponse {
            propagation_delay_seconds: self.plane.config.file.workloads.propagation_delay.as_secs() as u32,
        }))
    }
}

/// The binding `key` gets from this onboarding: a rejoin keeps what the first join proved
/// and records the join; a first join (re)binds `public_key` to what `identity` is now.
fn binding_for(
    group: &gangplank_api::istio::WorkloadGroup,
    key: &NamespacedName,
    identity: &gangplank_identity::Identity,
    public_key: &str,
    existing: Option<&WorkloadBinding>,
    credential_kind: &str,
) -> WorkloadBinding {
    let now = now_rfc3339();
    let mut binding = existing.cloned().unwrap_or_default();
    if existing.is_none() || credential_kind != gangplank_api::kind::BOUND_KEY {
        binding.spec = WorkloadBindingSpec {
            workload_group: group.key().name,
            public_key: public_key.to_owned(),
            credential_kind: identity.kind().to_owned(),
            identity: identity.annotation(),
            facts: serde_json::to_value(&identity.facts).unwrap_or_default(),
            address: identity.address.map(|a| a.to_string()).unwrap_or_default(),
            bound_at: now.clone(),
        };
    }
    binding.api_version = WorkloadBinding::API_VERSION.into();
    binding.kind = WorkloadBinding::KIND.into();
    binding.metadata.name = Some(key.name.clone());
    binding.metadata.namespace = Some(key.namespace.clone());
    binding.metadata.labels = Some(
        [
            (label::MANAGED_BY.to_string(), label::MANAGED_BY_VALUE.to_string()),
            (label::WORKLOAD_GROUP.to_string(), group.key().name),
        ]
        .into(),
    );
    binding.metadata.owner_references = Some(vec![OwnerReference {
        api_version: gangplank_api::istio::WorkloadGroup::API_VERSION.into(),
        kind: gangplank_api::istio::WorkloadGroup::KIND.into(),
        name: group.key().name,
        uid: group.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    }]);
    binding.status = WorkloadBindingStatus {
        last_joined_at: now,
        entry_gone_since: String::new(),
    };
    binding
}

/// Maps a verifier's failure to the gRPC status an agent can act on: a refused credential
/// is the agent's to fix (UNAUTHENTICATED); a verifier that cannot reach what it checks
/// against (an issuer's JWKS, a CA, STS) is the endpoint's problem (UNAVAILABLE), and says so.
fn identity_status(err: gangplank_identity::Error) -> Status {
    use gangplank_identity::Error as E;
    match err {
        E::Store(e) => registry_status(e.into()),
        E::UnsupportedKind(_) => Status::invalid_argument(err.to_string()),
        E::Unavailable(why) => {
            tracing::error!(%why, "cannot verify credentials");
            Status::unavailable(format!(
                "the endpoint cannot verify credentials right now ({why}); this is a problem on \
                 the endpoint's side, not with this VM's credential or configuration: the \
                 endpoint's operator must restore its access; the agent retries"
            ))
        }
        E::Rejected { credential, reason } => refused(credential, format!("{credential} {reason}")),
    }
}

/// An UNAUTHENTICATED refusal of `credential`: the caller is told its class and a reference;
/// the precise reason (which check, which token id, which path) goes to the endpoint's log
/// under that reference only, as the caller is not authenticated yet.
pub fn refused(credential: gangplank_identity::Refused, reason: impl std::fmt::Display) -> Status {
    let reference = reference_id();
    tracing::warn!(%reference, credential = %credential, "credential refused: {reason}");
    Status::unauthenticated(format!(
        "{} (reference {reference}; the endpoint's log says why)",
        credential.public_message()
    ))
}

/// A short id that ties a refusal an agent saw to the endpoint's log line with the reason.
pub fn reference_id() -> String {
    Keys::random_id().chars().take(12).collect()
}

fn message(kind: endpoint_message::Kind) -> proto::EndpointMessage {
    proto::EndpointMessage { kind: Some(kind) }
}

impl Service {
    async fn renew(plane: &Plane, key: &NamespacedName) -> Result<proto::EndpointMessage, Status> {
        let entry = plane
            .registry
            .entry(key)
            .await
            .map_err(registry_status)?
            .ok_or_else(|| {
                Status::not_found(format!("WorkloadEntry {key} no longer exists: onboard again"))
            })?;
        let sa = if entry.spec.service_account.is_empty() {
            "default"
        } else {
            entry.spec.service_account.as_str()
        };
        let token = plane
            .mesh
            .token(&key.namespace, sa, plane.config.file.sidecar_token.lifetime)
            .await
            .map_err(|e| Status::unavailable(format!("renewing the sidecar token of {key}: {e}")))?;
        plane.metrics.renewals.inc();
        tracing::info!(entry = %key, "renewed the sidecar token");
        Ok(message(endpoint_message::Kind::TokenRenewed(
            proto::TokenRenewed {
                token: Some(proto::BootFile {
                    name: "istio-token".into(),
                    content: token.jwt.into_bytes(),
                    mode: 0o600,
                }),
                expires_at: token.expires_at,
                issued_at: token.issued_at,
            },
        )))
    }

    /// Records the sidecar's health as the entry's `Healthy` condition (only transitions
    /// reach here, as istiod records them for a health-checked entry).
    async fn record_health(plane: &Plane, key: &NamespacedName, health: &proto::Health) {
        let status = healthy_condition(health, &now_rfc3339());
        match plane.registry.set_entry_status(key, &status).await {
            Ok(()) => {
                plane.metrics.health_writes.inc();
            }
            Err(err) => tracing::warn!(entry = %key, %err, "could not record the sidecar's health"),
        }
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One stream's health reports, coalesced into at most one registry write per `interval`: a
/// flapping sidecar must not turn into a write per flap (for every VM, on the Kubernetes API).
/// The first change after a quiet interval is written at once; the changes inside an interval
/// are counted and the latest is written when the interval ends, so the entry always ends up
/// with the last report. Writes are at least `interval` apart.
#[derive(Debug)]
struct HealthWrites {
    interval: Duration,
    /// What the entry records, as far as this stream knows (`None`: nothing yet).
    recorded: Option<bool>,
    /// The latest report not written yet, and how many changes it stands for.
    pending: Option<(proto::Health, u64)>,
    /// When this stream last wrote.
    last_write: Option<Instant>,
}

impl HealthWrites {
    fn new(interval: Duration, recorded: Option<bool>) -> Self {
        Self {
            interval,
            recorded,
            pending: None,
            last_write: None,
        }
    }

    /// Takes a report made at `now`; returns it when it is to be written at once.
    fn report(&mut self, health: proto::Health, now: Instant) -> Option<proto::Health> {
        let latest = match &self.pending {
            Some((pending, _)) => Some(pending.healthy),
            None => self.recorded,
        };
        if latest == Some(health.healthy) {
            return None;
        }
        let quiet = self.last_write.is_none_or(|at| now >= at + self.interval);
        match self.pending.take() {
            None if quiet => {
                self.recorded = Some(health.healthy);
                self.last_write = Some(now);
                Some(health)
            }
            pending => {
                let changes = pending.map_or(0, |(_, n)| n) + 1;
                self.pending = Some((health, changes));
                None
            }
        }
    }

    /// When the pending report is to be written.
    fn due(&self) -> Option<Instant> {
        self.pending.as_ref()?;
        Some(self.last_write? + self.interval)
    }

    /// At [`HealthWrites::due`]: the latest report and how many changes it stands for, unless
    /// the sidecar came back to what the entry records.
    fn flush(&mut self, now: Instant) -> Option<(proto::Health, u64)> {
        let (health, changes) = self.pending.take()?;
        if self.recorded == Some(health.healthy) {
            return None;
        }
        self.recorded = Some(health.healthy);
        self.last_write = Some(now);
        Some((health, changes))
    }

    /// At the stream's end: the latest report, if the entry does not record it yet.
    fn finish(&mut self) -> Option<proto::Health> {
        let (health, _) = self.pending.take()?;
        (self.recorded != Some(health.healthy)).then_some(health)
    }
}

/// The entry status istiod writes for a health report (`pilot/pkg/autoregistration`
/// `transformHealthEvent`): one `Healthy` condition, probe and transition time both now (only
/// transitions are reported), and a message only when unhealthy.
pub fn healthy_condition(health: &proto::Health, now: &str) -> serde_json::Value {
    let mut condition = serde_json::json!({
        "type": "Healthy",
        "status": if health.healthy { "True" } else { "False" },
        "lastProbeTime": now,
        "lastTransitionTime": now,
    });
    if !health.healthy {
        condition["message"] = serde_json::Value::String(health.message.clone());
    }
    serde_json::json!({ "conditions": [condition] })
}

/// The health recorded in an entry's `Healthy` condition, if any.
pub fn recorded_health(status: Option<&serde_json::Value>) -> Option<bool> {
    status?
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(|t| t.as_str()) == Some("Healthy"))
        .and_then(|c| match c.get("status").and_then(|s| s.as_str()) {
            Some("True") => Some(true),
            Some("False") => Some(false),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_reports_become_istiods_healthy_condition() {
        let now = "2026-11-21T08:00:00Z";
        let up = healthy_condition(
            &proto::Health {
                healthy: true,
                message: "sidecar running".into(),
            },
            now,
        );
        assert_eq!(
            up,
            serde_json::json!({"conditions": [{"type": "Healthy", "status": "True",
                "lastProbeTime": now, "lastTransitionTime": now}]})
        );
        let down = healthy_condition(
            &proto::Health {
                healthy: false,
                message: "sidecar exited with status 7".into(),
            },
            now,
        );
        assert_eq!(down["conditions"][0]["status"], "False");
        assert_eq!(down["conditions"][0]["message"], "sidecar exited with status 7");
        assert_eq!(recorded_health(Some(&up)), Some(true));
        assert_eq!(recorded_health(Some(&down)), Some(false));
    }

    fn report(healthy: bool) -> proto::Health {
        proto::Health {
            healthy,
            message: format!("healthy: {healthy}"),
        }
    }

    #[test]
    fn health_changes_are_written_at_once_after_quiet_and_coalesced_within_the_interval() {
        let interval = Duration::from_secs(10);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut writes = HealthWrites::new(interval, Some(true));
        // What the entry records already: nothing to write.
        assert!(writes.report(report(true), at(0)).is_none());
        assert_eq!(writes.due(), None);
        // The first change after quiet: at once.
        assert!(!writes.report(report(false), at(1)).unwrap().healthy);
        // Flapping inside the interval: nothing now, the latest at its end.
        assert!(writes.report(report(true), at(2)).is_none());
        assert!(writes.report(report(false), at(3)).is_none());
        assert!(writes.report(report(true), at(4)).is_none());
        assert_eq!(writes.due(), Some(at(11)));
        let (latest, changes) = writes.flush(at(11)).unwrap();
        assert!(latest.healthy);
        assert_eq!(changes, 3);
        assert_eq!(writes.due(), None);
        // A change right after the trailing write waits for the next interval.
        assert!(writes.report(report(false), at(12)).is_none());
        assert_eq!(writes.due(), Some(at(21)));
        // Back to what is recorded before the interval ends: nothing to write at all.
        assert!(writes.report(report(true), at(13)).is_none());
        assert!(writes.flush(at(21)).is_none());
        // Quiet since the last write: the next change is written at once again.
        assert!(!writes.report(report(false), at(40)).unwrap().healthy);
        assert!(writes.finish().is_none());
    }

    #[test]
    fn a_stream_that_ends_inside_an_interval_still_records_the_last_report() {
        let t0 = Instant::now();
        let mut writes = HealthWrites::new(Duration::from_secs(10), None);
        assert!(writes.report(report(true), t0).is_some());
        assert!(
            writes
                .report(report(false), t0 + Duration::from_secs(1))
                .is_none()
        );
        let last = writes.finish().expect("the last report is written at the end");
        assert!(!last.healthy);
    }

    #[test]
    fn recorded_health_ignores_other_conditions_and_unknown_status() {
        let status = serde_json::json!({"conditions": [
            {"type": "Reconciled", "status": "True"},
            {"type": "Healthy", "status": "Unknown"},
        ]});
        assert_eq!(recorded_health(Some(&status)), None);
        assert_eq!(recorded_health(None), None);
        assert_eq!(recorded_health(Some(&serde_json::json!({}))), None);
    }
}
