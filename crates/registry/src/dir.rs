//! The directory registry: every object is a Kubernetes-style YAML file under one folder.
//!
//! Layout: `<root>/<namespace>/<plural>/<name>.yaml`, one object per file (`apiVersion`, `kind`,
//! `metadata`, `spec`, `status`). istiod can use `<root>` as an `fs://<root>` config source: it
//! watches `*.yaml`/`*.yml` recursively and refuses a whole reload when one file is invalid,
//! so only complete, valid objects are ever visible under a `.yaml` name:
//!
//! - every write goes to a hidden temp file in the same folder
//!   (`.<file name>.gangplank-<random>.tmp`, not a YAML name), is fsynced, renamed over the
//!   target and the folder is fsynced ([`gangplank_fs::write`]); a crash leaves either the old
//!   or the new file, plus at worst a hidden temp file that every reader ignores;
//! - entries, groups and policies are mode 0644, join tokens 0600;
//! - every read-modify-write (apply, annotate, status, token use, delete) holds an exclusive
//!   `flock` on `<root>/.lock`, so several endpoint processes sharing a folder never lose an
//!   update and a join token is never used more often than allowed. (`nix`'s `Flock` rather than
//!   `std::fs::File::lock`, which is newer than the workspace's minimum Rust version.) Plain
//!   reads take no lock: a rename is atomic, so a reader sees the old or the new object.
//!
//! Reading: hidden files, files not ending in `.yaml` and empty files are ignored (as istiod
//! ignores empty files). A malformed file, or one whose kind, namespace or name does not match
//! where it lies, is an error ([`Error::Invalid`] naming the file) for every read and listing
//! that reaches it, never silently skipped: istiod stops reloading the folder because of it
//! too, and an OnboardingPolicy that silently disappeared would change who may join.
//!
//! Names are checked before any path is built: namespaces must be DNS-1123 labels and names
//! DNS-1123 subdomains, so `../x` never reaches the file system. Linux file names stop at 255
//! bytes, so a name longer than 250 characters (Kubernetes allows 253) is stored as
//! `<first 233 characters>-<16 hex digits of its SHA-256>.yaml`.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use gangplank_api::binding::WorkloadBinding;
use gangplank_api::istio::{WorkloadEntry, WorkloadGroup};
use gangplank_api::meta::{is_dns1123_label, is_dns1123_subdomain};
use gangplank_api::names::label;
use gangplank_api::policy::OnboardingPolicy;
use gangplank_api::token::JoinToken;
use gangplank_api::{NamespacedName, Resource};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::{AnnotationPatch, Error, Result};

/// The lock file every writer holds while it reads, changes and writes an object.
const LOCK_FILE: &str = ".lock";
/// Longest name stored as-is: `<name>.yaml` must fit in 255 bytes.
const MAX_PLAIN_NAME: usize = 250;
/// How much of a long name is kept before its hash.
const LONG_NAME_PREFIX: usize = 233;
/// How often the folder is scanned for removed entries while someone follows removals.
const REMOVAL_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// A [`crate::Registry`] over a folder that istiod can also read as `fs://<root>`.
///
/// Cheap to clone; clones share the folder. See the [module docs](self) for the layout and
/// the guarantees.
#[derive(Debug, Clone)]
pub struct Registry {
    store: Arc<Store>,
    removals: Arc<Removals>,
}

/// Who follows entry removals, and the scan that finds them (started with the first
/// follower, stopped with the last clone of the registry).
#[derive(Debug)]
struct Removals {
    sender: tokio::sync::broadcast::Sender<NamespacedName>,
    scanning: std::sync::Once,
    known: std::sync::Mutex<Known>,
}

/// What the removal scan compares against.
#[derive(Debug, Default)]
struct Known {
    /// The entries seen by the last scan, plus those present when a follower subscribed;
    /// `None` while nobody follows.
    keys: Option<std::collections::BTreeSet<NamespacedName>>,
    /// Entries a follower saw since the scan under way began: a scan that started before
    /// they were (re)created must not forget them.
    fresh: std::collections::BTreeSet<NamespacedName>,
}

