//! The registry as the store the identity verifiers read and write: join tokens (read, one
//! use taken) and the managed WorkloadEntries (an instance's registrations, a release).

use std::sync::Arc;

use async_trait::async_trait;
use gangplank_api::NamespacedName;
use gangplank_api::istio::WorkloadEntry;
use gangplank_api::token::JoinToken;
use gangplank_identity::store;

use crate::{Error, Registry};

/// A registry as [`gangplank_identity::store`]'s [`JoinTokens`](store::JoinTokens) and
/// [`Entries`](store::Entries).
#[derive(Clone)]
pub struct IdentityStore(Arc<dyn Registry>);

impl IdentityStore {
    /// The store over `registry`.
    pub fn new(registry: Arc<dyn Registry>) -> Self {
        Self(registry)
    }
}

impl std::fmt::Debug for IdentityStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityStore").finish_non_exhaustive()
    }
}

#[async_trait]
impl store::JoinTokens for IdentityStore {
    async fn join_token(&self, key: &NamespacedName) -> Result<Option<JoinToken>, store::Error> {
        Ok(self.0.join_token(key).await?)
    }

    async fn consume_join_token(
        &self,
        key: &NamespacedName,
        secret_sha256: &str,
        now: time::OffsetDateTime,
    ) -> Result<(), store::Error> {
        self.0.consume_join_token(key, secret_sha256, now).await?;
        Ok(())
    }
}

#[async_trait]
impl store::Entries for IdentityStore {
    async fn managed_entries(&self) -> Result<Vec<WorkloadEntry>, store::Error> {
        Ok(self.0.managed_entries().await?)
    }

    async fn delete_entry(&self, key: &NamespacedName) -> Result<bool, store::Error> {
        Ok(self.0.delete_entry(key).await?)
    }
}

#[async_trait]
impl store::Bindings for IdentityStore {
    async fn binding(
        &self,
        key: &NamespacedName,
    ) -> Result<Option<gangplank_api::binding::WorkloadBinding>, store::Error> {
        Ok(self.0.binding(key).await?)
    }
}

impl From<Error> for store::Error {
    fn from(err: Error) -> Self {
        match err {
            Error::TokenUnusable {
                namespace,
                id,
                reason,
            } => store::Error::TokenUnusable {
                namespace,
                id,
                reason,
            },
            other => store::Error::Backend(Box::new(other)),
        }
    }
}

/// The registry error a verifier's store failure came from, so the endpoint maps both alike.
impl From<store::Error> for Error {
    fn from(err: store::Error) -> Self {
        match err {
            store::Error::TokenUnusable {
                namespace,
                id,
                reason,
            } => Error::TokenUnusable {
                namespace,
                id,
                reason,
            },
            store::Error::Backend(e) => match e.downcast::<Error>() {
                Ok(e) => *e,
                Err(e) => Error::Backend(e.to_string()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_round_trip_through_the_store_error() {
        let conflict = Error::Conflict {
            kind: "JoinToken",
            key: NamespacedName::new("bookinfo", "abc"),
            detail: "changed".into(),
        };
        let text = conflict.to_string();
        let back = Error::from(store::Error::from(conflict));
        assert!(matches!(back, Error::Conflict { .. }), "{back:?}");
        assert_eq!(back.to_string(), text);

        let unusable = store::Error::from(Error::TokenUnusable {
            namespace: "bookinfo".into(),
            id: "abc".into(),
            reason: "expired".into(),
        });
        assert!(
            matches!(unusable, store::Error::TokenUnusable { .. }),
            "{unusable:?}"
        );
        assert_eq!(
            unusable.to_string(),
            "join token abc in namespace bookinfo expired"
        );
    }
}
