//! Where Gangplank's resources live.
//!
//! [`Registry`] is the one seam between the endpoint and its store. The [`dir`] registry keeps
//! every object as a Kubernetes-style YAML file in a folder (one object per file, written
//! atomically), which istiod can read as an `fs://` config source. The Kubernetes registry
//! implements the same trait against the API server.

use std::collections::BTreeMap;

use async_trait::async_trait;
use gangplank_api::NamespacedName;
use gangplank_api::binding::WorkloadBinding;
use gangplank_api::istio::{WorkloadEntry, WorkloadGroup};
use gangplank_api::policy::OnboardingPolicy;
use gangplank_api::token::JoinToken;

pub use gangplank_api::crds;
pub mod dir;
mod identity;
pub mod kube;

pub use identity::IdentityStore;

/// What can go wrong in a registry. Messages name the object and what to change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object does not exist.
    #[error("{kind} {key} not found")]
    NotFound {
        /// The kind, e.g. `WorkloadEntry`.
        kind: &'static str,
        /// `namespace/name`.
        key: NamespacedName,
    },
    /// A concurrent writer changed the object; retry.
    #[error("{kind} {key} was changed concurrently: {detail}")]
    Conflict {
        /// The kind.
        kind: &'static str,
        /// `namespace/name`.
        key: NamespacedName,
        /// What conflicted.
        detail: String,
    },
    /// A join token cannot be used (expired, used up).
    #[error("join token {id} in namespace {namespace} {reason}")]
    TokenUnusable {
        /// The namespace.
        namespace: String,
        /// The token id.
        id: String,
        /// Why, e.g. `expired at 2026-01-01T00:00:00Z: create a new one with gangplank token create`.
        reason: String,
    },
    /// A stored object is malformed.
    #[error("{path}: {message}")]
    Invalid {
        /// The file or object that is malformed.
        path: String,
        /// What is wrong, and what to change.
        message: String,
    },
    /// The store could not be reached or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Any other backend failure.
    #[error("{0}")]
    Backend(String),
}

/// A registry result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Changes to an entry's annotations: `set` these, `remove` those.
#[derive(Debug, Clone, Default)]
pub struct AnnotationPatch {
    /// Annotations to set (overwriting).
    pub set: BTreeMap<String, String>,
    /// Annotation keys to remove.
    pub remove: Vec<String>,
}

/// The store of WorkloadGroups, OnboardingPolicies, WorkloadEntries and join tokens.
///
/// Implementations keep Kubernetes semantics: writes of an entry are idempotent (applying
/// the same entry twice leaves one object), deletes of absent objects are not errors, and
/// join-token consumption is atomic across concurrent callers and processes.
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// A WorkloadGroup, or `None` if it does not exist.
    async fn workload_group(&self, key: &NamespacedName) -> Result<Option<WorkloadGroup>>;
    /// Every OnboardingPolicy in `namespace`.
    async fn policies(&self, namespace: &str) -> Result<Vec<OnboardingPolicy>>;

    /// A WorkloadEntry, or `None`.
    async fn entry(&self, key: &NamespacedName) -> Result<Option<WorkloadEntry>>;
    /// Every WorkloadEntry Gangplank manages (label `app.kubernetes.io/managed-by=gangplank`),
    /// in all namespaces.
    async fn managed_entries(&self) -> Result<Vec<WorkloadEntry>>;
    /// Creates or replaces the entry with this exact content (server-side-apply semantics
    /// with Gangplank's field manager); returns what was stored.
    async fn apply_entry(&self, entry: &WorkloadEntry) -> Result<WorkloadEntry>;
    /// Patches an entry's annotations. [`Error::NotFound`] if the entry is gone.
    async fn annotate_entry(&self, key: &NamespacedName, patch: &AnnotationPatch) -> Result<()>;
    /// Sets the entry's status (e.g. the `Healthy` condition). [`Error::NotFound`] if gone.
    async fn set_entry_status(&self, key: &NamespacedName, status: &serde_json::Value) -> Result<()>;
    /// Deletes an entry; `Ok(false)` if it was already gone.
    async fn delete_entry(&self, key: &NamespacedName) -> Result<bool>;

    /// Stores a new join token. [`Error::Conflict`] if the id exists.
    async fn create_join_token(&self, token: &JoinToken) -> Result<()>;
    /// A join token, or `None`.
    async fn join_token(&self, key: &NamespacedName) -> Result<Option<JoinToken>>;
    /// Atomically takes one use of a join token whose secret hashes to `secret_sha256`,
    /// if it is unexpired at `now` and has uses left; returns the token after the use.
    /// Fails with [`Error::TokenUnusable`] otherwise, changing nothing.
    async fn consume_join_token(
        &self,
        key: &NamespacedName,
        secret_sha256: &str,
        now: time::OffsetDateTime,
    ) -> Result<JoinToken>;

    /// A VM's binding, or `None`. Always read fresh, so a release takes effect at once.
    async fn binding(&self, key: &NamespacedName) -> Result<Option<WorkloadBinding>>;
    /// Every WorkloadBinding, in all namespaces (on Kubernetes from a watch-backed cache,
    /// which follows writes within moments).
    async fn bindings(&self) -> Result<Vec<WorkloadBinding>>;
    /// Creates or replaces the binding (spec and status) with this exact content; returns
    /// what was stored.
    async fn apply_binding(&self, binding: &WorkloadBinding) -> Result<WorkloadBinding>;
    /// Deletes a binding; `Ok(false)` if it was already gone.
    async fn delete_binding(&self, key: &NamespacedName) -> Result<bool>;

    /// The managed WorkloadEntries removed from now on, by anyone (the sweep, an admin, the
    /// garbage collector, another replica), as the registry sees them go. Seen within about
    /// a second; a receiver that lags is told so ([`tokio::sync::broadcast`]) and should
    /// re-read what it cares about.
    fn entry_removals(&self) -> tokio::sync::broadcast::Receiver<NamespacedName>;
}