impl Removals {
    /// A follower read `key`: it is in the baseline the scan compares against.
    fn saw(&self, key: &NamespacedName) {
        if self.sender.receiver_count() == 0 {
            return;
        }
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        known.keys.get_or_insert_default().insert(key.clone());
        known.fresh.insert(key.clone());
    }

    /// This process removed `key`: followers are told now, not at the next scan.
    fn removed(&self, key: &NamespacedName) {
        if self.sender.receiver_count() == 0 {
            return;
        }
        {
            let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(keys) = known.keys.as_mut() {
                keys.remove(key);
            }
            known.fresh.remove(key);
        }
        let _ = self.sender.send(key.clone());
    }
}

impl Registry {
    /// Opens the registry in `root`, creating the folder if needed.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|source| Error::Io {
            context: format!(
                "creating registry folder {}: check the path and its permissions",
                root.display()
            ),
            source,
        })?;
        let store = Store {
            root,
            writers: std::sync::Mutex::new(()),
        };
        // Fail now, not on the first write, if the lock cannot be taken.
        drop(store.lock()?);
        Ok(Self {
            store: Arc::new(store),
            removals: Arc::new(Removals {
                sender: tokio::sync::broadcast::channel(1024).0,
                scanning: std::sync::Once::new(),
                known: std::sync::Mutex::new(Known::default()),
            }),
        })
    }

    /// Scans the folder every [`REMOVAL_POLL`] while anyone follows removals, sending the
    /// key of every managed entry file that disappeared, until the registry is dropped.
    fn scan_removals(&self) {
        let store = Arc::downgrade(&self.store);
        let removals = Arc::downgrade(&self.removals);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REMOVAL_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The entry folders' modification times at the last full scan: while they stay
            // the same, nothing was created, renamed or removed there, and the scan (a
            // listing of every entry file, each second) is skipped.
            let mut unchanged_since: Option<Vec<(String, std::time::SystemTime)>> = None;
            loop {
                tick.tick().await;
                let (Some(store), Some(removals)) = (store.upgrade(), removals.upgrade()) else {
                    return;
                };
                {
                    let mut known = removals.known.lock().unwrap_or_else(|p| p.into_inner());
                    known.fresh.clear();
                    if removals.sender.receiver_count() == 0 {
                        known.keys = None;
                        unchanged_since = None;
                        continue;
                    }
                    if known.keys.is_none() {
                        unchanged_since = None;
                    }
                }
                let previous = unchanged_since.take();
                let scanned = tokio::task::spawn_blocking(move || {
                    let stamp = store.entry_folder_stamps();
                    if stamp.is_some() && stamp == previous {
                        return Ok((stamp, None));
                    }
                    store.entry_keys().map(|keys| (stamp, Some(keys)))
                })
                .await;
                let now = match scanned {
                    Ok(Ok((stamp, None))) => {
                        unchanged_since = stamp;
                        continue;
                    }
                    Ok(Ok((stamp, Some(now)))) => {
                        unchanged_since = stamp;
                        now
                    }
                    Ok(Err(err)) => {
                        tracing::warn!(%err, "scanning the registry folder for removed entries failed; retrying");
                        continue;
                    }
                    Err(_) => continue,
                };
                let mut known = removals.known.lock().unwrap_or_else(|p| p.into_inner());
                let fresh = std::mem::take(&mut known.fresh);
                // An entry a follower read while this scan listed, and missing from the
                // listing, may have been removed just after the read: scan again next time
                // rather than trust the folder times, which already include that removal.
                if fresh.iter().any(|k| !now.contains(k)) {
                    unchanged_since = None;
                }
                if let Some(before) = known.keys.as_ref() {
                    for gone in before.difference(&now).filter(|k| !fresh.contains(k)) {
                        let _ = removals.sender.send(gone.clone());
                    }
                }
                let mut keys = now;
                keys.extend(fresh);
                known.keys = Some(keys);
            }
        });
    }

    /// The folder this registry keeps its objects in.
    pub fn root(&self) -> &Path {
        &self.store.root
    }

    /// The file that holds (or would hold) the object `key` of kind `T`.
    pub fn path_of<T: Resource>(&self, key: &NamespacedName) -> Result<PathBuf> {
        self.store.path::<T>(key)
    }

    /// The object `key` of kind `T`, or `None` if it does not exist.
    pub async fn get<T: Resource + 'static>(&self, key: &NamespacedName) -> Result<Option<T>> {
        let key = key.clone();
        self.run(move |s| s.read::<T>(&key)).await
    }

    /// Every object of kind `T` in `namespace`, or in all namespaces for `None`, sorted by
    /// namespace and name.
    pub async fn list<T: Resource + 'static>(&self, namespace: Option<&str>) -> Result<Vec<T>> {
        let namespace = namespace.map(str::to_owned);
        self.run(move |s| s.list::<T>(namespace.as_deref())).await
    }

    /// Creates or replaces `obj` exactly as given (status included), e.g. a WorkloadGroup or an
    /// OnboardingPolicy from the CLI; returns what was stored.
    ///
    /// Stamps `apiVersion` and `kind`, keeps `uid` and `creationTimestamp` of an existing
    /// object (new ones get both), bumps `resourceVersion` and, when the spec changed,
    /// `generation`.
    pub async fn put<T: Resource + 'static>(&self, obj: &T) -> Result<T> {
        let obj = obj.clone();
        self.run(move |s| {
            let _lock = s.lock()?;
            s.replace(obj, |_, _| Ok(()))
        })
        .await
    }

    /// Deletes the object `key` of kind `T`; `Ok(false)` if it was already gone.
    pub async fn delete<T: Resource + 'static>(&self, key: &NamespacedName) -> Result<bool> {
        let key = key.clone();
        self.run(move |s| {
            let _lock = s.lock()?;
            s.remove::<T>(&key)
        })
        .await
    }

    /// Runs blocking file-system work (including waiting for the lock) off the async runtime.
    async fn run<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Store) -> Result<R> + Send + 'static,
    {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Error::Backend(format!("directory registry task failed: {e}")))?
    }
}

