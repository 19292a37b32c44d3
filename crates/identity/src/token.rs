//! Join tokens.

/// Verified facts of a join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// The token id (`metadata.name` of the stored token).
    pub id: String,
    /// The namespace the token lives in (the group's).
    pub namespace: String,
    /// The WorkloadGroup it was created for.
    pub workload_group: String,
}
