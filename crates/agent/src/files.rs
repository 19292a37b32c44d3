//! Writes the sidecar's boot files where Istio's VM package expects them.
//!
//! Every file is replaced atomically (temp file in the same directory, write, fsync, chmod,
//! chown, rename, fsync the directory), so a crash never leaves a half-written file; a file
//! whose content did not change is not touched, and the caller learns which files changed
//! so the sidecar restarts only when needed. The hosts file is shared with the rest of the
//! system: the agent only replaces its own marked block in it.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use gangplank_api::proto::BootFile;

use crate::config;

/// First line of the agent's block in the hosts file.
pub const HOSTS_BEGIN: &str = "# BEGIN gangplank";
/// Second line of the agent's block.
pub const HOSTS_NOTE: &str = "# managed by gangplank-agent: edits inside this block are overwritten";
/// Last line of the agent's block in the hosts file.
pub const HOSTS_END: &str = "# END gangplank";

/// Why boot files could not be written. Nothing was written when planning failed
/// (unknown name, bad mode, malformed hosts block).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The endpoint sent a file this agent does not know.
    #[error(
        "the endpoint sent boot file {0:?}, which this agent does not know (it knows cluster.env, mesh.yaml, root-cert.pem, istio-token, hosts): upgrade gangplank-agent to the endpoint's version"
    )]
    UnknownFile(String),
    /// The endpoint sent the same file twice.
    #[error("the endpoint sent boot file {0} twice: this is an endpoint bug, report it")]
    Duplicate(Name),
    /// The mode has bits beyond rwx for user, group and others.
    #[error("the endpoint asked for mode {mode:o} on {name}, which has setuid/setgid/sticky bits: refused")]
    BadMode {
        /// The file.
        name: Name,
        /// The requested mode.
        mode: u32,
    },
    /// The hosts file has a begin marker without an end marker.
    #[error(
        "{0}: has a '{HOSTS_BEGIN}' line without a '{HOSTS_END}' line after it: remove the unfinished block by hand"
    )]
    HostsBlock(PathBuf),
    /// A file operation failed.
    #[error("{path}: cannot {action}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// A result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A boot file the agent knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Name {
    /// `cluster.env`: the sidecar's environment.
    ClusterEnv,
    /// `mesh.yaml`: the MeshConfig (ProxyConfig).
    Mesh,
    /// `root-cert.pem`: the mesh's root CA.
    RootCert,
    /// `istio-token`: the sidecar's bootstrap token (secret).
    Token,
    /// `hosts`: entries for istiod, kept in the agent's block of the hosts file.
    Hosts,
}

impl Name {
    /// Every boot file.
    pub const ALL: [Name; 5] = [
        Name::ClusterEnv,
        Name::Mesh,
        Name::RootCert,
        Name::Token,
        Name::Hosts,
    ];

    /// The name as in [`BootFile::name`].
    pub fn as_str(self) -> &'static str {
        match self {
            Name::ClusterEnv => "cluster.env",
            Name::Mesh => "mesh.yaml",
            Name::RootCert => "root-cert.pem",
            Name::Token => "istio-token",
            Name::Hosts => "hosts",
        }
    }

    /// The boot file called `name`, if the agent knows it.
    pub fn parse(name: &str) -> Option<Name> {
        Name::ALL.into_iter().find(|n| n.as_str() == name)
    }

    fn default_mode(self) -> u32 {
        match self {
            Name::Token => 0o600,
            _ => 0o644,
        }
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which boot files a write changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changed(BTreeSet<Name>);

impl Changed {
    /// Whether no file changed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `name` changed.
    pub fn contains(&self, name: Name) -> bool {
        self.0.contains(&name)
    }

    /// The changed files.
    pub fn names(&self) -> impl Iterator<Item = Name> + '_ {
        self.0.iter().copied()
    }

    /// Whether the sidecar must restart to pick the changes up. A new token alone does
    /// not need a restart: the sidecar reads it again on every certificate request.
    pub fn needs_restart(&self) -> bool {
        self.0.iter().any(|n| *n != Name::Token)
    }
}

impl fmt::Display for Changed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let names: Vec<&str> = self.0.iter().map(|n| n.as_str()).collect();
        f.write_str(&names.join(", "))
    }
}