#[async_trait]
impl crate::Registry for Registry {
    async fn workload_group(&self, key: &NamespacedName) -> Result<Option<WorkloadGroup>> {
        self.get(key).await
    }

    async fn policies(&self, namespace: &str) -> Result<Vec<OnboardingPolicy>> {
        self.list(Some(namespace)).await
    }

    async fn entry(&self, key: &NamespacedName) -> Result<Option<WorkloadEntry>> {
        let entry = self.get(key).await?;
        if entry.is_some() {
            self.removals.saw(key);
        }
        Ok(entry)
    }

    async fn managed_entries(&self) -> Result<Vec<WorkloadEntry>> {
        let mut entries = self.list::<WorkloadEntry>(None).await?;
        entries.retain(|e| {
            e.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(label::MANAGED_BY))
                .is_some_and(|v| v == label::MANAGED_BY_VALUE)
        });
        Ok(entries)
    }

    /// Status is a subresource, as in Kubernetes: applying keeps the stored status and ignores
    /// the one given (use [`crate::Registry::set_entry_status`]).
    async fn apply_entry(&self, entry: &WorkloadEntry) -> Result<WorkloadEntry> {
        let entry = entry.clone();
        self.run(move |s| {
            let _lock = s.lock()?;
            s.replace(entry, |new, old| {
                new.status = old.and_then(|o| o.status.clone());
                Ok(())
            })
        })
        .await
    }

    async fn annotate_entry(&self, key: &NamespacedName, patch: &AnnotationPatch) -> Result<()> {
        let key = key.clone();
        let patch = patch.clone();
        self.run(move |s| {
            let _lock = s.lock()?;
            s.modify::<WorkloadEntry>(&key, |e| {
                let annotations = e.metadata.annotations.get_or_insert_default();
                for k in &patch.remove {
                    annotations.remove(k);
                }
                annotations.extend(patch.set.clone());
                if annotations.is_empty() {
                    e.metadata.annotations = None;
                }
                Ok(())
            })
            .map(drop)
        })
        .await
    }

    async fn set_entry_status(&self, key: &NamespacedName, status: &serde_json::Value) -> Result<()> {
        let key = key.clone();
        let status = status.clone();
        self.run(move |s| {
            let _lock = s.lock()?;
            s.modify::<WorkloadEntry>(&key, |e| {
                e.status = Some(status);
                Ok(())
            })
            .map(drop)
        })
        .await
    }

    async fn delete_entry(&self, key: &NamespacedName) -> Result<bool> {
        let deleted = self.delete::<WorkloadEntry>(key).await?;
        if deleted {
            self.removals.removed(key);
        }
        Ok(deleted)
    }

    async fn create_join_token(&self, token: &JoinToken) -> Result<()> {
        let token = token.clone();
        self.run(move |s| {
            let _lock = s.lock()?;
            let key = token.key();
            if s.read::<JoinToken>(&key)?.is_some() {
                return Err(Error::Conflict {
                    kind: JoinToken::KIND,
                    key,
                    detail: "a join token with this id already exists: create it under a new id".into(),
                });
            }
            s.replace(token, |_, _| Ok(())).map(drop)
        })
        .await
    }

    async fn join_token(&self, key: &NamespacedName) -> Result<Option<JoinToken>> {
        self.get(key).await
    }

    async fn consume_join_token(
        &self,
        key: &NamespacedName,
        secret_sha256: &str,
        now: OffsetDateTime,
    ) -> Result<JoinToken> {
        let key = key.clone();
        let given = secret_sha256.to_ascii_lowercase();
        self.run(move |s| {
            let _lock = s.lock()?;
            s.consume(&key, &given, now)
        })
        .await
    }

    async fn binding(&self, key: &NamespacedName) -> Result<Option<WorkloadBinding>> {
        self.get(key).await
    }

    async fn bindings(&self) -> Result<Vec<WorkloadBinding>> {
        self.list(None).await
    }

    async fn apply_binding(&self, binding: &WorkloadBinding) -> Result<WorkloadBinding> {
        self.put(binding).await
    }

    async fn delete_binding(&self, key: &NamespacedName) -> Result<bool> {
        self.delete::<WorkloadBinding>(key).await
    }

    /// Removals by this process are told at once; those by others (an admin's `rm`,
    /// `gangplank instance release`) by the folder scan, for every entry a follower read after
    /// subscribing (a session reads its own entry right after it subscribes) or that a scan
    /// saw. Subscribing costs no listing: with thousands of sessions, a listing per
    /// subscription made onboarding quadratic.
    fn entry_removals(&self) -> tokio::sync::broadcast::Receiver<NamespacedName> {
        let receiver = self.removals.sender.subscribe();
        self.removals.scanning.call_once(|| self.scan_removals());
        receiver
    }
}

