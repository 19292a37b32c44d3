//! The record of every read and write request, for tests that count API calls.

use super::store::{Store, Target};

/// One successful write request, as recorded by [`Server::writes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// `create`, `update`, `patch`, `apply` or `delete`.
    pub verb: &'static str,
    /// The resource's plural, e.g. `workloadentries`.
    pub resource: String,
    /// The subresource, e.g. `status` or `token`.
    pub subresource: Option<String>,
    /// The namespace, empty for cluster-scoped objects.
    pub namespace: String,
    /// The object's name.
    pub name: String,
}

/// One read request (`get`, `list` or `watch`), as recorded by [`Server::reads`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// `get`, `list` or `watch`.
    pub verb: &'static str,
    /// The resource's plural, e.g. `configmaps`.
    pub resource: String,
    /// The namespace, empty for a cluster-wide request.
    pub namespace: String,
    /// The object's name; empty for `list` and `watch`.
    pub name: String,
}

impl Store {
    /// Records a successful write request.
    pub(super) fn record(&mut self, verb: &'static str, t: &Target, name: &str) {
        self.writes.push(Write {
            verb,
            resource: t.kind.plural.clone(),
            subresource: t.sub.clone(),
            namespace: t.ns(),
            name: name.to_owned(),
        });
    }
}