/// Writes boot files to the configured paths.
#[derive(Debug, Clone)]
pub struct Writer {
    files: config::Files,
    token_owner: Option<(u32, u32)>,
}

/// One planned write.
struct Plan {
    name: Name,
    path: PathBuf,
    content: Vec<u8>,
    mode: u32,
    owner: Option<(u32, u32)>,
    unchanged: bool,
}

impl Writer {
    /// A writer for `files`. When the agent runs as root and `proxy_user` (a name or a
    /// numeric uid) exists, the token is given to that user so the sidecar can read it.
    pub fn new(files: config::Files, proxy_user: &str) -> Self {
        Writer {
            files,
            token_owner: proxy_owner(proxy_user),
        }
    }

    /// A writer that never changes owners (for tests and unprivileged runs).
    pub fn without_owner(files: config::Files) -> Self {
        Writer {
            files,
            token_owner: None,
        }
    }

    /// The configured paths.
    pub fn files(&self) -> &config::Files {
        &self.files
    }

    /// The path a boot file is written to.
    pub fn path(&self, name: Name) -> &Path {
        match name {
            Name::ClusterEnv => &self.files.cluster_env,
            Name::Mesh => &self.files.mesh,
            Name::RootCert => &self.files.root_cert,
            Name::Token => &self.files.token,
            Name::Hosts => &self.files.hosts,
        }
    }

    /// Writes `boot` files, each atomically, skipping those whose content is unchanged.
    /// Every name and mode is checked before anything is written.
    pub fn write(&self, boot: &[BootFile]) -> Result<Changed> {
        let mut seen = BTreeSet::new();
        let mut plans = Vec::with_capacity(boot.len());
        for file in boot {
            let name = Name::parse(&file.name).ok_or_else(|| Error::UnknownFile(file.name.clone()))?;
            if !seen.insert(name) {
                return Err(Error::Duplicate(name));
            }
            plans.push(self.plan(name, file)?);
        }

        let mut changed = Changed::default();
        for plan in plans {
            if plan.unchanged {
                // Permissions may still have drifted; fixing them is not a change.
                fix_mode(&plan.path, plan.mode)?;
                continue;
            }
            if plan.name == Name::Hosts {
                write_hosts(&plan)?;
            } else {
                write_atomic(&plan.path, &plan.content, plan.mode, plan.owner)?;
            }
            tracing::debug!(file = %plan.name, path = %plan.path.display(), "boot file written");
            changed.0.insert(plan.name);
        }
        Ok(changed)
    }

    fn plan(&self, name: Name, file: &BootFile) -> Result<Plan> {
        if file.mode & !0o777 != 0 {
            return Err(Error::BadMode {
                name,
                mode: file.mode,
            });
        }
        let mut mode = if file.mode == 0 {
            name.default_mode()
        } else {
            file.mode
        };
        let path = self.path(name).to_path_buf();
        let existing = match fs::read(&path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(Error::Io {
                    path,
                    action: "read the current file",
                    source,
                });
            }
        };
        let mut owner = None;
        let content = match name {
            Name::Hosts => {
                let current = existing
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                let block = String::from_utf8_lossy(&file.content);
                let merged = merge_hosts(&current, &block).ok_or_else(|| Error::HostsBlock(path.clone()))?;
                // The hosts file belongs to the system: keep its mode and owner.
                if let Ok(meta) = fs::metadata(&path) {
                    mode = meta.mode() & 0o777;
                    owner = Some((meta.uid(), meta.gid()));
                }
                merged.into_bytes()
            }
            Name::Token => {
                // A secret is never readable by group or others, whatever was asked.
                mode &= 0o700;
                owner = self.token_owner;
                file.content.clone()
            }
            _ => file.content.clone(),
        };
        let unchanged = existing.as_deref() == Some(content.as_slice());
        Ok(Plan {
            name,
            path,
            content,
            mode,
            owner,
            unchanged,
        })
    }
}

