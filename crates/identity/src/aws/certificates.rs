//! AWS's per-region certificates that sign instance identity documents: the ones AWS
//! publishes, built in (see `data/README.md`), plus any the endpoint config adds.

use std::collections::BTreeMap;
use std::fmt;

use openssl::x509::X509;

use super::ConfigError;

/// The certificates built in: AWS's published RSA-2048 certificates, by region.
const BUILTIN: &[(&str, &str)] = &[
    (
        "af-south-1",
        include_str!("../../data/aws/rsa2048/af-south-1.pem"),
    ),
    ("ap-east-1", include_str!("../../data/aws/rsa2048/ap-east-1.pem")),
    ("ap-east-2", include_str!("../../data/aws/rsa2048/ap-east-2.pem")),
    (
        "ap-northeast-1",
        include_str!("../../data/aws/rsa2048/ap-northeast-1.pem"),
    ),
    (
        "ap-northeast-2",
        include_str!("../../data/aws/rsa2048/ap-northeast-2.pem"),
    ),
    (
        "ap-northeast-3",
        include_str!("../../data/aws/rsa2048/ap-northeast-3.pem"),
    ),
    (
        "ap-south-1",
        include_str!("../../data/aws/rsa2048/ap-south-1.pem"),
    ),
    (
        "ap-south-2",
        include_str!("../../data/aws/rsa2048/ap-south-2.pem"),
    ),
    (
        "ap-southeast-1",
        include_str!("../../data/aws/rsa2048/ap-southeast-1.pem"),
    ),
    (
        "ap-southeast-2",
        include_str!("../../data/aws/rsa2048/ap-southeast-2.pem"),
    ),
    (
        "ap-southeast-3",
        include_str!("../../data/aws/rsa2048/ap-southeast-3.pem"),
    ),
    (
        "ap-southeast-4",
        include_str!("../../data/aws/rsa2048/ap-southeast-4.pem"),
    ),
    (
        "ap-southeast-5",
        include_str!("../../data/aws/rsa2048/ap-southeast-5.pem"),
    ),
    (
        "ap-southeast-6",
        include_str!("../../data/aws/rsa2048/ap-southeast-6.pem"),
    ),
    (
        "ap-southeast-7",
        include_str!("../../data/aws/rsa2048/ap-southeast-7.pem"),
    ),
    (
        "ca-central-1",
        include_str!("../../data/aws/rsa2048/ca-central-1.pem"),
    ),
    ("ca-west-1", include_str!("../../data/aws/rsa2048/ca-west-1.pem")),
    (
        "cn-north-1",
        include_str!("../../data/aws/rsa2048/cn-north-1.pem"),
    ),
    (
        "cn-northwest-1",
        include_str!("../../data/aws/rsa2048/cn-northwest-1.pem"),
    ),
    (
        "eu-central-1",
        include_str!("../../data/aws/rsa2048/eu-central-1.pem"),
    ),
    (
        "eu-central-2",
        include_str!("../../data/aws/rsa2048/eu-central-2.pem"),
    ),
    (
        "eu-north-1",
        include_str!("../../data/aws/rsa2048/eu-north-1.pem"),
    ),
    (
        "eu-south-1",
        include_str!("../../data/aws/rsa2048/eu-south-1.pem"),
    ),
    (
        "eu-south-2",
        include_str!("../../data/aws/rsa2048/eu-south-2.pem"),
    ),
    ("eu-west-1", include_str!("../../data/aws/rsa2048/eu-west-1.pem")),
    ("eu-west-2", include_str!("../../data/aws/rsa2048/eu-west-2.pem")),
    ("eu-west-3", include_str!("../../data/aws/rsa2048/eu-west-3.pem")),
    (
        "eusc-de-east-1",
        include_str!("../../data/aws/rsa2048/eusc-de-east-1.pem"),
    ),
    (
        "il-central-1",
        include_str!("../../data/aws/rsa2048/il-central-1.pem"),
    ),
    (
        "me-central-1",
        include_str!("../../data/aws/rsa2048/me-central-1.pem"),
    ),
    (
        "me-south-1",
        include_str!("../../data/aws/rsa2048/me-south-1.pem"),
    ),
    (
        "mx-central-1",
        include_str!("../../data/aws/rsa2048/mx-central-1.pem"),
    ),
    ("sa-east-1", include_str!("../../data/aws/rsa2048/sa-east-1.pem")),
    ("us-east-1", include_str!("../../data/aws/rsa2048/us-east-1.pem")),
    ("us-east-2", include_str!("../../data/aws/rsa2048/us-east-2.pem")),
    (
        "us-gov-east-1",
        include_str!("../../data/aws/rsa2048/us-gov-east-1.pem"),
    ),
    (
        "us-gov-west-1",
        include_str!("../../data/aws/rsa2048/us-gov-west-1.pem"),
    ),
    ("us-west-1", include_str!("../../data/aws/rsa2048/us-west-1.pem")),
    ("us-west-2", include_str!("../../data/aws/rsa2048/us-west-2.pem")),
];

