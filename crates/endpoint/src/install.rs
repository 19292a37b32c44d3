//! The agent's packages for VMs without internet: loaded once at start from
//! `install.directory`, kept in memory with their SHA-256s, and served on the TLS port under
//! `/install/` (`gangplank agent install-script` fetches them from there).
//!
//! No credential is asked for, as TSB's endpoint asks none: a package holds no secret, and
//! a VM fetching one has no credential yet. Only the files of the loaded index are served, so
//! no request path ever reaches the file system.
//!
//! - `GET /install/` (or `/install/index.json`): `{"packages": [{format, arch, file, version,
//!   size, sha256, url}]}`;
//! - `GET /install/{deb|rpm}/{x86_64|aarch64}/{file}`: the package;
//! - `GET …/{file}.sha256`, `GET …/SHA256SUMS`: `sha256sum`'s lines, for `sha256sum -c`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{self, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use sha2::{Digest, Sha256};

use crate::plane::Plane;

/// The package name both formats start with.
const NAME: &str = "gangplank-agent";
/// What a VM is told when the endpoint was given no packages.
const NONE_CONFIGURED: &str = "this endpoint serves no packages: set install.directory in its config\n";
/// What a VM is told for a path that names no loaded package.
const NOT_FOUND: &str = "no such package: GET /install/ lists the packages this endpoint serves\n";
/// The checksum list of one folder, as `sha256sum` writes it.
pub const SUMS: &str = "SHA256SUMS";

/// A package format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Format {
    /// Debian's (`dpkg`).
    Deb,
    /// RPM (`rpm`, `dnf`, `yum`).
    Rpm,
}