/// The synchronous part: paths, atomic files and the lock.
#[derive(Debug)]
struct Store {
    root: PathBuf,
    /// Writers of this process queue here before taking the folder's `flock`: only one of
    /// them waits on the file lock at a time. (Hundreds of blocking threads waiting on one
    /// `flock` are all woken at every unlock; at a thousand onboardings at once that
    /// thundering herd was a third of the endpoint's CPU.)
    writers: std::sync::Mutex<()>,
}

/// The folder-wide write lock: this process's queue, then the `flock` other processes see.
struct Locked<'a> {
    _file: Flock<File>,
    _queue: std::sync::MutexGuard<'a, ()>,
}

impl Store {
    /// Takes the folder-wide exclusive lock; released when the guard is dropped.
    fn lock(&self) -> Result<Locked<'_>> {
        let queue = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        Ok(Locked {
            _file: self.flock()?,
            _queue: queue,
        })
    }

    fn flock(&self) -> Result<Flock<File>> {
        let path = self.root.join(LOCK_FILE);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)
            .map_err(|source| Error::Io {
                context: format!(
                    "opening lock file {}: the registry folder must be writable",
                    path.display()
                ),
                source,
            })?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| Error::Io {
            context: format!("locking {}", path.display()),
            source: io::Error::from(errno),
        })
    }

    /// `<root>/<namespace>/<plural>`, after checking the namespace.
    fn dir<T: Resource>(&self, namespace: &str) -> Result<PathBuf> {
        if !is_dns1123_label(namespace) {
            return Err(Error::Invalid {
                path: format!("{} namespace {namespace:?}", T::KIND),
                message: "a namespace must be a DNS-1123 label (at most 63 characters of a-z, 0-9 \
                          and '-', starting and ending with a letter or digit)"
                    .into(),
            });
        }
        Ok(self.root.join(namespace).join(T::PLURAL))
    }

    /// The object's file, after checking namespace and name.
    fn path<T: Resource>(&self, key: &NamespacedName) -> Result<PathBuf> {
        let dir = self.dir::<T>(&key.namespace)?;
        if !is_dns1123_subdomain(&key.name) || key.name.is_empty() {
            return Err(Error::Invalid {
                path: format!("{} {key}", T::KIND),
                message: format!(
                    "name {:?} is not a DNS-1123 subdomain (at most 253 characters of a-z, 0-9, \
                     '-' and '.', each dot-separated part starting and ending with a letter or \
                     digit)",
                    key.name
                ),
            });
        }
        Ok(dir.join(format!("{}.yaml", file_stem(&key.name))))
    }

    /// The keys of every managed WorkloadEntry in the folder (reading only the files whose
    /// name is not the object's name, and skipping unreadable ones: this is a change
    /// detector, not a listing).
    /// The modification time of every namespace's entry folder (and of the root, where
    /// namespaces appear), taken before a scan; `None` when a time is too recent to trust
    /// (file times are coarse, whole seconds on some file systems: a change within the same
    /// tick could leave a time unchanged) or cannot be read. Equal stamps mean no entry file
    /// came or went.
    fn entry_folder_stamps(&self) -> Option<Vec<(String, std::time::SystemTime)>> {
        let now = std::time::SystemTime::now();
        let settled = |t: std::time::SystemTime| {
            now.duration_since(t)
                // Some file systems keep whole seconds (ext4 with small inodes, FAT, some
                // NFS servers): a time is trusted once it is older than that granularity.
                .is_ok_and(|age| age > std::time::Duration::from_secs(2))
        };
        let mut stamps = Vec::new();
        let root = fs::metadata(&self.root).and_then(|m| m.modified()).ok()?;
        if !settled(root) {
            return None;
        }
        stamps.push((String::new(), root));
        for ns in read_dir(&self.root).ok()? {
            if !is_dns1123_label(&ns) {
                continue;
            }
            let Ok(dir) = self.dir::<WorkloadEntry>(&ns) else {
                continue;
            };
            match fs::metadata(&dir).and_then(|m| m.modified()) {
                Ok(t) if settled(t) => stamps.push((ns, t)),
                Ok(_) => return None,
                // No entry folder (yet): its creation changes the namespace folder, not the
                // root; stamp it as absent.
                Err(_) => stamps.push((ns, std::time::UNIX_EPOCH)),
            }
        }
        Some(stamps)
    }

    fn entry_keys(&self) -> Result<std::collections::BTreeSet<NamespacedName>> {
        let mut keys = std::collections::BTreeSet::new();
        for ns in read_dir(&self.root)? {
            if !is_dns1123_label(&ns) || !self.root.join(&ns).is_dir() {
                continue;
            }
            let dir = self.dir::<WorkloadEntry>(&ns)?;
            for file in read_dir(&dir)? {
                let Some(stem) = file.strip_suffix(".yaml").filter(|_| !file.starts_with('.')) else {
                    continue;
                };
                if stem.len() <= LONG_NAME_PREFIX {
                    keys.insert(NamespacedName::new(&ns, stem));
                } else if let Ok(Some(e)) =
                    read_file::<WorkloadEntry>(&dir.join(&file), &NamespacedName::new(&ns, stem))
                {
                    keys.insert(e.key());
                }
            }
        }
        Ok(keys)
    }

    /// Reads one object; `None` if its file is absent or empty.
    fn read<T: Resource>(&self, key: &NamespacedName) -> Result<Option<T>> {
        let path = self.path::<T>(key)?;
        read_file::<T>(&path, key)
    }

    /// Every object of kind `T` in one or all namespaces, sorted by namespace and name.
    fn list<T: Resource>(&self, namespace: Option<&str>) -> Result<Vec<T>> {
        let namespaces = match namespace {
            Some(ns) => {
                self.dir::<T>(ns)?;
                vec![ns.to_owned()]
            }
            None => {
                let mut all: Vec<String> = read_dir(&self.root)?
                    .into_iter()
                    .filter(|name| is_dns1123_label(name) && self.root.join(name).is_dir())
                    .collect();
                all.sort();
                all
            }
        };
        let mut out = Vec::new();
        for ns in namespaces {
            let dir = self.dir::<T>(&ns)?;
            let mut files: Vec<String> = read_dir(&dir)?
                .into_iter()
                .filter(|f| !f.starts_with('.') && f.ends_with(".yaml"))
                .collect();
            files.sort();
            for file in files {
                let path = dir.join(&file);
                if !path.is_file() {
                    continue;
                }
                let stem = file.trim_end_matches(".yaml");
                let Some(obj) = read_file::<T>(&path, &NamespacedName::new(&ns, stem))? else {
                    continue;
                };
                out.push(obj);
            }
        }
        Ok(out)
    }

    /// Writes `new`, keeping the identity of the stored object it replaces; `adjust` may
    /// change `new` knowing the stored object first. Call with the lock held.
    fn replace<T: Resource>(
        &self,
        mut new: T,
        adjust: impl FnOnce(&mut T, Option<&T>) -> Result<()>,
    ) -> Result<T> {
        let key = new.key();
        let path = self.path::<T>(&key)?;
        let old = read_file::<T>(&path, &key)?;
        adjust(&mut new, old.as_ref())?;
        let new = stamp(new, old.as_ref())?;
        write_atomic(&path, &new)?;
        Ok(new)
    }

    /// Read-modify-write of an existing object; [`Error::NotFound`] if absent. Call with the
    /// lock held.
    fn modify<T: Resource>(
        &self,
        key: &NamespacedName,
        change: impl FnOnce(&mut T) -> Result<()>,
    ) -> Result<T> {
        let path = self.path::<T>(key)?;
        let Some(old) = read_file::<T>(&path, key)? else {
            return Err(Error::NotFound {
                kind: T::KIND,
                key: key.clone(),
            });
        };
        let mut new = old.clone();
        change(&mut new)?;
        let new = stamp(new, Some(&old))?;
        write_atomic(&path, &new)?;
        Ok(new)
    }

    /// Removes an object's file; `false` if it was not there. Call with the lock held.
    fn remove<T: Resource>(&self, key: &NamespacedName) -> Result<bool> {
        let path = self.path::<T>(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {
                sync_dir(parent(&path)?)?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(Error::Io {
                context: format!("deleting {}", path.display()),
                source,
            }),
        }
    }

    /// Takes one use of a join token. Call with the lock held.
    fn consume(&self, key: &NamespacedName, given: &str, now: OffsetDateTime) -> Result<JoinToken> {
        let unusable = |reason: String| Error::TokenUnusable {
            namespace: key.namespace.clone(),
            id: key.name.clone(),
            reason,
        };
        let path = self.path::<JoinToken>(key)?;
        let Some(old) = read_file::<JoinToken>(&path, key)? else {
            return Err(unusable(
                "does not exist: check the token id, or create a new one with gangplank token \
                 create"
                    .into(),
            ));
        };
        let stored = old.spec.secret_sha256.to_ascii_lowercase();
        if stored.len() != 64 || !stored.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Invalid {
                path: path.display().to_string(),
                message: "spec.secretSha256 must be 64 hex digits: recreate the token with \
                          gangplank token create"
                    .into(),
            });
        }
        // Check the secret first, so that nothing about the token leaks to a caller without it.
        if !bool::from(stored.as_bytes().ct_eq(given.as_bytes())) {
            return Err(unusable(
                "does not match: check that the whole token <id>.<secret> was copied".into(),
            ));
        }
        let expires_at =
            OffsetDateTime::parse(&old.spec.expires_at, &Rfc3339).map_err(|e| Error::Invalid {
                path: path.display().to_string(),
                message: format!(
                    "spec.expiresAt {:?} is not an RFC 3339 time ({e}): recreate the token with \
                     gangplank token create",
                    old.spec.expires_at
                ),
            })?;
        if now >= expires_at {
            return Err(unusable(format!(
                "expired at {}: create a new one with gangplank token create",
                old.spec.expires_at
            )));
        }
        if old.status.used >= old.spec.uses {
            return Err(unusable(format!(
                "has no uses left (used {} of {}): create a new one with gangplank token create",
                old.status.used, old.spec.uses
            )));
        }
        let mut new = old.clone();
        new.status.used += 1;
        let new = stamp(new, Some(&old))?;
        write_atomic(&path, &new)?;
        Ok(new)
    }
}

