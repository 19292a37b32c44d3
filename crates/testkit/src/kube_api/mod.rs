//! A Kubernetes API server **test double**: plain HTTP on `127.0.0.1:0` that kube-rs talks to
//! unchanged, keeping real semantics for what Gangplank uses.
//!
//! Served:
//! - discovery: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/<group>`, `/apis/<group>/<version>`;
//! - built-in kinds: ConfigMap, Secret, ServiceAccount (with the `token` subresource, i.e.
//!   TokenRequest), Service, Namespace, Lease, Deployment and PodDisruptionBudget (with their
//!   `status` subresources; no controller acts on them, so a Deployment's status stays what
//!   its writers make it, as on an API server without kube-controller-manager), Role,
//!   RoleBinding, ClusterRole, ClusterRoleBinding and CustomResourceDefinition; creating a CRD
//!   serves its kind at once (status `Established`), deleting it removes the kind and its
//!   objects;
//! - for every kind: namespaced and cluster-wide get, list and watch, create, update (409 when
//!   `metadata.resourceVersion` is stale), merge patch (`application/merge-patch+json`; a
//!   strategic merge patch is treated as one), JSON patch (`application/json-patch+json`,
//!   RFC 6902; a failed `test` is 422), server-side apply, delete (with
//!   `preconditions.resourceVersion`), `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, exists,
//!   `!`), `fieldSelector` on `metadata.name`/`metadata.namespace`, the `status` subresource when
//!   the CRD declares it (writes to the object keep the status, writes to `/status` change only
//!   the status), `generation` bumped on spec changes;
//! - 422 (`Invalid`, one cause per violation) for a custom resource that breaks its CRD's
//!   schema, checked with [`crate::crd::Schema`];
//! - names validated as `ValidateObjectMeta` does, with the API server's messages and `Status`
//!   (`Namespace "x" is invalid: metadata.name: Invalid value: "x": must be no more than 63
//!   characters`, `details.causes[].field`): Namespaces are DNS-1123 labels (63 characters),
//!   Services DNS-1035 labels, everything else (Leases, ConfigMaps, Secrets, ServiceAccounts,
//!   CRDs, custom resources) DNS-1123 subdomains (253); `metadata.namespace` a label;
//!   `generateName` checked by the same rule (trailing dash masked) and, on create, turned into
//!   the prefix cut to 58 characters plus 5 random characters;
//! - watch: replay from `resourceVersion` (410 `Expired` once compacted), initial `ADDED`
//!   events without one, `BOOKMARK`s when `allowWatchBookmarks` is set (after the replay and
//!   then every [`Server::set_bookmark_interval`]), label-selector transitions reported as
//!   `ADDED`/`DELETED`, `timeoutSeconds` honoured;
//! - garbage collection: deleting an object deletes, at once, every object whose
//!   `ownerReferences` name it by uid and have no other live owner (the API server does this
//!   in the background); deleting a Namespace deletes everything in it;
//! - finalizers: deleting an object whose `metadata.finalizers` is not empty only sets its
//!   `deletionTimestamp` (a `MODIFIED` event); the write that empties the list deletes it.
//!   Writes never set or clear `deletionTimestamp`.
//!
//! Server-side apply, documented simplification: there are no `managedFields`. The server keeps,
//! per object and field manager, the configuration it last applied; a new apply first removes
//! the fields that the previous configuration of the same manager had and the new one lacks,
//! then merges the new configuration in (maps merge by key, lists are replaced whole). Every
//! apply is treated as forced (no conflicts between managers). A `metadata.resourceVersion` in
//! the applied configuration is a precondition, as in Kubernetes.
//!
//! Namespaces need not exist before objects are created in them. There is no authentication or
//! authorisation. Every successful write request is recorded ([`Server::writes`]) so tests can
//! count API writes; garbage-collection deletes are not requests and are not recorded. Read
//! requests are recorded too ([`Server::reads`]), so tests can show what is served from a cache.
//!
//! TokenRequest (`POST .../serviceaccounts/<sa>/token`) needs the ServiceAccount to exist and
//! returns an ES256 JWT signed by the stand-in ([`Server::token_key`]), with the requested
//! `audiences` and `expirationSeconds` (default 3600, at least 600 and at most 2^32, else 422
//! worded as the API server's), `sub`
//! `system:serviceaccount:<ns>:<sa>` and the `kubernetes.io` claim.

mod apply;
mod discovery;
mod kinds;
mod names;
mod record;
mod routing;
mod select;
mod server;
mod status;
mod store;
mod token;
mod watch;

pub use record::{Read, Write};
pub use server::Server;
pub use status::{ApiError, Cause, Subject};

/// The issuer (`iss`) of the ServiceAccount tokens the stand-in mints.
pub const TOKEN_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// What can go wrong starting or setting up the stand-in.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listener or a temporary file could not be set up.
    #[error("kube API stand-in: {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An object given to a setup method was refused, as the API would refuse it.
    #[error("kube API stand-in refused {what}: {message}")]
    Refused {
        /// The object.
        what: String,
        /// The API's message.
        message: String,
    },
    /// The token signing key could not be generated.
    #[error("kube API stand-in: generating the ServiceAccount token key: {0}")]
    Key(String),
}
