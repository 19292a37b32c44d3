//! AWS Signature Version 4, the part Gangplank needs: signing a request with a set of
//! (temporary) credentials, and reading the `Authorization` header back.
//!
//! Written here rather than taken from the AWS SDK to keep one crypto provider (aws-lc-rs)
//! and a small dependency tree; it is checked against AWS's published SigV4 test suite
//! (see the tests below). Only what an STS `GetCallerIdentity` call uses is supported: an
//! already-encoded path, an already-canonical query and every given header signed.

use std::fmt;

use aws_lc_rs::{digest, hmac};
use time::OffsetDateTime;
use time::macros::format_description;

/// The only algorithm SigV4 defines for HMAC signing.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// What is wrong with an `Authorization` header or a signing input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The `Authorization` header is not a SigV4 header.
    #[error("Authorization header is not AWS SigV4 ({0})")]
    Malformed(&'static str),
    /// The `x-amz-date` value is not `YYYYMMDDTHHMMSSZ`.
    #[error("x-amz-date is not an ISO 8601 basic timestamp (YYYYMMDDTHHMMSSZ)")]
    Date,
}

/// AWS credentials: an access key pair and, for temporary credentials, a session token.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The access key id (`AKIA…` or, for temporary credentials, `ASIA…`).
    pub access_key_id: String,
    /// The secret access key. Never logged.
    pub secret_access_key: String,
    /// The session token of temporary credentials. Never logged.
    pub session_token: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// The parts of a request SigV4 covers.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// `GET`, `POST`, …
    pub method: &'a str,
    /// The URI-encoded path, e.g. `/`.
    pub path: &'a str,
    /// The canonical query string (sorted, encoded); empty when there is none.
    pub query: &'a str,
    /// The headers to sign, any case; every one is signed.
    pub headers: &'a [(String, String)],
    /// The body.
    pub body: &'a [u8],
}

/// The credential scope: date, region and service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// `YYYYMMDD`, the date part of `x-amz-date`.
    pub date: String,
    /// The signing region, e.g. `us-east-1`.
    pub region: String,
    /// The service, e.g. `sts`.
    pub service: String,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}/aws4_request", self.date, self.region, self.service)
    }
}

/// `x-amz-date` for `at`: `YYYYMMDDTHHMMSSZ` in UTC.
pub fn amz_date(at: OffsetDateTime) -> String {
    let fmt = format_description!("[year][month][day]T[hour][minute][second]Z");
    at.to_offset(time::UtcOffset::UTC)
        .format(&fmt)
        .unwrap_or_default()
}

/// Parses an `x-amz-date` value.
pub fn parse_amz_date(value: &str) -> Result<OffsetDateTime, Error> {
    let fmt = format_description!("[year][month][day]T[hour][minute][second]Z");
    time::PrimitiveDateTime::parse(value, &fmt)
        .map(|t| t.assume_utc())
        .map_err(|_| Error::Date)
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

fn sha256_hex(data: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, data).as_ref())
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
        .as_ref()
        .to_vec()
}

/// A header value as SigV4 canonicalises it: trimmed, inner runs of spaces made one.
fn canonical_value(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The sorted, lower-case names of `headers`, joined by `;` (the `SignedHeaders` value).
pub fn signed_headers(headers: &[(String, String)]) -> String {
    let mut names: Vec<String> = headers.iter().map(|(n, _)| n.to_ascii_lowercase()).collect();
    names.sort();
    names.dedup();
    names.join(";")
}

/// The canonical request (task 1 of the SigV4 process).
pub fn canonical_request(req: &Request<'_>) -> String {
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), canonical_value(v)))
        .collect();
    headers.sort();
    // Repeated headers are one line with their values joined by commas, in order.
    let mut lines: Vec<(String, String)> = Vec::new();
    for (name, value) in headers {
        match lines.last_mut() {
            Some((last, joined)) if *last == name => {
                joined.push(',');
                joined.push_str(&value);
            }
            _ => lines.push((name, value)),
        }
    }
    let mut canonical_headers = String::new();
    for (name, value) in &lines {
        canonical_headers.push_str(name);
        canonical_headers.push(':');
        canonical_headers.push_str(value);
        canonical_headers.push('\n');
    }
    format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method,
        req.path,
        req.query,
        canonical_headers,
        signed_headers(req.headers),
        sha256_hex(req.body)
    )
}