/// AWS's signing certificates by region.
#[derive(Clone)]
pub struct Certificates {
    by_region: BTreeMap<String, X509>,
}

impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.by_region.keys()).finish()
    }
}

impl Certificates {
    /// AWS's published RSA-2048 certificates built into Gangplank.
    pub fn builtin() -> Self {
        let by_region = BUILTIN
            .iter()
            .filter_map(|(region, pem)| {
                X509::from_pem(pem.as_bytes())
                    .ok()
                    .map(|c| (region.to_string(), c))
            })
            .collect();
        Self { by_region }
    }

    /// No certificates (for tests and air-gapped setups that list every region).
    pub fn empty() -> Self {
        Self {
            by_region: BTreeMap::new(),
        }
    }

    /// Adds or replaces the certificate for `region` (PEM).
    pub fn with(mut self, region: &str, pem: &[u8]) -> std::result::Result<Self, ConfigError> {
        let cert = X509::from_pem(pem).map_err(|e| ConfigError::Certificate {
            region: region.to_string(),
            message: format!("not a PEM certificate: {e}"),
        })?;
        self.by_region.insert(region.to_string(), cert);
        Ok(self)
    }

    /// Regions with a certificate.
    pub fn regions(&self) -> impl Iterator<Item = &str> {
        self.by_region.keys().map(String::as_str)
    }

    pub(super) fn get(&self, region: &str) -> Option<&X509> {
        self.by_region.get(region)
    }
}

#[cfg(test)]
mod tests {
    use openssl::pkey::Id;

    use super::super::partition;
    use super::*;

    #[test]
    fn every_builtin_certificate_parses() {
        let certs = Certificates::builtin();
        assert_eq!(certs.regions().count(), BUILTIN.len());
    }

    /// Each built-in certificate is AWS's self-signed RSA-2048 one, and is the very one the
    /// provenance table in data/README.md records (region and DER SHA-256), so the table and
    /// the files cannot drift apart.
    #[test]
    fn builtin_certificates_are_the_ones_data_readme_records() {
        let readme = include_str!("../../data/README.md");
        let recorded: BTreeMap<&str, &str> = readme
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                (cells.len() == 6 && cells[3].len() == 64).then(|| (cells[1], cells[3]))
            })
            .collect();
        assert_eq!(recorded.len(), BUILTIN.len(), "{recorded:?}");
        for (region, pem) in BUILTIN {
            let cert = X509::from_pem(pem.as_bytes()).expect(region);
            let subject: Vec<String> = cert
                .subject_name()
                .entries()
                .map(|e| e.data().to_string().unwrap_or_default())
                .collect();
            assert_eq!(
                subject,
                ["US", "Washington State", "Seattle", "Amazon Web Services LLC"],
                "{region}"
            );
            let key = cert.public_key().expect(region);
            assert_eq!((key.id(), key.bits()), (Id::RSA, 2048), "{region}");
            assert!(cert.verify(&key).expect(region), "{region} is not self-signed");
            let digest = cert.digest(openssl::hash::MessageDigest::sha256()).expect(region);
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(recorded.get(region), Some(&hex.as_str()), "{region}");
            assert_eq!(
                recorded.get(region).map(|_| partition(region)),
                readme
                    .lines()
                    .find(|l| l.starts_with(&format!("| {region} |")))
                    .and_then(|l| l.split('|').nth(2))
                    .map(str::trim),
                "{region}"
            );
        }
    }
}
