//! Atomic file writes with an exact mode: the one way Gangplank replaces a file.
//!
//! [`write`] puts the content in a new hidden temp file in the target's folder
//! (`.<file name>.gangplank-<random>.tmp`, created `0600` under a name nobody else holds, so a
//! leftover of an earlier crash can neither be reused nor lend it its mode), sets the mode
//! exactly (the umask does not apply), writes, fsyncs, renames it over the target and fsyncs
//! the folder. A reader sees the old file or the complete new one, never a partial one or
//! one with the wrong mode; a crash leaves at worst a hidden temp file, and a failed write
//! removes its temp file.

use std::fs::{File, Permissions};
use std::io::{self, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

/// How much of the target's file name goes into the temp file's name, so the temp name of
/// a 255-byte file name still fits in 255 bytes.
const NAME_IN_TEMP: usize = 200;

/// A write that failed: what was being done, to which path, and what the OS said.
#[derive(Debug, thiserror::Error)]
#[error("{}: cannot {action}: {source}", path.display())]
pub struct Error {
    /// The file or folder the failed step was about.
    pub path: PathBuf,
    /// The step that failed (`write`, `replace the file`, ...).
    pub action: &'static str,
    /// What the OS said (its kind is kept, e.g. `ResourceBusy` when the target is a mount).
    #[source]
    pub source: io::Error,
}

/// Replaces `path` atomically with `contents`, with exactly `mode` (e.g. `0o600`). The
/// folder must exist.
pub fn write(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    write_owned(path, contents, mode, None)
}

/// Like [`write`], and gives the file to `owner` (`(uid, gid)`) before it becomes visible.
pub fn write_owned(path: &Path, contents: &[u8], mode: u32, owner: Option<(u32, u32)>) -> Result<(), Error> {
    let dir = parent(path);
    let mut temp = tempfile::Builder::new()
        .prefix(&temp_prefix(path))
        .suffix(".tmp")
        .rand_bytes(16)
        .tempfile_in(dir)
        .map_err(|source| Error {
            path: dir.to_path_buf(),
            action: "create a temporary file",
            source,
        })?;
    // From here on, dropping `temp` (on any error) removes the temp file.
    let temp_path = temp.path().to_path_buf();
    let io = |action, source| Error {
        path: temp_path.clone(),
        action,
        source,
    };
    temp.as_file()
        .set_permissions(Permissions::from_mode(mode))
        .map_err(|e| io("set the mode", e))?;
    temp.write_all(contents).map_err(|e| io("write", e))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(temp.as_file(), Some(uid), Some(gid))
            .map_err(|e| io("change the owner", e))?;
    }
    temp.as_file().sync_all().map_err(|e| io("sync", e))?;
    temp.persist(path).map_err(|e| Error {
        path: path.to_path_buf(),
        action: "replace the file",
        source: e.error,
    })?;
    sync_dir(dir)
}