/// The hosts file with the agent's block replaced by `block` (removed when `block` has no
/// entries), or `None` when the file has a begin marker without an end marker.
pub fn merge_hosts(current: &str, block: &str) -> Option<String> {
    let entries: Vec<&str> = block
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();

    let mut before = Vec::new();
    let mut after = Vec::new();
    let mut state = 0; // 0: before the block, 1: inside, 2: after
    for line in current.lines() {
        match state {
            0 if line.trim() == HOSTS_BEGIN => {
                state = 1;
            }
            0 => before.push(line),
            1 if line.trim() == HOSTS_END => state = 2,
            1 => {}
            _ => after.push(line),
        }
    }
    if state == 1 {
        return None;
    }

    let mut out = String::with_capacity(current.len() + block.len() + 40);
    for line in &before {
        out.push_str(line);
        out.push('\n');
    }
    if !entries.is_empty() {
        out.push_str(HOSTS_BEGIN);
        out.push('\n');
        out.push_str(HOSTS_NOTE);
        out.push('\n');
        for e in &entries {
            out.push_str(e);
            out.push('\n');
        }
        out.push_str(HOSTS_END);
        out.push('\n');
    }
    for line in &after {
        out.push_str(line);
        out.push('\n');
    }
    Some(out)
}

/// Writes `content` to `path` atomically with `mode` (and `owner`), creating parent
/// directories. No temporary file is left behind, whatever fails.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32, owner: Option<(u32, u32)>) -> Result<()> {
    let dir = parent(path);
    fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        action: "create the directory",
        source,
    })?;
    gangplank_fs::write_owned(path, content, mode, owner).map_err(|e| Error::Io {
        path: e.path,
        action: e.action,
        source: e.source,
    })
}