/// The string to sign (task 2).
pub fn string_to_sign(amz_date: &str, scope: &Scope, canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical_request.as_bytes())
    )
}

/// The signing key derived from the secret for `scope` (task 3, first half).
fn signing_key(secret_access_key: &str, scope: &Scope) -> Vec<u8> {
    let k_date = hmac_sha256(
        format!("AWS4{secret_access_key}").as_bytes(),
        scope.date.as_bytes(),
    );
    let k_region = hmac_sha256(&k_date, scope.region.as_bytes());
    let k_service = hmac_sha256(&k_region, scope.service.as_bytes());
    hmac_sha256(&k_service, b"aws4_request")
}

/// The hex signature of `req` at `amz_date` with `secret_access_key` for `scope`.
pub fn signature(secret_access_key: &str, amz_date: &str, scope: &Scope, req: &Request<'_>) -> String {
    let to_sign = string_to_sign(amz_date, scope, &canonical_request(req));
    hex(&hmac_sha256(
        &signing_key(secret_access_key, scope),
        to_sign.as_bytes(),
    ))
}

/// The `Authorization` header value for `req`, signing every header in it. `req` must
/// already carry `host` and `x-amz-date` (whose value is `amz_date`) and, for temporary
/// credentials, `x-amz-security-token`.
pub fn authorization(
    credentials: &Credentials,
    amz_date: &str,
    region: &str,
    service: &str,
    req: &Request<'_>,
) -> String {
    let scope = Scope {
        date: amz_date.chars().take(8).collect(),
        region: region.to_string(),
        service: service.to_string(),
    };
    format!(
        "{ALGORITHM} Credential={}/{scope}, SignedHeaders={}, Signature={}",
        credentials.access_key_id,
        signed_headers(req.headers),
        signature(&credentials.secret_access_key, amz_date, &scope, req)
    )
}

/// An `Authorization` header, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    /// The access key id it names.
    pub access_key_id: String,
    /// Its credential scope.
    pub scope: Scope,
    /// The signed header names, as listed (lower case, sorted).
    pub signed_headers: Vec<String>,
    /// The hex signature.
    pub signature: String,
}