/// Fsyncs a folder, making a rename (or removal) in it durable.
pub fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| Error {
            path: dir.to_path_buf(),
            action: "sync the directory",
            source,
        })
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `.<file name, cut to NAME_IN_TEMP bytes>.gangplank-`
fn temp_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut end = name.len().min(NAME_IN_TEMP);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!(".{}.gangplank-", &name[..end])
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::OpenOptionsExt as _;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// Every file in `dir` but `keep`.
    fn others(dir: &Path, keep: &[&str]) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !keep.contains(&n.as_str()))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn writes_the_whole_content_with_exactly_the_mode_asked() {
        let dir = tempfile::tempdir().unwrap();
        for wanted in [0o600, 0o644, 0o640, 0o400, 0o755] {
            let path = dir.path().join(format!("f{wanted:o}"));
            write(&path, b"line one\nline two\n", wanted).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), b"line one\nline two\n");
            assert_eq!(mode(&path), wanted, "{}", path.display());
        }
        let big = vec![7u8; 3 << 20];
        write(&dir.path().join("big"), &big, 0o600).unwrap();
        assert_eq!(std::fs::read(dir.path().join("big")).unwrap(), big);
    }

    #[test]
    fn an_existing_file_with_another_mode_is_replaced_with_the_mode_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, b"an older, longer content").unwrap();
        std::fs::set_permissions(&path, Permissions::from_mode(0o666)).unwrap();
        write(&path, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(mode(&path), 0o600);

        std::fs::set_permissions(&path, Permissions::from_mode(0o600)).unwrap();
        write(&path, b"public", 0o644).unwrap();
        assert_eq!(mode(&path), 0o644);
    }

    #[test]
    fn leftovers_of_a_crash_lend_neither_their_mode_nor_their_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        // What a crashed writer of the old fixed-name kind, or of this one, left behind.
        let mut leftovers = vec![".token.tmp".to_string(), "token.tmp".to_string()];
        for suffix in ["", "0000000000000000.tmp"] {
            leftovers.push(format!("{}{suffix}", temp_prefix(&path)));
        }
        for name in &leftovers {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o666)
                .open(dir.path().join(name))
                .unwrap()
                .write_all(b"half of an old")
                .unwrap();
            std::fs::set_permissions(dir.path().join(name), Permissions::from_mode(0o666)).unwrap();
        }
        write(&path, b"secret", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
        assert_eq!(mode(&path), 0o600);
        let mut expected = leftovers.clone();
        expected.sort();
        assert_eq!(
            others(dir.path(), &["token"]),
            expected,
            "only the old leftovers remain"
        );
    }

    #[test]
    fn no_temp_file_is_left_after_a_success() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.env");
        write(&path, b"A=1\n", 0o644).unwrap();
        write(&path, b"A=2\n", 0o644).unwrap();
        assert_eq!(others(dir.path(), &[]), ["cluster.env"]);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("file");
        write(&old, b"old", 0o644).unwrap();
        // The target is a non-empty folder: the rename fails after the temp file was written.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir_all(blocked.join("inner")).unwrap();
        let err = write(&blocked, b"new", 0o600).unwrap_err();
        assert_eq!(err.action, "replace the file", "{err}");
        assert_eq!(err.path, blocked);
        assert!(
            err.to_string().contains("blocked: cannot replace the file"),
            "{err}"
        );
        assert_eq!(std::fs::read(&old).unwrap(), b"old");
        assert_eq!(others(dir.path(), &[]), ["blocked", "file"]);

        // A missing folder fails before anything is created.
        let err = write(&dir.path().join("missing/file"), b"x", 0o600).unwrap_err();
        assert_eq!(err.action, "create a temporary file", "{err}");
        assert_eq!(others(dir.path(), &[]), ["blocked", "file"]);
    }

    #[test]
    fn the_longest_file_names_get_a_temp_name_that_fits() {
        let dir = tempfile::tempdir().unwrap();
        let name = format!("{}é.yaml", "a".repeat(248));
        assert_eq!(name.len(), 255);
        let path = dir.path().join(&name);
        write(&path, b"kind: WorkloadEntry\n", 0o644).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"kind: WorkloadEntry\n");
        assert_eq!(others(dir.path(), &[]), vec![name]);
        assert!(temp_prefix(&path).len() + 16 + ".tmp".len() <= 255);
        // A cut at byte 200 would split the `é` (bytes 199 and 200): it moves back before it.
        let cut = Path::new(&format!("{}é", "b".repeat(NAME_IN_TEMP - 1))).to_path_buf();
        assert_eq!(
            temp_prefix(&cut),
            format!(".{}.gangplank-", "b".repeat(NAME_IN_TEMP - 1))
        );
    }

    #[test]
    fn a_relative_path_writes_in_the_current_folder() {
        assert_eq!(parent(Path::new("file")), Path::new("."));
        assert_eq!(parent(Path::new("dir/file")), Path::new("dir"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_owner_is_set_when_asked() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("istio-token");
        let me = std::fs::metadata(dir.path()).unwrap();
        write_owned(&path, b"jwt", 0o600, Some((me.uid(), me.gid()))).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (me.uid(), me.gid()));
        assert_eq!(mode(&path), 0o600);
    }
}
