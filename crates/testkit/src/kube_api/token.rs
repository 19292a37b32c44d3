//! TokenRequest: ServiceAccount tokens signed by the stand-in.

use serde_json::{Value, json};

use super::TOKEN_ISSUER;
use super::status::{ApiError, ApiResult, FieldError};
use super::store::{Shared, Target, now_nanos, rfc3339};

pub(super) fn token_request(shared: &Shared, t: &Target, sa: &Value, req: Value) -> ApiResult<Value> {
    let spec = &req["spec"];
    let audiences: Vec<String> = match spec["audiences"].as_array() {
        Some(a) if !a.is_empty() => a.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        _ => vec![TOKEN_ISSUER.to_owned()],
    };
    let seconds = spec["expirationSeconds"].as_i64().unwrap_or(3600);
    // As ValidateTokenRequest, reported by the API server with no object name.
    let limit = match seconds {
        s if s < 600 => Some("may not specify a duration less than 10 minutes"),
        s if s > 1 << 32 => Some("may not specify a duration larger than 2^32 seconds"),
        _ => None,
    };
    if let Some(detail) = limit {
        return Err(ApiError::invalid(
            "authentication.k8s.io",
            "TokenRequest",
            "",
            &[FieldError::Invalid {
                field: "spec.expirationSeconds".into(),
                value: seconds.to_string(),
                detail: detail.into(),
            }],
        ));
    }
    let ns = t.ns();
    let name = sa["metadata"]["name"].as_str().unwrap_or_default();
    let uid = sa["metadata"]["uid"].as_str().unwrap_or_default();
    let now = time::OffsetDateTime::now_utc();
    let exp = now + time::Duration::seconds(seconds);
    let claims = json!({
        "iss": TOKEN_ISSUER,
        "sub": format!("system:serviceaccount:{ns}:{name}"),
        "aud": audiences,
        "iat": now.unix_timestamp(),
        "nbf": now.unix_timestamp(),
        "exp": exp.unix_timestamp(),
        "jti": format!("{:032x}", now_nanos()),
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": name, "uid": uid}},
    });
    let token = shared.key.sign(&claims);
    Ok(json!({
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": null},
        "spec": {"audiences": audiences, "expirationSeconds": seconds, "boundObjectRef": null},
        "status": {"token": token, "expirationTimestamp": rfc3339(exp)},
    }))
}
