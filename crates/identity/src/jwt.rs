//! OIDC JWTs.

/// Verified facts of a JWT.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    /// `iss`.
    pub issuer: String,
    /// `sub`.
    pub subject: String,
    /// Every claim of the token.
    pub claims: serde_json::Value,
}
