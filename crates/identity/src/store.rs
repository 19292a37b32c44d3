//! What the endpoint halves need from the store the endpoint keeps its resources in: small
//! traits that `gangplank-registry` implements, so this crate does not depend on the registry
//! (and the agent links no Kubernetes client through it).
//!
//! `JoinTokens` is what the join-token verifier reads and writes; `Entries` is what the AWS
//! verifier reads (an instance holds one registration at a time) and `aws::release` deletes.
//! Both exist with the `verify` feature; [`Error`] always does, as [`crate::Error::Store`]
//! holds it.

#[cfg(feature = "verify")]
use gangplank_api::{NamespacedName, binding::WorkloadBinding, istio::WorkloadEntry, token::JoinToken};

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The join token cannot be used (expired, used up, or its secret does not match).
    #[error("join token {id} in namespace {namespace} {reason}")]
    TokenUnusable {
        /// The namespace.
        namespace: String,
        /// The token id.
        id: String,
        /// Why, and what to do.
        reason: String,
    },
    /// The store failed: its own error, kept whole so the caller can map it (e.g. to a gRPC
    /// code) as it maps the store's other failures.
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
}

/// The join tokens of a store.
#[cfg(feature = "verify")]
#[async_trait::async_trait]
pub trait JoinTokens: Send + Sync {
    /// The token `key` (namespace: the group's; name: the token id), or `None`.
    async fn join_token(&self, key: &NamespacedName) -> Result<Option<JoinToken>, Error>;
    /// Atomically takes one use of the token `key` whose secret hashes to `secret_sha256`,
    /// if it is unexpired at `now` and has uses left; [`Error::TokenUnusable`] otherwise,
    /// changing nothing.
    async fn consume_join_token(
        &self,
        key: &NamespacedName,
        secret_sha256: &str,
        now: time::OffsetDateTime,
    ) -> Result<(), Error>;
}

/// The WorkloadEntries of a store.
#[cfg(feature = "verify")]
#[async_trait::async_trait]
pub trait Entries: Send + Sync {
    /// Every WorkloadEntry Gangplank manages, in all namespaces.
    async fn managed_entries(&self) -> Result<Vec<WorkloadEntry>, Error>;
    /// Deletes an entry; `Ok(false)` if it was already gone.
    async fn delete_entry(&self, key: &NamespacedName) -> Result<bool, Error>;
}

/// The WorkloadBindings of a store (the rejoin verifier reads them).
#[cfg(feature = "verify")]
#[async_trait::async_trait]
pub trait Bindings: Send + Sync {
    /// The binding `key`, read fresh (a release takes effect at once), or `None`.
    async fn binding(&self, key: &NamespacedName) -> Result<Option<WorkloadBinding>, Error>;
}
