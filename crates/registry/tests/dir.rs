//! The directory registry, through its public API and the files it leaves behind.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use gangplank_api::istio::{WorkloadEntry, WorkloadEntrySpec, WorkloadGroup, WorkloadGroupSpec};
use gangplank_api::meta::ObjectMeta;
use gangplank_api::names::label;
use gangplank_api::policy::OnboardingPolicy;
use gangplank_api::token::{JoinToken, JoinTokenSpec, JoinTokenStatus};
use gangplank_api::{NamespacedName, Resource};
use gangplank_registry::{AnnotationPatch, Error, Registry as _, dir};
use time::{Duration, OffsetDateTime};

const SECRET_HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
/// Set in a child process spawned by `token_uses_are_counted_across_processes`.
const CHILD_ROOT_ENV: &str = "GANGPLANK_REGISTRY_TEST_CHILD_ROOT";

fn meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        ..Default::default()
    }
}

fn entry(namespace: &str, name: &str, managed: bool) -> WorkloadEntry {
    let mut m = meta(namespace, name);
    if managed {
        m.labels = Some(BTreeMap::from([(
            label::MANAGED_BY.to_string(),
            label::MANAGED_BY_VALUE.to_string(),
        )]));
    }
    WorkloadEntry::new(
        m,
        WorkloadEntrySpec {
            address: "10.0.0.7".into(),
            ports: BTreeMap::from([("http".to_string(), 8080)]),
            service_account: "ratings".into(),
            ..Default::default()
        },
    )
}

fn group(namespace: &str, name: &str) -> WorkloadGroup {
    WorkloadGroup {
        metadata: meta(namespace, name),
        spec: WorkloadGroupSpec::default(),
        ..Default::default()
    }
}

fn token(namespace: &str, id: &str, uses: u32, expires_at: OffsetDateTime) -> JoinToken {
    JoinToken {
        metadata: meta(namespace, id),
        spec: JoinTokenSpec {
            workload_group: "ratings".into(),
            secret_sha256: SECRET_HASH.into(),
            expires_at: expires_at
                .format(&time::format_description::well_known::Rfc3339)
                .expect("format time"),
            uses,
        },
        status: JoinTokenStatus::default(),
        ..Default::default()
    }
}

fn key(namespace: &str, name: &str) -> NamespacedName {
    NamespacedName::new(namespace, name)
}