fn write_hosts(plan: &Plan) -> Result<()> {
    match write_atomic(&plan.path, &plan.content, plan.mode, plan.owner) {
        // In containers /etc/hosts is a bind mount that cannot be replaced by rename, and
        // under the packaged unit's ProtectSystem=strict only the file itself is writable,
        // not /etc: rewriting it in place is the only option there. Written over from the
        // start, then cut to length, so a reader never sees it empty.
        Err(Error::Io { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::ResourceBusy
                    | std::io::ErrorKind::CrossesDevices
                    | std::io::ErrorKind::ReadOnlyFilesystem
            ) =>
        {
            tracing::debug!(path = %plan.path.display(), "the hosts file cannot be replaced (a mount point, or its folder is read-only); rewriting it in place");
            let io = |action, source| Error::Io {
                path: plan.path.clone(),
                action,
                source,
            };
            let mut f = fs::OpenOptions::new()
                .write(true)
                .open(&plan.path)
                .map_err(|e| io("open", e))?;
            f.write_all(&plan.content).map_err(|e| io("write", e))?;
            f.set_len(plan.content.len() as u64)
                .map_err(|e| io("truncate", e))?;
            f.sync_all().map_err(|e| io("sync", e))
        }
        other => other,
    }
}

fn fix_mode(path: &Path, mode: u32) -> Result<()> {
    let meta = fs::metadata(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        action: "stat",
        source,
    })?;
    if meta.mode() & 0o777 != mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            action: "set the mode",
            source,
        })?;
    }
    Ok(())
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The uid/gid to give the token to: only when running as root and the user exists.
fn proxy_owner(user: &str) -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        tracing::debug!(user, "not running as root; the token keeps the agent's owner");
        return None;
    }
    let found = match user.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| (u.uid.as_raw(), u.gid.as_raw()))
            // A numeric uid need not exist in /etc/passwd (e.g. a container's user).
            .or(Some((uid, uid))),
        Err(_) => nix::unistd::User::from_name(user)
            .ok()
            .flatten()
            .map(|u| (u.uid.as_raw(), u.gid.as_raw())),
    };
    if found.is_none() {
        tracing::debug!(
            user,
            "proxy user does not exist; the token keeps the agent's owner"
        );
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(root: &Path) -> config::Files {
        let mut agent = config::Agent::default();
        let text = format!("files:\n  root: {}\n", root.display());
        if let Ok(a) = config::Agent::parse(Path::new("agent.yaml"), &text) {
            agent = a;
        }
        agent.files
    }

    fn boot(name: &str, content: &str, mode: u32) -> BootFile {
        BootFile {
            name: name.into(),
            content: content.as_bytes().to_vec(),
            mode,
        }
    }

    fn all(token: &str, hosts: &str) -> Vec<BootFile> {
        vec![
            boot("cluster.env", "ISTIO_NAMESPACE='bookinfo'\n", 0o644),
            boot(
                "mesh.yaml",
                "defaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n",
                0o644,
            ),
            boot("root-cert.pem", "-----BEGIN CERTIFICATE-----\n", 0o644),
            boot("istio-token", token, 0o600),
            boot("hosts", hosts, 0o644),
        ]
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("stat").mode() & 0o777
    }

    fn leftovers(dir: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).expect("read_dir") {
                let p = e.expect("entry").path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.to_string_lossy().contains(".gangplank-") {
                    found.push(p);
                }
            }
        }
        found
    }

    #[test]
    fn writes_every_file_with_its_mode_and_no_temp_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = Writer::without_owner(layout(dir.path()));
        let changed = w
            .write(&all("tok-1", "10.0.0.1 istiod.istio-system.svc\n"))
            .expect("write");
        assert_eq!(changed.names().collect::<Vec<_>>(), Name::ALL.to_vec());
        assert!(changed.needs_restart());

        let f = w.files();
        assert_eq!(
            fs::read_to_string(&f.cluster_env).expect("env"),
            "ISTIO_NAMESPACE='bookinfo'\n"
        );
        assert!(f.cluster_env.starts_with(dir.path().join("var/lib/istio/envoy")));
        assert_eq!(fs::read_to_string(&f.token).expect("token"), "tok-1");
        assert_eq!(mode(&f.token), 0o600);
        assert_eq!(mode(&f.cluster_env), 0o644);
        assert_eq!(mode(&f.mesh), 0o644);
        assert!(
            fs::read_to_string(&f.mesh)
                .expect("mesh")
                .contains("discoveryAddress")
        );
        let hosts = fs::read_to_string(&f.hosts).expect("hosts");
        assert!(hosts.contains("10.0.0.1 istiod.istio-system.svc\n"), "{hosts}");
        assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
    }

    #[test]
    fn token_is_never_group_or_world_readable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = Writer::without_owner(layout(dir.path()));
        w.write(&[boot("istio-token", "t", 0o644)]).expect("write");
        assert_eq!(mode(&w.files().token), 0o600);
        w.write(&[boot("istio-token", "t2", 0)]).expect("write");
        assert_eq!(mode(&w.files().token), 0o600);
    }

    #[test]
    fn unchanged_files_are_not_touched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = Writer::without_owner(layout(dir.path()));
        let files = all("tok-1", "10.0.0.1 istiod.istio-system.svc\n");
        w.write(&files).expect("write");
        let inode = |p: &Path| {
            let m = fs::metadata(p).expect("stat");
            (m.ino(), m.mtime(), m.mtime_nsec())
        };
        let before: Vec<_> = Name::ALL.iter().map(|n| inode(w.path(*n))).collect();

        let changed = w.write(&files).expect("second write");
        assert!(changed.is_empty(), "{changed}");
        let after: Vec<_> = Name::ALL.iter().map(|n| inode(w.path(*n))).collect();
        assert_eq!(before, after);

        // Only the token changes: only it is rewritten, and no restart is needed.
        let changed = w
            .write(&all("tok-2", "10.0.0.1 istiod.istio-system.svc\n"))
            .expect("third write");
        assert_eq!(changed.names().collect::<Vec<_>>(), vec![Name::Token]);
        assert!(!changed.needs_restart());
        assert_eq!(inode(w.path(Name::Mesh)), before[1]);
        assert_ne!(inode(w.path(Name::Token)), before[3]);
    }

    #[test]
    fn hosts_block_is_replaced_idempotently_and_the_rest_preserved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = Writer::without_owner(layout(dir.path()));
        let hosts = w.path(Name::Hosts).to_path_buf();
        fs::create_dir_all(hosts.parent().expect("parent")).expect("mkdir");
        fs::write(&hosts, "127.0.0.1 localhost\n::1 localhost\n").expect("seed hosts");
        fs::set_permissions(&hosts, fs::Permissions::from_mode(0o640)).expect("chmod");

        w.write(&[boot("hosts", "10.0.0.1 istiod.istio-system.svc", 0o644)])
            .expect("first");
        let first = fs::read_to_string(&hosts).expect("read");
        assert!(
            first.starts_with("127.0.0.1 localhost\n::1 localhost\n# BEGIN gangplank"),
            "{first}"
        );
        assert!(
            first.ends_with("10.0.0.1 istiod.istio-system.svc\n# END gangplank\n"),
            "{first}"
        );
        assert_eq!(mode(&hosts), 0o640, "the hosts file keeps its mode");

        // Someone appends after the block; the agent's next update keeps it.
        fs::write(&hosts, format!("{first}192.168.1.5 printer\n")).expect("append");
        let changed = w
            .write(&[boot("hosts", "10.0.0.2 istiod.istio-system.svc\n", 0o644)])
            .expect("second");
        assert!(changed.contains(Name::Hosts));
        let second = fs::read_to_string(&hosts).expect("read");
        assert_eq!(second.matches(HOSTS_BEGIN).count(), 1, "{second}");
        assert!(!second.contains("10.0.0.1"), "{second}");
        assert!(
            second.contains("10.0.0.2 istiod.istio-system.svc\n# END gangplank\n192.168.1.5 printer\n"),
            "{second}"
        );
        assert!(
            second.starts_with("127.0.0.1 localhost\n::1 localhost\n"),
            "{second}"
        );

        let changed = w
            .write(&[boot("hosts", "10.0.0.2 istiod.istio-system.svc\n", 0o644)])
            .expect("third");
        assert!(changed.is_empty());
        assert_eq!(fs::read_to_string(&hosts).expect("read"), second);

        // An empty block removes the agent's lines and nothing else.
        w.write(&[boot("hosts", "", 0o644)]).expect("remove");
        assert_eq!(
            fs::read_to_string(&hosts).expect("read"),
            "127.0.0.1 localhost\n::1 localhost\n192.168.1.5 printer\n"
        );
    }

    #[test]
    fn unfinished_hosts_block_is_refused_and_nothing_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = Writer::without_owner(layout(dir.path()));
        let hosts = w.path(Name::Hosts).to_path_buf();
        fs::create_dir_all(hosts.parent().expect("parent")).expect("mkdir");
        fs::write(&hosts, "127.0.0.1 localhost\n# BEGIN gangplank\n10.0.0.1 x\n").expect("seed");
        let e = w.write(&all("t", "10.0.0.2 istiod\n")).unwrap_err();
        assert!(matches!(e, Error::HostsBlock(_)), "{e}");
        assert!(!w.path(Name::Token).exists());
        assert!(!w.path(Name::ClusterEnv).exists());
    }

    #[test]
    fn unknown_name_or_bad_mode_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = Writer::without_owner(layout(dir.path()));
        let mut files = all("t", "");
        files.push(boot("../../etc/passwd", "root::0:0::/:/bin/sh\n", 0o644));
        let e = w.write(&files).unwrap_err();
        assert!(e.to_string().contains("../../etc/passwd"), "{e}");
        assert!(Name::ALL.iter().all(|n| !w.path(*n).exists()));

        let e = w.write(&[boot("cluster.env", "A=1\n", 0o4755)]).unwrap_err();
        assert!(matches!(e, Error::BadMode { .. }), "{e}");
        assert!(!w.path(Name::ClusterEnv).exists());

        let e = w
            .write(&[boot("mesh.yaml", "a", 0o644), boot("mesh.yaml", "b", 0o644)])
            .unwrap_err();
        assert!(matches!(e, Error::Duplicate(Name::Mesh)), "{e}");
        assert!(!w.path(Name::Mesh).exists());
    }

    #[test]
    fn failed_write_leaves_the_old_file_and_no_temp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("sub/file");
        write_atomic(&target, b"old", 0o644, None).expect("first");
        // The target is now a directory: rename over it fails after the temp was written.
        let blocked = dir.path().join("sub/dir");
        fs::create_dir_all(blocked.join("inner")).expect("mkdir");
        assert!(write_atomic(&blocked, b"new", 0o644, None).is_err());
        assert_eq!(fs::read(&target).expect("read"), b"old");
        assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
    }

    #[test]
    fn merge_hosts_appends_to_a_file_without_trailing_newline() {
        let merged = merge_hosts("127.0.0.1 localhost", "10.0.0.1 istiod\n").expect("merge");
        assert_eq!(
            merged,
            "127.0.0.1 localhost\n# BEGIN gangplank\n# managed by gangplank-agent: edits inside this block are overwritten\n10.0.0.1 istiod\n# END gangplank\n"
        );
        assert_eq!(merge_hosts(&merged, "10.0.0.1 istiod").expect("again"), merged);
    }
}
