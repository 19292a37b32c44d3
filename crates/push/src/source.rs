//! Which WorkloadEntries to push to: read from YAML files and folders (`-f`, e.g. a
//! directory registry), then chosen by name, namespace, `--all` or a label selector.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gangplank_api::istio::WorkloadEntry;

/// Why entries could not be read or chosen.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file is not YAML.
    #[error("{path} is not valid YAML: {source}")]
    Yaml {
        /// The path.
        path: PathBuf,
        /// The parser's complaint.
        source: Box<serde_saphyr::Error>,
    },
    /// A `kind: WorkloadEntry` document is not a valid WorkloadEntry.
    #[error("{path}: document {index} is not a valid WorkloadEntry: {source}")]
    Entry {
        /// The path.
        path: PathBuf,
        /// 1-based document number.
        index: usize,
        /// What is wrong.
        source: serde_json::Error,
    },
    /// A WorkloadEntry without a name.
    #[error("{path}: document {index} is a WorkloadEntry without metadata.name: add one")]
    Unnamed {
        /// The path.
        path: PathBuf,
        /// 1-based document number.
        index: usize,
    },
    /// Nothing to choose by.
    #[error("say which workload entries to bootstrap: NAME[.NAMESPACE], --all, or -l SELECTOR")]
    NoSelection,
    /// A label selector that cannot be parsed.
    #[error("label selector {0:?} is not valid: use key=value, key!=value, key or !key, comma-separated")]
    BadSelector(String),
    /// The named entry does not exist.
    #[error("workload entry {0} not found{1}")]
    NotFound(String, String),
    /// A bare name matches entries in several namespaces.
    #[error(
        "workload entry name {name} is in several namespaces ({namespaces}): write NAME.NAMESPACE or pass -n"
    )]
    Ambiguous {
        /// The name.
        name: String,
        /// The namespaces.
        namespaces: String,
    },
    /// The selection matched nothing.
    #[error("no workload entries match {0}")]
    Empty(String),
}

/// Reads every WorkloadEntry in `path`: a YAML file (several documents allowed) or a folder
/// searched recursively for `*.yaml`, `*.yml` and `*.json` (hidden files skipped). Documents
/// of other kinds are skipped. An entry without a namespace gets `default`.
pub fn read_entries(path: &Path) -> Result<Vec<WorkloadEntry>, Error> {
    let mut files = Vec::new();
    collect(path, &mut files)?;
    files.sort();
    let mut entries = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|source| Error::Read {
            path: file.clone(),
            source,
        })?;
        let docs: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(&text).map_err(|source| Error::Yaml {
                path: file.clone(),
                source: Box::new(source),
            })?;
        for (i, doc) in docs.into_iter().enumerate() {
            let mut items = Vec::new();
            match doc.get("kind").and_then(|k| k.as_str()) {
                Some("WorkloadEntry") => items.push(doc),
                Some("List") => {
                    if let Some(list) = doc.get("items").and_then(|i| i.as_array()) {
                        items.extend(
                            list.iter()
                                .filter(|d| d.get("kind").and_then(|k| k.as_str()) == Some("WorkloadEntry"))
                                .cloned(),
                        );
                    }
                }
                _ => {}
            }
            for item in items {
                let mut entry: WorkloadEntry =
                    serde_json::from_value(item).map_err(|source| Error::Entry {
                        path: file.clone(),
                        index: i + 1,
                        source,
                    })?;
                if entry.metadata.name.as_deref().unwrap_or("").is_empty() {
                    return Err(Error::Unnamed {
                        path: file.clone(),
                        index: i + 1,
                    });
                }
                if entry.metadata.namespace.as_deref().unwrap_or("").is_empty() {
                    entry.metadata.namespace = Some("default".into());
                }
                entries.push(entry);
            }
        }
    }
    Ok(entries)
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), Error> {
    let meta = std::fs::metadata(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let dir = std::fs::read_dir(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    for item in dir {
        let item = item.map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let p = item.path();
        let name = item.file_name().to_string_lossy().to_string();
        if name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            collect(&p, out)?;
        } else if name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json") {
            out.push(p);
        }
    }
    Ok(())
}

/// A parsed label selector (equality-based, as `kubectl -l`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
}

impl Selector {
    /// Parses `a=b,c!=d,e,!f`.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let bad = || Error::BadSelector(text.to_string());
        let valid =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        let mut reqs = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let req = if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Eq(k.trim().into(), v.trim().into())
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::NotExists(k.trim().into())
            } else {
                Requirement::Exists(part.into())
            };
            let ok = match &req {
                Requirement::Eq(k, v) | Requirement::NotEq(k, v) => valid(k) && (v.is_empty() || valid(v)),
                Requirement::Exists(k) | Requirement::NotExists(k) => valid(k),
            };
            if !ok {
                return Err(bad());
            }
            reqs.push(req);
        }
        if reqs.is_empty() {
            return Err(bad());
        }
        Ok(Self(reqs))
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Eq(k, v) => labels.get(k) == Some(v),
            Requirement::NotEq(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }
}

