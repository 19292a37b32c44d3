//! What the agent keeps across restarts, reboots and upgrades, in `files.stateDir`: the
//! VM's bound key ([`gangplank_identity::bound`]) and the registration it is bound to, so a
//! restarted agent rejoins with its key instead of a (spent) first-join credential.

use std::path::{Path, PathBuf};

use gangplank_api::NamespacedName;
use serde::{Deserialize, Serialize};

/// The registration file's name in the state dir.
pub const REGISTRATION_FILE: &str = "registration.json";

/// Where the VM's bound key is: the platform's key file when the identity is a cloud
/// platform's (AWS proves its first join with it), else `instance-key.pem` in the state dir.
pub fn key_path(agent: &crate::config::Agent) -> PathBuf {
    match &agent.identity {
        crate::config::Identity::Platform { key_file, .. } => key_file.clone(),
        _ => agent.files.state_dir.join(gangplank_identity::bound::KEY_FILE),
    }
}

/// The registration the VM's key is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Registration {
    /// The WorkloadGroup joined (`namespace/name`).
    pub workload_group: String,
    /// The WorkloadEntry (and binding) name, in the group's namespace.
    pub entry: String,
    /// The onboarding endpoint it was made at (`host:port`), for a person reading the file.
    pub endpoint: String,
}

impl Registration {
    /// The registration in `dir`, if there is a readable one. An unreadable file is logged
    /// and ignored (the agent then joins with its first-join credential and rewrites it).
    pub fn load(dir: &Path) -> Option<Self> {
        let path = dir.join(REGISTRATION_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the registration; joining with the first-join credential");
                return None;
            }
        };
        serde_json::from_slice(&text)
            .inspect_err(|e| {
                tracing::warn!(path = %path.display(), error = %e, "the registration is malformed; joining with the first-join credential");
            })
            .ok()
    }

    /// Whether this registration is for `group`.
    pub fn is_for(&self, group: &NamespacedName) -> bool {
        self.workload_group == group.to_string()
    }

    /// Writes the registration to `dir` (atomically, mode 0600).
    pub fn save(&self, dir: &Path) -> Result<(), String> {
        let path = dir.join(REGISTRATION_FILE);
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        gangplank_fs::write(&path, &bytes, 0o600).map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// Forgets the registration in `dir` (its binding is gone); the key stays.
    pub fn forget(dir: &Path) {
        let path = dir.join(REGISTRATION_FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove the registration"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_round_trip_privately_and_garbage_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("var/lib/gangplank");
        assert_eq!(Registration::load(&state), None);
        let r = Registration {
            workload_group: "bookinfo/ratings".into(),
            entry: "ratings-token-abc-0123456789".into(),
            endpoint: "127.0.0.1:15443".into(),
        };
        r.save(&state).expect("saved");
        assert_eq!(Registration::load(&state), Some(r.clone()));
        assert!(r.is_for(&NamespacedName::new("bookinfo", "ratings")));
        assert!(!r.is_for(&NamespacedName::new("bookinfo", "reviews")));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.join(REGISTRATION_FILE))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(state.join(REGISTRATION_FILE), b"{not json").expect("write");
        assert_eq!(Registration::load(&state), None);
        Registration::forget(&state);
        assert!(!state.join(REGISTRATION_FILE).exists());
    }
}