/// The file stem for `name` (which is a valid DNS-1123 subdomain, so ASCII).
fn file_stem(name: &str) -> String {
    if name.len() <= MAX_PLAIN_NAME {
        return name.to_owned();
    }
    let digest = Sha256::digest(name.as_bytes());
    let hash: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let head = name.get(..LONG_NAME_PREFIX).unwrap_or(name);
    format!("{head}-{hash}")
}

/// Names of the entries of a folder; empty if the folder does not exist.
fn read_dir(dir: &Path) -> Result<Vec<String>> {
    let io_err = |source| Error::Io {
        context: format!("listing {}", dir.display()),
        source,
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err)?;
        // Names that are not UTF-8 cannot be ours (nor valid Kubernetes names).
        if let Ok(name) = entry.file_name().into_string() {
            names.push(name);
        }
    }
    Ok(names)
}

/// Reads and checks the object that should be `key` at `path`; `None` if absent or empty.
fn read_file<T: Resource>(path: &Path, key: &NamespacedName) -> Result<Option<T>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::Io {
                context: format!("reading {}", path.display()),
                source,
            });
        }
    };
    if text.trim().is_empty() {
        return Ok(None);
    }
    let invalid = |message: String| Error::Invalid {
        path: path.display().to_string(),
        message,
    };
    let obj: T = serde_saphyr::from_str(&text)
        .map_err(|e| invalid(format!("not a valid {}: {e}; fix or remove the file", T::KIND)))?;
    let header =
        serde_json::to_value(&obj).map_err(|e| invalid(format!("cannot be represented as JSON: {e}")))?;
    let kind = header.get("kind").and_then(|v| v.as_str()).unwrap_or("");
    if kind != T::KIND {
        return Err(invalid(format!(
            "kind is {kind:?} but files under {}/ must be {}: fix kind or move the file",
            T::PLURAL,
            T::KIND
        )));
    }
    let api_version = header.get("apiVersion").and_then(|v| v.as_str()).unwrap_or("");
    if group_of(api_version) != group_of(T::API_VERSION) {
        return Err(invalid(format!(
            "apiVersion {api_version:?} is not in API group {}: set apiVersion: {}",
            group_of(T::API_VERSION),
            T::API_VERSION
        )));
    }
    let meta = obj.meta();
    if meta.namespace.as_deref() != Some(key.namespace.as_str()) {
        return Err(invalid(format!(
            "metadata.namespace is {:?} but the file lies in folder {}: set metadata.namespace: {}",
            meta.namespace.as_deref().unwrap_or(""),
            key.namespace,
            key.namespace
        )));
    }
    let name = meta.name.as_deref().unwrap_or("");
    if !is_dns1123_subdomain(name) || name.is_empty() || file_stem(name) != file_stem(&key.name) {
        return Err(invalid(format!(
            "metadata.name {name:?} does not match the file name: name the file \
             <metadata.name>.yaml (a DNS-1123 subdomain)"
        )));
    }
    Ok(Some(obj))
}