impl Format {
    /// The spelling in URLs and the index (`deb`, `rpm`).
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Deb => "deb",
            Format::Rpm => "rpm",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "deb" => Some(Format::Deb),
            "rpm" => Some(Format::Rpm),
            _ => None,
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Deb => "application/vnd.debian.binary-package",
            Format::Rpm => "application/x-rpm",
        }
    }

    /// How this format's file names spell each architecture.
    fn arch_names(self) -> [(&'static str, Arch); 2] {
        match self {
            Format::Deb => [("amd64", Arch::X86_64), ("arm64", Arch::Aarch64)],
            Format::Rpm => [("x86_64", Arch::X86_64), ("aarch64", Arch::Aarch64)],
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A CPU architecture, named in URLs as `uname -m` names it (for both formats, so a script
/// needs one mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Arch {
    /// `x86_64` (Debian's `amd64`).
    X86_64,
    /// `aarch64` (Debian's `arm64`).
    Aarch64,
}

impl Arch {
    /// The `uname -m` name.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "x86_64" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Aarch64),
            _ => None,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One loaded package.
#[derive(Clone)]
pub struct Package {
    /// Its format.
    pub format: Format,
    /// Its architecture.
    pub arch: Arch,
    /// Its file name, as found in the folder and served.
    pub file: String,
    /// The version its name carries.
    pub version: String,
    /// Lower-case hex SHA-256 of its bytes.
    pub sha256: String,
    /// Its bytes.
    pub bytes: Bytes,
}

impl fmt::Debug for Package {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Package")
            .field("file", &self.file)
            .field("size", &self.bytes.len())
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

impl Package {
    /// Where it is served.
    pub fn url(&self) -> String {
        format!("/install/{}/{}/{}", self.format, self.arch, self.file)
    }

    /// Its line in `sha256sum`'s format (two spaces: text mode).
    pub fn sum_line(&self) -> String {
        format!("{}  {}\n", self.sha256, self.file)
    }
}

/// What the name of a file in the folder says.
#[derive(Debug, PartialEq, Eq)]
enum Name {
    /// Not a package: ignored.
    Other,
    /// A package of ours.
    Package {
        format: Format,
        arch: Arch,
        version: String,
    },
}

/// Reads a file name as `cargo deb` (`gangplank-agent_<version>_<amd64|arm64>.deb`) and
/// `cargo generate-rpm` (`gangplank-agent-<version>.<x86_64|aarch64>.rpm`) write it. A
/// `.deb` or `.rpm` that is not one of ours, or names another architecture, is an error:
/// the operator meant it to be served.
fn parse_name(file: &str) -> Result<Name, Error> {
    let (format, stem) = if let Some(stem) = file.strip_suffix(".deb") {
        (Format::Deb, stem)
    } else if let Some(stem) = file.strip_suffix(".rpm") {
        (Format::Rpm, stem)
    } else {
        return Ok(Name::Other);
    };
    let expected = || match format {
        Format::Deb => format!("{NAME}_<version>_amd64.deb or {NAME}_<version>_arm64.deb"),
        Format::Rpm => format!("{NAME}-<version>.x86_64.rpm or {NAME}-<version>.aarch64.rpm"),
    };
    let malformed = |why: &str| Error::Name {
        file: file.to_owned(),
        why: format!(
            "{why}: name it {} (as cargo deb / cargo generate-rpm do), or move it out of the folder",
            expected()
        ),
    };
    let prefix = match format {
        Format::Deb => format!("{NAME}_"),
        Format::Rpm => format!("{NAME}-"),
    };
    let Some(rest) = stem.strip_prefix(&prefix) else {
        return Err(malformed(&format!("is not a {NAME} package")));
    };
    // A Debian version holds no '_' (and Debian's names no '.'), an RPM architecture no '.'.
    let split = match format {
        Format::Deb => rest.split_once('_'),
        Format::Rpm => rest.rsplit_once('.'),
    };
    let Some((version, arch)) = split else {
        return Err(malformed("names no architecture"));
    };
    let valid_version = version.starts_with(|c: char| c.is_ascii_digit())
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".+~-".contains(&b));
    if !valid_version {
        return Err(malformed(&format!(
            "{version:?} is not a package version (a digit, then letters, digits and . + ~ -)"
        )));
    }
    let names = format.arch_names();
    let Some(&(_, arch)) = names.iter().find(|(name, _)| *name == arch) else {
        return Err(Error::Arch {
            file: file.to_owned(),
            arch: arch.to_owned(),
            known: format!("{} or {}", names[0].0, names[1].0),
        });
    };
    Ok(Name::Package {
        format,
        arch,
        version: version.to_owned(),
    })
}

/// The packages the endpoint serves: at most one per format and architecture.
#[derive(Debug, Default)]
pub struct Packages {
    /// Sorted by format, then architecture.
    list: Vec<Package>,
}

impl Packages {
    /// Loads every package in `dir` (other files are ignored) and computes its SHA-256.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let read_dir = |source| Error::ReadDir {
            dir: dir.to_owned(),
            source,
        };
        let mut list: Vec<Package> = Vec::new();
        let mut names: Vec<String> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_dir)? {
            let entry = entry.map_err(read_dir)?;
            let path = entry.path();
            let Some(file) = entry.file_name().to_str().map(str::to_owned) else {
                tracing::debug!(file = %path.display(), "install.directory: ignoring a file whose name is not UTF-8");
                continue;
            };
            names.push(file);
        }
        // In name order, so which file an error names first does not depend on the folder.
        names.sort();
        for file in names {
            let path = dir.join(&file);
            let Name::Package {
                format,
                arch,
                version,
            } = parse_name(&file)?
            else {
                tracing::debug!(file = %path.display(), "install.directory: not a package, ignored");
                continue;
            };
            let read = |source| Error::Read {
                path: path.clone(),
                source,
            };
            if !std::fs::metadata(&path).map_err(read)?.is_file() {
                return Err(Error::Name {
                    file,
                    why: "is not a regular file: the folder must hold the package files themselves".into(),
                });
            }
            if let Some(first) = list.iter().find(|p| p.format == format && p.arch == arch) {
                return Err(Error::Duplicate {
                    format,
                    arch,
                    first: first.file.clone(),
                    second: file,
                });
            }
            let bytes = Bytes::from(std::fs::read(&path).map_err(read)?);
            let sha256 = hex(&Sha256::digest(&bytes));
            tracing::info!(%format, %arch, %version, file = %file, size = bytes.len(), %sha256, "serving a package at /install/");
            list.push(Package {
                format,
                arch,
                file,
                version,
                sha256,
                bytes,
            });
        }
        if list.is_empty() {
            tracing::warn!(dir = %dir.display(), "install.directory holds no package: /install/ lists none");
        }
        list.sort_by_key(|p| (p.format, p.arch));
        Ok(Self { list })
    }

    /// Every package, by format, then architecture.
    pub fn iter(&self) -> impl Iterator<Item = &Package> {
        self.list.iter()
    }

    /// The package of `format` and `arch` named `file`.
    pub fn get(&self, format: Format, arch: Arch, file: &str) -> Option<&Package> {
        self.list
            .iter()
            .find(|p| p.format == format && p.arch == arch && p.file == file)
    }

    /// The `SHA256SUMS` text of one folder (empty when it holds no package).
    pub fn sums(&self, format: Format, arch: Arch) -> String {
        self.list
            .iter()
            .filter(|p| p.format == format && p.arch == arch)
            .map(Package::sum_line)
            .collect()
    }

    /// The index served at `/install/`.
    pub fn index(&self) -> serde_json::Value {
        let packages: Vec<_> = self
            .list
            .iter()
            .map(|p| {
                serde_json::json!({
                    "format": p.format.as_str(),
                    "arch": p.arch.as_str(),
                    "file": p.file,
                    "version": p.version,
                    "size": p.bytes.len(),
                    "sha256": p.sha256,
                    "url": p.url(),
                })
            })
            .collect();
        serde_json::json!({ "packages": packages })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why the packages cannot be loaded. The endpoint does not start (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The folder cannot be listed.
    #[error("cannot read the folder {}: {source}: create it, make it readable by the endpoint, or fix the path", dir.display())]
    ReadDir {
        /// The folder.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A package cannot be read.
    #[error("cannot read {}: {source}: make it readable by the endpoint, or remove it", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A `.deb` or `.rpm` whose name is not one of the agent's packages.
    #[error("{file} {why}")]
    Name {
        /// The file name.
        file: String,
        /// What is wrong and what to change.
        why: String,
    },
    /// A package for an architecture the endpoint does not serve.
    #[error(
        "{file}: architecture {arch:?} is not served (only {known}, i.e. x86_64 and aarch64): remove the file, or build the package for one of those"
    )]
    Arch {
        /// The file name.
        file: String,
        /// The architecture its name says.
        arch: String,
        /// The names this format uses for the served architectures.
        known: String,
    },
    /// Two packages of one format and architecture.
    #[error(
        "{first} and {second} are both {format} packages for {arch}: keep one of them in the folder (the endpoint serves one package per format and architecture)"
    )]
    Duplicate {
        /// The format.
        format: Format,
        /// The architecture.
        arch: Arch,
        /// The file found first (in name order).
        first: String,
        /// The other.
        second: String,
    },
}