/// What the user asked for.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// `NAME[.NAMESPACE]`.
    pub name: Option<String>,
    /// `-n`.
    pub namespace: Option<String>,
    /// `--all`.
    pub all: bool,
    /// `-l`.
    pub selector: Option<Selector>,
}

impl Selection {
    /// `NAME.NAMESPACE` split; a namespace in the name wins over `-n`.
    pub fn name_and_namespace(&self) -> Option<(String, Option<String>)> {
        self.name.as_ref().map(|n| match n.split_once('.') {
            Some((name, ns)) => (name.to_string(), Some(ns.to_string())),
            None => (n.clone(), self.namespace.clone()),
        })
    }

    /// Chooses entries; the result is sorted by namespace and name.
    pub fn choose(&self, entries: Vec<WorkloadEntry>) -> Result<Vec<WorkloadEntry>, Error> {
        let ns_of = |e: &WorkloadEntry| e.metadata.namespace.clone().unwrap_or_default();
        let name_of = |e: &WorkloadEntry| e.metadata.name.clone().unwrap_or_default();
        let mut chosen: Vec<WorkloadEntry> = if let Some((name, ns)) = self.name_and_namespace() {
            let found: Vec<WorkloadEntry> = entries
                .into_iter()
                .filter(|e| name_of(e) == name && ns.as_ref().is_none_or(|n| *n == ns_of(e)))
                .collect();
            if found.is_empty() {
                let whre = ns.map(|n| format!(" in namespace {n}")).unwrap_or_default();
                return Err(Error::NotFound(name, whre));
            }
            if found.len() > 1 {
                let namespaces: Vec<String> = found.iter().map(ns_of).collect();
                return Err(Error::Ambiguous {
                    name,
                    namespaces: namespaces.join(", "),
                });
            }
            found
        } else if self.all || self.selector.is_some() {
            entries
                .into_iter()
                .filter(|e| self.namespace.as_ref().is_none_or(|n| *n == ns_of(e)))
                .filter(|e| {
                    self.selector
                        .as_ref()
                        .is_none_or(|s| s.matches(&e.metadata.labels.clone().unwrap_or_default()))
                })
                .collect()
        } else {
            return Err(Error::NoSelection);
        };
        if chosen.is_empty() {
            let what = match &self.namespace {
                Some(n) => format!("the selection in namespace {n}"),
                None => "the selection".to_string(),
            };
            return Err(Error::Empty(what));
        }
        chosen.sort_by_key(|e| (ns_of(e), name_of(e)));
        Ok(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_multi_document_files_and_folders() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("bookinfo/workloadentries")).expect("mkdir");
        std::fs::write(
            dir.path().join("bookinfo/workloadentries/a.yaml"),
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: a, namespace: bookinfo, labels: {tier: db}}\nspec: {address: 10.0.0.1}\n---\nkind: WorkloadGroup\nmetadata: {name: g, namespace: bookinfo}\n",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("b.yml"),
            "kind: WorkloadEntry\nmetadata: {name: b}\nspec: {address: 10.0.0.2}\n",
        )
        .expect("write");
        std::fs::write(dir.path().join("notes.txt"), "not yaml: [").expect("write");
        let entries = read_entries(dir.path()).expect("read");
        let names: Vec<_> = entries.iter().filter_map(|e| e.metadata.name.clone()).collect();
        assert_eq!(names, ["b", "a"]);
        assert_eq!(entries[0].metadata.namespace.as_deref(), Some("default"));

        let by_label = Selection {
            selector: Some(Selector::parse("tier=db").expect("selector")),
            ..Default::default()
        };
        let chosen = by_label.choose(entries.clone()).expect("choose");
        assert_eq!(chosen.len(), 1);
        let by_name = Selection {
            name: Some("a.bookinfo".into()),
            ..Default::default()
        };
        assert_eq!(by_name.choose(entries.clone()).expect("choose").len(), 1);
        let missing = Selection {
            name: Some("a.default".into()),
            ..Default::default()
        };
        assert!(matches!(
            missing.choose(entries.clone()),
            Err(Error::NotFound(..))
        ));
        assert!(matches!(
            Selection::default().choose(entries),
            Err(Error::NoSelection)
        ));
        assert!(Selector::parse("a=b;rm").is_err());
    }
}