/// The API group of `group/version` (empty for the core group's bare `v1`).
fn group_of(api_version: &str) -> &str {
    api_version.rsplit_once('/').map_or("", |(g, _)| g)
}

/// Fills in what the store owns: apiVersion/kind, uid, creationTimestamp, resourceVersion and
/// generation, from the stored object `old` when there is one.
fn stamp<T: Resource>(new: T, old: Option<&T>) -> Result<T> {
    let key = new.key();
    let backend = |what: &str, e: serde_json::Error| Error::Backend(format!("{what} {} {key}: {e}", T::KIND));
    let mut value = serde_json::to_value(&new).map_err(|e| backend("encoding", e))?;
    let old_value = old
        .map(serde_json::to_value)
        .transpose()
        .map_err(|e| backend("encoding", e))?;
    if let Some(obj) = value.as_object_mut() {
        obj.insert("apiVersion".into(), T::API_VERSION.into());
        obj.insert("kind".into(), T::KIND.into());
    }
    let spec_changed = old_value
        .as_ref()
        .is_none_or(|o| o.get("spec") != value.get("spec"));
    let mut new: T = serde_json::from_value(value).map_err(|e| backend("decoding", e))?;

    let meta = new.meta_mut();
    match old.map(Resource::meta) {
        Some(old) => {
            meta.uid.clone_from(&old.uid);
            meta.creation_timestamp.clone_from(&old.creation_timestamp);
            let version = old
                .resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            meta.resource_version = Some((version + 1).to_string());
            let generation = old.generation.unwrap_or(0);
            meta.generation = Some(if spec_changed {
                generation + 1
            } else {
                generation.max(1)
            });
        }
        None => {
            meta.uid = Some(new_uid());
            meta.creation_timestamp = Some(now_time()?);
            meta.resource_version = Some("1".into());
            meta.generation = Some(1);
        }
    }
    if meta.uid.is_none() {
        meta.uid = Some(new_uid());
    }
    if meta.creation_timestamp.is_none() {
        meta.creation_timestamp = Some(now_time()?);
    }
    Ok(new)
}