/// Every file under `root`, relative, sorted.
fn files(root: &Path) -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).expect("read dir") {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                walk(&p, root, out);
            } else {
                out.push(p.strip_prefix(root).expect("prefix").display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn open() -> (tempfile::TempDir, dir::Registry) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let reg = dir::Registry::open(tmp.path().join("registry")).expect("open");
    (tmp, reg)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

#[tokio::test]
async fn crud_round_trip() -> anyhow::Result<()> {
    let (_tmp, reg) = open();

    let g = reg.put(&group("bookinfo", "ratings")).await?;
    assert_eq!(g.api_version, "networking.istio.io/v1");
    assert_eq!(g.kind, "WorkloadGroup");
    assert_eq!(reg.workload_group(&key("bookinfo", "ratings")).await?, Some(g));
    assert_eq!(reg.workload_group(&key("bookinfo", "other")).await?, None);

    let policy = OnboardingPolicy {
        metadata: meta("bookinfo", "allow-vms"),
        ..Default::default()
    };
    reg.put(&policy).await?;
    let policies = reg.policies("bookinfo").await?;
    assert_eq!(policies.len(), 1);
    assert_eq!(policies[0].metadata.name.as_deref(), Some("allow-vms"));
    assert!(reg.policies("default").await?.is_empty());

    let stored = reg.apply_entry(&entry("bookinfo", "ratings-vm-1", true)).await?;
    reg.apply_entry(&entry("other", "unmanaged", false)).await?;
    reg.apply_entry(&entry("other", "ratings-vm-2", true)).await?;
    assert_eq!(
        reg.entry(&key("bookinfo", "ratings-vm-1")).await?,
        Some(stored.clone())
    );
    let managed: Vec<_> = reg
        .managed_entries()
        .await?
        .into_iter()
        .map(|e| e.key().to_string())
        .collect();
    assert_eq!(managed, ["bookinfo/ratings-vm-1", "other/ratings-vm-2"]);
    assert_eq!(reg.list::<WorkloadEntry>(None).await?.len(), 3);
    assert_eq!(reg.list::<WorkloadEntry>(Some("other")).await?.len(), 2);

    let k = key("bookinfo", "ratings-vm-1");
    let mut patch = AnnotationPatch::default();
    patch.set.insert("a".into(), "1".into());
    patch.set.insert("b".into(), "2".into());
    reg.annotate_entry(&k, &patch).await?;
    let patch = AnnotationPatch {
        set: BTreeMap::from([("c".to_string(), "3".to_string())]),
        remove: vec!["a".into()],
    };
    reg.annotate_entry(&k, &patch).await?;
    let status = serde_json::json!({"conditions": [{"type": "Healthy", "status": "True"}]});
    reg.set_entry_status(&k, &status).await?;

    let e = reg.entry(&k).await?.expect("entry exists");
    let annotations = e.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations,
        BTreeMap::from([("b".into(), "2".into()), ("c".into(), "3".into())])
    );
    assert_eq!(e.status, Some(status));
    assert_eq!(e.metadata.resource_version.as_deref(), Some("4"));
    assert_eq!(e.metadata.uid, stored.metadata.uid);
    assert_eq!(
        e.metadata.generation,
        Some(1),
        "metadata changes keep the generation"
    );

    assert!(reg.delete_entry(&k).await?);
    assert!(!reg.delete_entry(&k).await?);
    assert_eq!(reg.entry(&k).await?, None);
    assert!(!reg.path_of::<WorkloadEntry>(&k)?.exists());
    Ok(())
}

#[tokio::test]
async fn layout_is_what_istiod_reads() -> anyhow::Result<()> {
    let (_tmp, reg) = open();
    reg.apply_entry(&entry("bookinfo", "ratings-vm-1", true)).await?;
    reg.put(&group("bookinfo", "ratings")).await?;
    reg.create_join_token(&token("bookinfo", "t1", 1, OffsetDateTime::now_utc()))
        .await?;
    assert_eq!(
        files(reg.root()),
        [
            ".lock",
            "bookinfo/jointokens/t1.yaml",
            "bookinfo/workloadentries/ratings-vm-1.yaml",
            "bookinfo/workloadgroups/ratings.yaml",
        ]
    );
    let entry_file = reg.root().join("bookinfo/workloadentries/ratings-vm-1.yaml");
    assert_eq!(mode(&entry_file), 0o644);
    assert_eq!(
        mode(&reg.root().join("bookinfo/workloadgroups/ratings.yaml")),
        0o644
    );
    assert_eq!(mode(&reg.root().join("bookinfo/jointokens/t1.yaml")), 0o600);

    let text = std::fs::read_to_string(&entry_file)?;
    let doc: serde_json::Value = serde_saphyr::from_str(&text)?;
    assert_eq!(doc["apiVersion"], "networking.istio.io/v1");
    assert_eq!(doc["kind"], "WorkloadEntry");
    assert_eq!(doc["metadata"]["namespace"], "bookinfo");
    assert_eq!(
        doc["metadata"]["resourceVersion"], "1",
        "a string, as in Kubernetes"
    );
    assert_eq!(doc["spec"]["ports"]["http"], 8080);
    Ok(())
}

#[tokio::test]
async fn apply_is_idempotent_and_versions_every_write() -> anyhow::Result<()> {
    let (_tmp, reg) = open();
    let e = entry("bookinfo", "ratings-vm-1", true);
    let first = reg.apply_entry(&e).await?;
    let second = reg.apply_entry(&e).await?;

    assert_eq!(
        files(reg.root()).len(),
        2,
        "the lock and one entry: {:?}",
        files(reg.root())
    );
    assert_eq!(first.metadata.resource_version.as_deref(), Some("1"));
    assert_eq!(second.metadata.resource_version.as_deref(), Some("2"));
    assert!(first.metadata.uid.as_deref().is_some_and(|u| u.len() == 36));
    assert_eq!(second.metadata.uid, first.metadata.uid);
    assert!(first.metadata.creation_timestamp.is_some());
    assert_eq!(
        second.metadata.creation_timestamp,
        first.metadata.creation_timestamp
    );
    assert_eq!(second.metadata.generation, Some(1), "same spec, same generation");

    // A caller cannot overwrite the identity the store owns.
    let mut forged = e.clone();
    forged.metadata.uid = Some("forged".into());
    forged.metadata.resource_version = Some("99".into());
    forged.spec.address = "10.0.0.8".into();
    let third = reg.apply_entry(&forged).await?;
    assert_eq!(third.metadata.uid, first.metadata.uid);
    assert_eq!(third.metadata.resource_version.as_deref(), Some("3"));
    assert_eq!(third.metadata.generation, Some(2), "spec changed");
    assert_eq!(reg.entry(&e.key()).await?, Some(third));

    // Status is a subresource: apply keeps it.
    let status = serde_json::json!({"conditions": [{"type": "Healthy", "status": "False"}]});
    reg.set_entry_status(&e.key(), &status).await?;
    let applied = reg.apply_entry(&e).await?;
    assert_eq!(applied.status, Some(status));
    Ok(())
}

#[tokio::test]
async fn no_temp_files_are_left_behind() -> anyhow::Result<()> {
    let (_tmp, reg) = open();
    let k = key("bookinfo", "ratings-vm-1");
    for i in 0..20 {
        let mut e = entry("bookinfo", "ratings-vm-1", true);
        e.spec.weight = Some(i);
        reg.apply_entry(&e).await?;
        reg.set_entry_status(&k, &serde_json::json!({"i": i})).await?;
    }
    reg.create_join_token(&token(
        "bookinfo",
        "t1",
        5,
        OffsetDateTime::now_utc() + Duration::hours(1),
    ))
    .await?;
    reg.consume_join_token(&key("bookinfo", "t1"), SECRET_HASH, OffsetDateTime::now_utc())
        .await?;
    assert_eq!(
        files(reg.root()),
        [
            ".lock",
            "bookinfo/jointokens/t1.yaml",
            "bookinfo/workloadentries/ratings-vm-1.yaml"
        ]
    );
    Ok(())
}

#[tokio::test]
async fn leftovers_of_a_crash_are_ignored() -> anyhow::Result<()> {
    let (_tmp, reg) = open();
    let stored = reg.apply_entry(&entry("bookinfo", "ratings-vm-1", true)).await?;
    let dir = reg.root().join("bookinfo/workloadentries");
    // A writer that crashed before its rename leaves a half-written hidden temp file...
    std::fs::write(
        dir.join(".ratings-vm-1.tmp-0123456789abcdef"),
        "apiVersion: networking.is",
    )?;
    std::fs::write(dir.join(".ratings-vm-2.tmp-0123456789abcdef"), "kind: [")?;
    // ...and an empty file, which istiod also skips, is not an object.
    std::fs::write(dir.join("empty.yaml"), "")?;
    // Other files are not ours.
    std::fs::write(dir.join("README.txt"), "not yaml")?;
    std::fs::write(
        reg.root().join("notes"),
        "a file where a namespace folder could be",
    )?;

    assert_eq!(reg.list::<WorkloadEntry>(None).await?, vec![stored.clone()]);
    assert_eq!(reg.entry(&key("bookinfo", "ratings-vm-1")).await?, Some(stored));
    assert_eq!(reg.entry(&key("bookinfo", "empty")).await?, None);
    assert_eq!(reg.managed_entries().await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn malformed_files_fail_loudly_with_their_path() -> anyhow::Result<()> {
    let (_tmp, reg) = open();
    reg.put(&OnboardingPolicy {
        metadata: meta("bookinfo", "good"),
        ..Default::default()
    })
    .await?;
    let bad = reg.root().join("bookinfo/onboardingpolicies/bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: onboarding.gangplank.dev/v1alpha1\nkind: OnboardingPolicy\nmetadata: {name: bad, namespace: bookinfo}\nspec: {alow: []}\n",
    )?;
    let err = reg.policies("bookinfo").await.expect_err("malformed policy");
    match &err {
        Error::Invalid { path, message } => {
            assert!(path.ends_with("bookinfo/onboardingpolicies/bad.yaml"), "{path}");
            assert!(message.contains("alow"), "{message}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_file_cannot_claim_another_namespace_or_name() -> anyhow::Result<()> {
    let (_tmp, reg) = open();
    let dir = reg.root().join("tenant-a/onboardingpolicies");
    std::fs::create_dir_all(&dir)?;
    let smuggled = "apiVersion: onboarding.gangplank.dev/v1alpha1\nkind: OnboardingPolicy\nmetadata: {name: p, namespace: tenant-b}\nspec: {}\n";
    std::fs::write(dir.join("p.yaml"), smuggled)?;
    let err = reg.policies("tenant-a").await.expect_err("namespace mismatch");
    assert!(err.to_string().contains("metadata.namespace"), "{err}");
    assert!(reg.policies("tenant-b").await?.is_empty());

    std::fs::write(dir.join("q.yaml"), smuggled.replace("tenant-b", "tenant-a"))?;
    std::fs::remove_file(dir.join("p.yaml"))?;
    let err = reg.policies("tenant-a").await.expect_err("name mismatch");
    assert!(err.to_string().contains("does not match the file name"), "{err}");

    let groups = reg.root().join("tenant-a/workloadgroups");
    std::fs::create_dir_all(&groups)?;
    std::fs::write(
        groups.join("g.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: g, namespace: tenant-a}\nspec: {}\n",
    )?;
    let err = reg
        .workload_group(&key("tenant-a", "g"))
        .await
        .expect_err("kind mismatch");
    assert!(err.to_string().contains("must be WorkloadGroup"), "{err}");
    Ok(())
}

#[tokio::test]
async fn path_traversal_is_refused_and_writes_nothing() -> anyhow::Result<()> {
    let (tmp, reg) = open();
    let before = files(tmp.path());
    for (ns, name) in [
        ("bookinfo", "../x"),
        ("bookinfo", ".."),
        ("bookinfo", "a/b"),
        ("bookinfo", ""),
        ("bookinfo", "UPPER"),
        ("..", "x"),
        ("a/b", "x"),
        ("", "x"),
        ("bookinfo.x", "x"),
    ] {
        let e = entry(ns, name, true);
        let err = reg.apply_entry(&e).await.expect_err("bad name applied");
        assert!(matches!(err, Error::Invalid { .. }), "{ns}/{name}: {err:?}");
        assert!(reg.entry(&key(ns, name)).await.is_err(), "{ns}/{name}");
        assert!(reg.put(&group(ns, name)).await.is_err(), "{ns}/{name}");
        assert!(reg.delete_entry(&key(ns, name)).await.is_err(), "{ns}/{name}");
        let t = token(ns, name, 1, OffsetDateTime::now_utc() + Duration::hours(1));
        assert!(reg.create_join_token(&t).await.is_err(), "{ns}/{name}");
    }
    assert!(reg.policies("..").await.is_err());
    assert_eq!(files(tmp.path()), before, "nothing was written");
    Ok(())
}

#[tokio::test]
async fn longest_names_are_stored() -> anyhow::Result<()> {
    let (_tmp, reg) = open();
    let name = gangplank_api::names::entry_name("ratings", "jwt", &[&"x".repeat(400)]);
    assert_eq!(name.len(), 253);
    let stored = reg.apply_entry(&entry("bookinfo", &name, true)).await?;
    assert_eq!(reg.entry(&key("bookinfo", &name)).await?, Some(stored));
    assert_eq!(reg.managed_entries().await?.len(), 1);
    assert!(reg.delete_entry(&key("bookinfo", &name)).await?);
    Ok(())
}

#[tokio::test]
async fn missing_entries_are_not_found() {
    let (_tmp, reg) = open();
    let k = key("bookinfo", "gone");
    let err = reg
        .annotate_entry(&k, &AnnotationPatch::default())
        .await
        .expect_err("annotate");
    assert!(
        matches!(
            err,
            Error::NotFound {
                kind: "WorkloadEntry",
                ..
            }
        ),
        "{err:?}"
    );
    let err = reg
        .set_entry_status(&k, &serde_json::json!({}))
        .await
        .expect_err("status");
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert!(reg.list::<WorkloadEntry>(None).await.expect("list").is_empty());
}

#[tokio::test]
async fn join_token_ids_are_unique() -> anyhow::Result<()> {
    let (_tmp, reg) = open();
    let t = token(
        "bookinfo",
        "t1",
        1,
        OffsetDateTime::now_utc() + Duration::hours(1),
    );
    reg.create_join_token(&t).await?;
    let path = reg.path_of::<JoinToken>(&t.key())?;
    let before = std::fs::read(&path)?;
    let mut other = t.clone();
    other.spec.uses = 100;
    let err = reg.create_join_token(&other).await.expect_err("duplicate id");
    assert!(matches!(err, Error::Conflict { .. }), "{err:?}");
    assert_eq!(std::fs::read(&path)?, before);
    let stored = reg.join_token(&t.key()).await?.expect("token");
    assert_eq!(stored.spec, t.spec);
    assert_eq!(stored.kind, "JoinToken");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_uses_never_exceed_the_limit() -> anyhow::Result<()> {
    let (_tmp, reg) = open();
    let now = OffsetDateTime::now_utc();
    reg.create_join_token(&token("bookinfo", "t1", 3, now + Duration::hours(1)))
        .await?;
    let k = key("bookinfo", "t1");
    let tasks: Vec<_> = (0..24)
        .map(|_| {
            let reg = reg.clone();
            let k = k.clone();
            tokio::spawn(async move { reg.consume_join_token(&k, SECRET_HASH, now).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await? {
            Ok(_) => ok += 1,
            Err(Error::TokenUnusable { reason, .. }) => {
                assert_eq!(
                    reason,
                    "has no uses left (used 3 of 3): create a new one with gangplank token create"
                );
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ok, 3);
    assert_eq!(reg.join_token(&k).await?.expect("token").status.used, 3);
    Ok(())
}

#[tokio::test]
async fn unusable_tokens_are_refused_and_unchanged() -> anyhow::Result<()> {
    let (_tmp, reg) = open();
    let now = OffsetDateTime::now_utc();
    let expires = now + Duration::minutes(5);
    reg.create_join_token(&token("bookinfo", "t1", 1, expires))
        .await?;
    let k = key("bookinfo", "t1");
    let path = reg.path_of::<JoinToken>(&k)?;
    let pristine = std::fs::read(&path)?;

    // Wrong secret: refused, says nothing about the token, changes nothing.
    let forged = "0".repeat(64);
    let err = reg
        .consume_join_token(&k, &forged, now)
        .await
        .expect_err("forged secret");
    let text = err.to_string();
    assert!(text.contains("does not match"), "{text}");
    assert!(!text.contains(SECRET_HASH) && !text.contains(&forged), "{text}");
    assert!(!text.contains("expire") && !text.contains("uses"), "{text}");
    assert_eq!(std::fs::read(&path)?, pristine);

    // Expired (exactly at expiry counts): refused, unchanged.
    let err = reg
        .consume_join_token(&k, SECRET_HASH, expires)
        .await
        .expect_err("expired");
    let text = err.to_string();
    assert!(
        text.starts_with("join token t1 in namespace bookinfo expired at "),
        "{text}"
    );
    assert!(
        text.ends_with(": create a new one with gangplank token create"),
        "{text}"
    );
    assert_eq!(std::fs::read(&path)?, pristine);

    // Unknown id: refused, nothing created.
    let err = reg
        .consume_join_token(&key("bookinfo", "nope"), SECRET_HASH, now)
        .await
        .expect_err("unknown id");
    assert!(matches!(err, Error::TokenUnusable { .. }), "{err:?}");
    assert!(!reg.path_of::<JoinToken>(&key("bookinfo", "nope"))?.exists());

    // The one use (hash case does not matter), then used up: refused, unchanged.
    let used = reg
        .consume_join_token(&k, &SECRET_HASH.to_uppercase(), now)
        .await?;
    assert_eq!(used.status.used, 1);
    let spent = std::fs::read(&path)?;
    let err = reg
        .consume_join_token(&k, SECRET_HASH, now)
        .await
        .expect_err("used up");
    assert_eq!(
        err.to_string(),
        "join token t1 in namespace bookinfo has no uses left (used 1 of 1): create a new one \
         with gangplank token create"
    );
    assert_eq!(std::fs::read(&path)?, spent);
    assert_eq!(mode(&path), 0o600);
    Ok(())
}

/// Not a test of its own: the body of each child process that
/// `token_uses_are_counted_across_processes` spawns. Without the variable it does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_process_consumes() {
    let Some(root) = std::env::var_os(CHILD_ROOT_ENV) else {
        return;
    };
    let reg = dir::Registry::open(PathBuf::from(root)).expect("open");
    // Start barrier: say we are ready, then wait for the parent's go.
    println!("\nREADY");
    tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new()))
        .await
        .expect("join")
        .expect("read go");
    let ok = consume_many(&reg, 8).await;
    println!("\nCONSUMED={ok}");
}

async fn consume_many(reg: &dir::Registry, n: usize) -> usize {
    let k = key("bookinfo", "shared");
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let reg = reg.clone();
            let k = k.clone();
            tokio::spawn(async move {
                reg.consume_join_token(&k, SECRET_HASH, OffsetDateTime::now_utc())
                    .await
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(_) => ok += 1,
            Err(Error::TokenUnusable { .. }) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_uses_are_counted_across_processes() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};

    let (_tmp, reg) = open();
    let uses = 10;
    reg.create_join_token(&token(
        "bookinfo",
        "shared",
        uses,
        OffsetDateTime::now_utc() + Duration::hours(1),
    ))
    .await?;
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for _ in 0..3 {
        let mut child = tokio::process::Command::new(&exe)
            .args([
                "--exact",
                "child_process_consumes",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ROOT_ENV, reg.root())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        children.push((child, stdin, stdout.lines_ready().await?));
    }
    // Every child is ready: let them race (3 processes x 8 tasks for 10 uses).
    for (_, stdin, _) in &mut children {
        stdin.write_all(b"go\n").await?;
        stdin.flush().await?;
    }
    let mut total = 0;
    for (mut child, _stdin, mut stdout) in children {
        let mut rest = String::new();
        stdout.read_to_string(&mut rest).await?;
        assert!(child.wait().await?.success(), "child failed: {rest}");
        let n: usize = rest
            .lines()
            .find_map(|l| l.strip_prefix("CONSUMED="))
            .ok_or_else(|| anyhow::anyhow!("child printed no count: {rest}"))?
            .parse()?;
        total += n;
    }
    assert_eq!(total, uses as usize, "exactly the allowed uses across processes");
    let t = reg.join_token(&key("bookinfo", "shared")).await?.expect("token");
    assert_eq!(t.status.used, uses);
    Ok(())
}

/// Reads a child's output up to its `READY` line.
trait ReadyExt: Sized {
    async fn lines_ready(self) -> anyhow::Result<Self>;
}

impl<R: tokio::io::AsyncBufRead + Unpin> ReadyExt for R {
    async fn lines_ready(mut self) -> anyhow::Result<Self> {
        use tokio::io::AsyncBufReadExt;
        let mut line = String::new();
        loop {
            line.clear();
            if self.read_line(&mut line).await? == 0 {
                anyhow::bail!("child exited before it was ready");
            }
            if line.trim_end() == "READY" {
                return Ok(self);
            }
        }
    }
}

/// A follower hears of every removed entry, also one removed right after it subscribed and
/// one re-created and removed again; nothing is told of entries that stay.
#[tokio::test]
async fn entry_removals_are_told_to_followers() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir::Registry::open(dir.path()).unwrap();
    reg.apply_entry(&entry("bookinfo", "vm-1", true)).await.unwrap();
    reg.apply_entry(&entry("bookinfo", "vm-2", true)).await.unwrap();
    let key = NamespacedName::new("bookinfo", "vm-1");
    for round in 0..3 {
        let mut removals = reg.entry_removals();
        // Removed at once after subscribing: no scan has run since.
        assert!(reg.delete_entry(&key).await.unwrap(), "round {round}");
        let told = tokio::time::timeout(std::time::Duration::from_secs(10), removals.recv())
            .await
            .expect("a removal within 10 s")
            .expect("removals open");
        assert_eq!(told, key, "round {round}");
        reg.apply_entry(&entry("bookinfo", "vm-1", true)).await.unwrap();
    }
    // vm-2 never went: nothing more is told.
    let mut removals = reg.entry_removals();
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(2500), removals.recv()).await;
    assert!(quiet.is_err(), "told of an entry that stayed: {quiet:?}");
}
