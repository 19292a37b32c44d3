//! PKCS#7 signed-data verification shared by the AWS and Azure verifiers (OpenSSL).

use openssl::pkcs7::{Pkcs7, Pkcs7Flags};
use openssl::stack::Stack;
use openssl::x509::store::{X509Store, X509StoreBuilder};
use openssl::x509::{X509, X509PurposeId};

/// Largest PKCS#7 structure accepted (AWS's and Azure's are a few KiB).
pub(crate) const MAX_DER_LEN: usize = 64 * 1024;

/// Parses DER (or BER, as AWS sends with indefinite lengths) PKCS#7.
pub(crate) fn parse(der: &[u8]) -> Result<Pkcs7, String> {
    if der.len() > MAX_DER_LEN {
        return Err(format!(
            "is {} bytes, more than the {MAX_DER_LEN} accepted",
            der.len()
        ));
    }
    Pkcs7::from_der(der).map_err(|_| "is not a PKCS#7 structure".to_string())
}

/// Verifies that `p7` was signed by exactly `cert` (no other certificate, embedded or
/// not, may act as signer) and returns the signed content.
pub(crate) fn verify_signed_by(p7: &Pkcs7, cert: &X509) -> Result<Vec<u8>, String> {
    let mut certs = Stack::new().map_err(|e| e.to_string())?;
    certs.push(cert.clone()).map_err(|e| e.to_string())?;
    // The certificate is pinned, so there is no chain to verify.
    let store = X509StoreBuilder::new().map_err(|e| e.to_string())?.build();
    let mut content = Vec::new();
    p7.verify(
        &certs,
        &store,
        None,
        Some(&mut content),
        Pkcs7Flags::NOINTERN | Pkcs7Flags::NOVERIFY | Pkcs7Flags::BINARY,
    )
    .map_err(|_| "signature does not verify".to_string())?;
    Ok(content)
}

/// Verifies `p7`'s signature and its signer's chain to `store` (OpenSSL builds the chain
/// from the store and the certificates embedded in `p7`; `intermediates` only help find the
/// signer). Returns the signed content and the signer certificate.
pub(crate) fn verify_chain(
    p7: &Pkcs7,
    store: &X509Store,
    intermediates: &[X509],
) -> Result<(Vec<u8>, X509), String> {
    let mut certs = Stack::new().map_err(|e| e.to_string())?;
    for c in intermediates {
        certs.push(c.clone()).map_err(|e| e.to_string())?;
    }
    let mut content = Vec::new();
    p7.verify(&certs, store, None, Some(&mut content), Pkcs7Flags::BINARY)
        .map_err(|e| {
            let why = e
                .errors()
                .iter()
                .find_map(|e| e.reason().map(str::to_string))
                .unwrap_or_else(|| "verification failed".into());
            format!("signature or certificate chain does not verify ({why})")
        })?;
    let signers = p7
        .signers(&certs, Pkcs7Flags::empty())
        .map_err(|_| "has no signer certificate".to_string())?;
    let mut iter = signers.iter();
    let (Some(signer), None) = (iter.next(), iter.next()) else {
        return Err("must have exactly one signer".into());
    };
    Ok((content, signer.to_owned()))
}

/// A trust store of `roots`; any purpose is accepted (Azure signs with a TLS certificate).
pub(crate) fn store(roots: &[X509]) -> Result<X509Store, String> {
    let mut builder = X509StoreBuilder::new().map_err(|e| e.to_string())?;
    for root in roots {
        builder.add_cert(root.clone()).map_err(|e| e.to_string())?;
    }
    builder
        .set_purpose(X509PurposeId::ANY)
        .map_err(|e| e.to_string())?;
    Ok(builder.build())
}

/// Every certificate in a PEM bundle; fails on none.
pub(crate) fn certs_from_pem(pem: &[u8]) -> Result<Vec<X509>, String> {
    let certs = X509::stack_from_pem(pem).map_err(|e| format!("is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("holds no certificate".into());
    }
    Ok(certs)
}