/// The `/install/` routes, answering from `plane.install`.
pub fn routes(plane: Arc<Plane>) -> axum::Router {
    let install = axum::Router::new()
        .route("/", get(index))
        .route("/index.json", get(index))
        .route("/{format}/{arch}/{file}", get(file))
        // Its own, so a path under /install/ that names nothing is a 404 with a hint, not
        // the gRPC service's "unimplemented".
        .fallback(not_found)
        .with_state(plane.clone());
    axum::Router::new()
        .nest("/install", install)
        // A nest matches `/install` and what is below it, but not `/install/` itself.
        .route("/install/", get(index).with_state(plane))
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

fn missing(plane: &Plane) -> Response {
    match plane.install {
        None => text(StatusCode::NOT_FOUND, NONE_CONFIGURED),
        Some(_) => text(StatusCode::NOT_FOUND, NOT_FOUND),
    }
}

async fn index(State(plane): State<Arc<Plane>>) -> Response {
    match &plane.install {
        None => missing(&plane),
        Some(packages) => axum::Json(packages.index()).into_response(),
    }
}

async fn not_found(State(plane): State<Arc<Plane>>) -> Response {
    missing(&plane)
}

async fn file(
    State(plane): State<Arc<Plane>>,
    method: Method,
    path: Result<extract::Path<(String, String, String)>, PathRejection>,
) -> Response {
    let Some(packages) = &plane.install else {
        return missing(&plane);
    };
    // A path that does not decode (bad percent-encoding, not UTF-8) names nothing we serve.
    let Ok(extract::Path((format, arch, file))) = path else {
        return missing(&plane);
    };
    let (Some(format), Some(arch)) = (Format::parse(&format), Arch::parse(&arch)) else {
        return missing(&plane);
    };
    if file == SUMS {
        let sums = packages.sums(format, arch);
        if sums.is_empty() {
            return missing(&plane);
        }
        return text(StatusCode::OK, sums);
    }
    if let Some(package) = file
        .strip_suffix(".sha256")
        .and_then(|name| packages.get(format, arch, name))
    {
        return text(StatusCode::OK, package.sum_line());
    }
    let Some(package) = packages.get(format, arch, &file) else {
        return missing(&plane);
    };
    if method == Method::GET {
        plane.metrics.install_download(format.as_str(), arch.as_str());
    }
    let length = HeaderValue::from(package.bytes.len());
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            ),
            (header::CONTENT_LENGTH, length),
        ],
        package.bytes.clone(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn package(format: Format, arch: Arch, version: &str) -> Name {
        Name::Package {
            format,
            arch,
            version: version.into(),
        }
    }

    #[test]
    fn names_are_read_as_cargo_deb_and_cargo_generate_rpm_write_them() {
        use Arch::*;
        use Format::*;
        for (file, name) in [
            (
                "gangplank-agent_0.1.0-1_amd64.deb",
                package(Deb, X86_64, "0.1.0-1"),
            ),
            ("gangplank-agent_0.1.0_arm64.deb", package(Deb, Aarch64, "0.1.0")),
            (
                "gangplank-agent-0.1.0-1.x86_64.rpm",
                package(Rpm, X86_64, "0.1.0-1"),
            ),
            (
                "gangplank-agent-1.2.3~rc1-1.aarch64.rpm",
                package(Rpm, Aarch64, "1.2.3~rc1-1"),
            ),
            ("README", Name::Other),
            ("gangplank-agent_0.1.0-1_amd64.deb.sha256", Name::Other),
        ] {
            assert_eq!(parse_name(file).unwrap(), name, "{file}");
        }
    }

    #[test]
    fn a_package_name_that_is_not_ours_or_names_another_architecture_says_what_to_change() {
        for (file, says) in [
            (
                "gangplank-agent_0.1.0_i386.deb",
                "architecture \"i386\" is not served (only amd64 or arm64",
            ),
            (
                "gangplank-agent_0.1.0_x86_64.deb",
                "architecture \"x86_64\" is not served (only amd64 or arm64",
            ),
            (
                "gangplank-agent-0.1.0-1.noarch.rpm",
                "architecture \"noarch\" is not served (only x86_64 or aarch64",
            ),
            (
                "istio-sidecar.deb",
                "is not a gangplank-agent package: name it gangplank-agent_<version>_amd64.deb",
            ),
            ("gangplank-agent_amd64.deb", "names no architecture"),
            ("gangplank-agent_v1 2_amd64.deb", "is not a package version"),
            ("gangplank-agent-.x86_64.rpm", "is not a package version"),
        ] {
            let err = parse_name(file).unwrap_err().to_string();
            assert!(err.starts_with(file), "{err}");
            assert!(err.contains(says), "{file}: {err}");
        }
    }
}