/// A random version-4 UUID, as Kubernetes gives every object.
fn new_uid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The current time at second precision, as Kubernetes stores timestamps.
fn now_time() -> Result<Time> {
    let seconds = OffsetDateTime::now_utc().unix_timestamp();
    k8s_openapi::jiff::Timestamp::from_second(seconds)
        .map(Time)
        .map_err(|e| Error::Backend(format!("the system clock is out of range: {e}")))
}

/// The parent folder of an object file.
fn parent(path: &Path) -> Result<&Path> {
    path.parent().ok_or_else(|| Error::Invalid {
        path: path.display().to_string(),
        message: "has no parent folder".into(),
    })
}

/// Writes `obj` to `path` atomically ([`gangplank_fs::write`]: temp file, exact mode, fsync,
/// rename, fsync of the folder), creating (and fsyncing) missing folders first.
fn write_atomic<T: Resource>(path: &Path, obj: &T) -> Result<()> {
    let yaml = serde_saphyr::to_string(obj)
        .map_err(|e| Error::Backend(format!("encoding {} {} as YAML: {e}", T::KIND, obj.key())))?;
    let dir = parent(path)?;
    create_dirs(dir)?;
    // Join tokens hold a secret's hash, bindings a VM's verified facts: not for every reader.
    let mode = if T::KIND == JoinToken::KIND || T::KIND == WorkloadBinding::KIND {
        0o600
    } else {
        0o644
    };
    gangplank_fs::write(path, yaml.as_bytes(), mode).map_err(fs_err)
}