impl Authorization {
    /// Parses `AWS4-HMAC-SHA256 Credential=<id>/<date>/<region>/<service>/aws4_request,
    /// SignedHeaders=<a;b>, Signature=<hex>`.
    pub fn parse(value: &str) -> Result<Self, Error> {
        let rest = value
            .strip_prefix(ALGORITHM)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or(Error::Malformed("it must start with AWS4-HMAC-SHA256"))?;
        let (mut credential, mut signed, mut signature) = (None, None, None);
        for part in rest.split(',') {
            let (key, value) = part
                .trim()
                .split_once('=')
                .ok_or(Error::Malformed("a component is not key=value"))?;
            let slot = match key {
                "Credential" => &mut credential,
                "SignedHeaders" => &mut signed,
                "Signature" => &mut signature,
                _ => return Err(Error::Malformed("unknown component")),
            };
            if slot.replace(value).is_some() {
                return Err(Error::Malformed("a component is repeated"));
            }
        }
        let credential = credential.ok_or(Error::Malformed("no Credential"))?;
        let signed = signed.ok_or(Error::Malformed("no SignedHeaders"))?;
        let signature = signature.ok_or(Error::Malformed("no Signature"))?;
        let parts: Vec<&str> = credential.split('/').collect();
        let [access_key_id, date, region, service, "aws4_request"] = parts.as_slice() else {
            return Err(Error::Malformed(
                "Credential is not <key id>/<date>/<region>/<service>/aws4_request",
            ));
        };
        if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Malformed("Signature is not 64 hex digits"));
        }
        Ok(Self {
            access_key_id: access_key_id.to_string(),
            scope: Scope {
                date: date.to_string(),
                region: region.to_string(),
                service: service.to_string(),
            },
            signed_headers: signed.split(';').map(str::to_string).collect(),
            signature: signature.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // AWS's SigV4 test suite ("aws-sig-v4-test-suite", formerly at
    // https://docs.aws.amazon.com/general/latest/gr/signature-v4-test-suite.html; the same
    // files are vendored by the scratchstack-aws-signature crate under
    // src/aws-sig-v4-test-suite/). Every case uses these credentials, date and scope.
    const KEY_ID: &str = "AKIDEXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const DATE: &str = "20150830T123600Z";

    fn suite_headers() -> Vec<(String, String)> {
        vec![
            ("Host".into(), "example.amazonaws.com".into()),
            ("X-Amz-Date".into(), DATE.into()),
        ]
    }

    fn credentials() -> Credentials {
        Credentials {
            access_key_id: KEY_ID.into(),
            secret_access_key: SECRET.into(),
            session_token: None,
        }
    }

    /// get-vanilla: `GET /` with host and x-amz-date. The suite's get-vanilla.sts gives the
    /// canonical request's hash (bb5797…), get-vanilla.authz the header (signature 5fa00f…).
    #[test]
    fn get_vanilla_matches_the_aws_test_suite() {
        let headers = suite_headers();
        let req = Request {
            method: "GET",
            path: "/",
            query: "",
            headers: &headers,
            body: b"",
        };
        let scope = Scope {
            date: "20150830".into(),
            region: "us-east-1".into(),
            service: "service".into(),
        };
        assert_eq!(
            string_to_sign(DATE, &scope, &canonical_request(&req)),
            "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\nbb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63"
        );
        assert_eq!(
            authorization(&credentials(), DATE, "us-east-1", "service", &req),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
    }

    /// post-vanilla: the same as a `POST` (post-vanilla.authz, signature 5da7c1…).
    #[test]
    fn post_vanilla_matches_the_aws_test_suite() {
        let headers = suite_headers();
        let req = Request {
            method: "POST",
            path: "/",
            query: "",
            headers: &headers,
            body: b"",
        };
        assert_eq!(
            authorization(&credentials(), DATE, "us-east-1", "service", &req),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"
        );
    }

    #[test]
    fn a_changed_secret_header_or_body_changes_the_signature() {
        let headers = suite_headers();
        let req = Request {
            method: "POST",
            path: "/",
            query: "",
            headers: &headers,
            body: b"Action=GetCallerIdentity&Version=2011-06-15",
        };
        let base = authorization(&credentials(), DATE, "us-east-1", "sts", &req);
        let other_secret = Credentials {
            secret_access_key: "another".into(),
            ..credentials()
        };
        assert_ne!(base, authorization(&other_secret, DATE, "us-east-1", "sts", &req));
        let other_body = Request {
            body: b"Action=AssumeRole",
            ..req
        };
        assert_ne!(
            base,
            authorization(&credentials(), DATE, "us-east-1", "sts", &other_body)
        );
        let mut more = headers.clone();
        more.push(("x-gangplank-nonce".into(), "n1".into()));
        let with_nonce = Request {
            headers: &more,
            ..req
        };
        let signed = authorization(&credentials(), DATE, "us-east-1", "sts", &with_nonce);
        assert!(
            signed.contains("SignedHeaders=host;x-amz-date;x-gangplank-nonce"),
            "{signed}"
        );
    }

    #[test]
    fn authorization_headers_parse_back() {
        let a = Authorization::parse(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
        )
        .expect("parses");
        assert_eq!(a.access_key_id, "AKIDEXAMPLE");
        assert_eq!(a.scope.to_string(), "20150830/us-east-1/service/aws4_request");
        assert_eq!(a.signed_headers, ["host", "x-amz-date"]);
        for bad in [
            "AWS4-HMAC-SHA1 Credential=a/b/c/d/aws4_request, SignedHeaders=host, Signature=00",
            "AWS4-HMAC-SHA256 Credential=a/b/c/aws4_request, SignedHeaders=host, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            "AWS4-HMAC-SHA256 Credential=a/b/c/d/aws4_request, SignedHeaders=host",
            "AWS4-HMAC-SHA256 Credential=a/b/c/d/aws4_request, SignedHeaders=host, Signature=zz",
        ] {
            assert!(Authorization::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn amz_dates_round_trip() {
        let t = parse_amz_date(DATE).expect("date");
        assert_eq!(amz_date(t), DATE);
        assert_eq!(parse_amz_date("2015-08-30T12:36:00Z"), Err(Error::Date));
    }

    #[test]
    fn credentials_debug_hides_the_secret_and_token() {
        let c = Credentials {
            session_token: Some("TOKEN-VALUE".into()),
            ..credentials()
        };
        let shown = format!("{c:?}");
        assert!(
            !shown.contains(SECRET) && !shown.contains("TOKEN-VALUE"),
            "{shown}"
        );
    }
}