/// Creates `dir` and any missing parents, fsyncing each parent that got a new child so the
/// new folders survive a crash.
fn create_dirs(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent_dir = parent(dir)?;
    create_dirs(parent_dir)?;
    match fs::create_dir(dir) {
        Ok(()) => sync_dir(parent_dir),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(Error::Io {
            context: format!("creating folder {}", dir.display()),
            source,
        }),
    }
}

/// Fsyncs a folder, making renames and removals in it durable.
fn sync_dir(dir: &Path) -> Result<()> {
    gangplank_fs::sync_dir(dir).map_err(fs_err)
}

/// A failed write or fsync of the atomic-write helper, as this module reports I/O errors.
fn fs_err(e: gangplank_fs::Error) -> Error {
    Error::Io {
        context: format!("cannot {} {}", e.action, e.path.display()),
        source: e.source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_fit_in_a_file_name() {
        let name = format!("{}.b", "a".repeat(251));
        let stem = file_stem(&name);
        assert!(format!("{stem}.yaml").len() <= 255, "{stem}");
        assert_ne!(stem, file_stem(&format!("{}.c", "a".repeat(251))));
        assert_eq!(file_stem("short"), "short");
    }

    #[test]
    fn uids_look_like_uuids() {
        let a = new_uid();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_ne!(a, new_uid());
    }

    #[test]
    fn groups_of_api_versions() {
        assert_eq!(group_of("networking.istio.io/v1"), "networking.istio.io");
        assert_eq!(group_of("v1"), "");
    }
}
