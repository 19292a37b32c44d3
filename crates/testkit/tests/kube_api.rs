//! The Kubernetes API stand-in, driven by an unchanged kube-rs client.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use gangplank_testkit::kube_api::{Server, TOKEN_ISSUER};
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

fn client(server: &Server) -> kube::Client {
    let config = kube::Config::new(server.url().parse().expect("stand-in URL"));
    kube::Client::try_from(config).expect("client")
}

fn entries(client: &kube::Client, ns: &str, version: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("networking.istio.io", version, "WorkloadEntry"),
        "workloadentries",
    );
    Api::namespaced_with(client.clone(), ns, &ar)
}

fn groups(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("networking.istio.io", "v1", "WorkloadGroup"),
        "workloadgroups",
    );
    Api::namespaced_with(client.clone(), ns, &ar)
}

fn obj(v: Value) -> DynamicObject {
    serde_json::from_value(v).expect("object")
}

fn entry(name: &str, address: &str) -> DynamicObject {
    obj(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
        "metadata": {"name": name, "labels": {"app": "ratings"}},
        "spec": {"address": address, "serviceAccount": "ratings"},
    }))
}

fn code(e: kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        other => panic!("expected an API error, got {other}"),
    }
}

async fn started() -> (Server, kube::Client) {
    let server = Server::start().await.expect("stand-in");
    server.install_istio_crds(&["v1", "v1beta1"]).expect("istio CRDs");
    let c = client(&server);
    (server, c)
}

#[tokio::test]
async fn crud_conflict_not_found_and_schema() {
    let (server, c) = started().await;
    let api = entries(&c, "bookinfo", "v1");
    let created = api
        .create(&PostParams::default(), &entry("vm-1", "10.0.0.1"))
        .await
        .unwrap();
    let rv1 = created.metadata.resource_version.clone().unwrap();
    assert!(created.metadata.uid.is_some());
    assert_eq!(created.metadata.generation, Some(1));

    // Create again: 409 AlreadyExists.
    assert_eq!(
        code(
            api.create(&PostParams::default(), &entry("vm-1", "10.0.0.1"))
                .await
                .unwrap_err()
        ),
        409
    );

    // Update with the current resourceVersion works and bumps it and the generation.
    let mut changed = created.clone();
    changed.data["spec"]["address"] = json!("10.0.0.2");
    let updated = api
        .replace("vm-1", &PostParams::default(), &changed)
        .await
        .unwrap();
    assert_ne!(updated.metadata.resource_version.as_deref(), Some(rv1.as_str()));
    assert_eq!(updated.metadata.generation, Some(2));

    // Update with the stale one: 409, and nothing changed.
    changed.data["spec"]["address"] = json!("10.0.0.3");
    assert_eq!(
        code(
            api.replace("vm-1", &PostParams::default(), &changed)
                .await
                .unwrap_err()
        ),
        409
    );
    assert_eq!(api.get("vm-1").await.unwrap().data["spec"]["address"], "10.0.0.2");

    // 404 for a missing object.
    assert_eq!(code(api.get("nope").await.unwrap_err()), 404);
    assert!(api.get_opt("nope").await.unwrap().is_none());

    // 422 for an object that breaks Istio's schema (port out of range, unknown field), and
    // nothing was written.
    let before = server.write_count("workloadentries");
    let bad = obj(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
        "metadata": {"name": "bad"},
        "spec": {"address": "10.0.0.9", "ports": {"http": 70000}, "colour": "red"},
    }));
    let e = api.create(&PostParams::default(), &bad).await.unwrap_err();
    match e {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 422);
            assert!(s.message.contains("spec.ports"), "{}", s.message);
        }
        other => panic!("{other}"),
    }
    assert!(api.get_opt("bad").await.unwrap().is_none());
    assert_eq!(server.write_count("workloadentries"), before);

    // The same object is served in every version.
    let old = entries(&c, "bookinfo", "v1beta1").get("vm-1").await.unwrap();
    assert_eq!(old.types.unwrap().api_version, "networking.istio.io/v1beta1");

    // Delete, then 404.
    api.delete("vm-1", &DeleteParams::default()).await.unwrap();
    assert_eq!(
        code(api.delete("vm-1", &DeleteParams::default()).await.unwrap_err()),
        404
    );
    let verbs: Vec<_> = server.writes().iter().map(|w| w.verb).collect();
    assert_eq!(verbs, ["create", "update", "delete"]);
}

#[tokio::test]
async fn label_selectors_and_cluster_wide_lists() {
    let (_server, c) = started().await;
    for (ns, name, tier) in [("a", "one", "db"), ("a", "two", "web"), ("b", "three", "db")] {
        let mut e = entry(name, "10.0.0.1");
        e.metadata
            .labels
            .get_or_insert_default()
            .insert("tier".into(), tier.into());
        entries(&c, ns, "v1")
            .create(&PostParams::default(), &e)
            .await
            .unwrap();
    }
    let all: Api<DynamicObject> = Api::all_with(
        c.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("networking.istio.io", "v1", "WorkloadEntry"),
            "workloadentries",
        ),
    );
    let names = |l: kube::core::ObjectList<DynamicObject>| {
        let mut n: Vec<String> = l.items.into_iter().filter_map(|o| o.metadata.name).collect();
        n.sort();
        n
    };
    assert_eq!(
        names(all.list(&ListParams::default()).await.unwrap()),
        ["one", "three", "two"]
    );
    assert_eq!(
        names(all.list(&ListParams::default().labels("tier=db")).await.unwrap()),
        ["one", "three"]
    );
    assert_eq!(
        names(all.list(&ListParams::default().labels("tier!=db")).await.unwrap()),
        ["two"]
    );
    assert_eq!(
        names(
            all.list(&ListParams::default().labels("tier in (web, cache),app"))
                .await
                .unwrap()
        ),
        ["two"]
    );
    assert_eq!(
        names(all.list(&ListParams::default().labels("!tier")).await.unwrap()),
        Vec::<String>::new()
    );
    assert_eq!(
        names(
            entries(&c, "a", "v1")
                .list(&ListParams::default().labels("tier notin (web)"))
                .await
                .unwrap()
        ),
        ["one"]
    );
    assert_eq!(
        names(
            all.list(&ListParams::default().fields("metadata.name=three"))
                .await
                .unwrap()
        ),
        ["three"]
    );
}

#[tokio::test]
async fn server_side_apply_merges_and_forgets_dropped_fields() {
    let (server, c) = started().await;
    let api = entries(&c, "bookinfo", "v1");
    let pp = PatchParams::apply("gangplank").force();
    let first = json!({
        "apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
        "metadata": {"name": "vm-1", "annotations": {"a": "1", "b": "2"}},
        "spec": {"address": "10.0.0.1", "labels": {"x": "y"}},
    });
    api.patch("vm-1", &pp, &Patch::Apply(&first)).await.unwrap();
    // Another writer adds an annotation with a merge patch.
    let other = PatchParams {
        field_manager: Some("kubectl".into()),
        ..Default::default()
    };
    api.patch(
        "vm-1",
        &other,
        &Patch::Merge(json!({"metadata": {"annotations": {"c": "3"}}})),
    )
    .await
    .unwrap();
    // Applying again without `b` and the labels removes what gangplank no longer applies and
    // keeps what the other writer set.
    let second = json!({
        "apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
        "metadata": {"name": "vm-1", "annotations": {"a": "1"}},
        "spec": {"address": "10.0.0.2"},
    });
    let got = api.patch("vm-1", &pp, &Patch::Apply(&second)).await.unwrap();
    let annotations = got.metadata.annotations.unwrap();
    assert_eq!(annotations.get("a").map(String::as_str), Some("1"));
    assert_eq!(annotations.get("b"), None);
    assert_eq!(annotations.get("c").map(String::as_str), Some("3"));
    assert_eq!(got.data["spec"], json!({"address": "10.0.0.2"}));
    // Applying the same configuration again changes nothing (same resourceVersion).
    let again = api.patch("vm-1", &pp, &Patch::Apply(&second)).await.unwrap();
    assert_eq!(again.metadata.resource_version, got.metadata.resource_version);
    // A stale resourceVersion in the applied configuration is a precondition: 409.
    let mut stale = second.clone();
    stale["metadata"]["resourceVersion"] = json!("1");
    assert_eq!(
        code(api.patch("vm-1", &pp, &Patch::Apply(&stale)).await.unwrap_err()),
        409
    );
    // An apply needs a field manager.
    let no_manager = PatchParams::default();
    assert_eq!(
        code(
            api.patch("vm-1", &no_manager, &Patch::Apply(&second))
                .await
                .unwrap_err()
        ),
        400
    );
    let applies = server.writes().iter().filter(|w| w.verb == "apply").count();
    assert_eq!(applies, 3);
}

#[tokio::test]
async fn status_is_a_subresource() {
    let (_server, c) = started().await;
    let api = entries(&c, "bookinfo", "v1");
    let mut e = entry("vm-1", "10.0.0.1");
    e.data["status"] = json!({"conditions": [{"type": "Healthy", "status": "True"}]});
    let created = api.create(&PostParams::default(), &e).await.unwrap();
    assert!(created.data.get("status").is_none(), "create ignores status");

    let status = json!({
        "apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
        "metadata": {"name": "vm-1"},
        "status": {"conditions": [{"type": "Healthy", "status": "False", "reason": "probe failed"}]},
    });
    let got = api
        .patch_status(
            "vm-1",
            &PatchParams::apply("gangplank").force(),
            &Patch::Apply(&status),
        )
        .await
        .unwrap();
    assert_eq!(got.data["status"]["conditions"][0]["status"], "False");
    assert_eq!(
        got.metadata.generation,
        Some(1),
        "status writes leave the generation"
    );

    // A write to the object keeps the status; a status write ignores the spec.
    let mut replaced = got.clone();
    replaced.data["status"] = json!({});
    replaced.data["spec"]["address"] = json!("10.0.0.7");
    let after = api
        .replace("vm-1", &PostParams::default(), &replaced)
        .await
        .unwrap();
    assert_eq!(after.data["status"]["conditions"][0]["status"], "False");
    let mut sneaky = after.clone();
    sneaky.data["spec"]["address"] = json!("10.6.6.6");
    sneaky.data["status"] = json!({"conditions": []});
    let after = api
        .replace_status("vm-1", &PostParams::default(), &sneaky)
        .await
        .unwrap();
    assert_eq!(after.data["spec"]["address"], "10.0.0.7");

    // Status of a missing object: 404.
    assert_eq!(
        code(
            api.patch_status(
                "nope",
                &PatchParams::apply("gangplank").force(),
                &Patch::Apply(&status)
            )
            .await
            .unwrap_err()
        ),
        404
    );
}

#[tokio::test]
async fn watch_replays_resumes_and_bookmarks() {
    let (server, c) = started().await;
    server.set_bookmark_interval(Duration::from_millis(50));
    let api = entries(&c, "bookinfo", "v1");
    let first = api
        .create(&PostParams::default(), &entry("vm-1", "10.0.0.1"))
        .await
        .unwrap();
    let from = first.metadata.resource_version.clone().unwrap();
    api.create(&PostParams::default(), &entry("vm-2", "10.0.0.2"))
        .await
        .unwrap();
    api.delete("vm-1", &DeleteParams::default()).await.unwrap();

    // Resuming after the first create replays what happened since, then bookmarks.
    let wp = WatchParams::default().timeout(5);
    let mut stream = api.watch(&wp, &from).await.unwrap().boxed();
    let mut seen = Vec::new();
    let mut bookmark = None;
    while bookmark.is_none() {
        match stream.try_next().await.unwrap().expect("event") {
            WatchEvent::Added(o) => seen.push(format!("ADDED {}", o.metadata.name.unwrap())),
            WatchEvent::Deleted(o) => seen.push(format!("DELETED {}", o.metadata.name.unwrap())),
            WatchEvent::Bookmark(b) => bookmark = Some(b.metadata.resource_version),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["ADDED vm-2", "DELETED vm-1"]);

    // Live events arrive, and a label change out of the selector is a DELETED.
    let mut labelled = api
        .watch(&WatchParams::default().labels("app=ratings").timeout(5), "0")
        .await
        .unwrap()
        .boxed();
    match next_change(&mut labelled).await {
        WatchEvent::Added(o) => assert_eq!(o.metadata.name.as_deref(), Some("vm-2")),
        other => panic!("unexpected {other:?}"),
    }
    api.patch(
        "vm-2",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "other"}}})),
    )
    .await
    .unwrap();
    match next_change(&mut labelled).await {
        WatchEvent::Deleted(o) => assert_eq!(o.metadata.name.as_deref(), Some("vm-2")),
        other => panic!("unexpected {other:?}"),
    }
}

/// The next event that is not a bookmark.
async fn next_change(
    stream: &mut futures::stream::BoxStream<'_, kube::Result<WatchEvent<DynamicObject>>>,
) -> WatchEvent<DynamicObject> {
    loop {
        match stream.try_next().await.unwrap().expect("event") {
            WatchEvent::Bookmark(_) => continue,
            other => return other,
        }
    }
}

#[tokio::test]
async fn too_old_resource_version_is_gone() {
    let (server, c) = started().await;
    server.set_watch_history(10);
    let api: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(c.clone(), "x");
    let pp = PatchParams::apply("test");
    // Push the first versions out of the watch history.
    for i in 0..20 {
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "churn"}, "data": {"i": i.to_string()}});
        api.patch("churn", &pp, &Patch::Apply(&cm)).await.unwrap();
    }
    let mut stream = api
        .watch(&WatchParams::default().timeout(5), "2")
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await {
        Ok(Some(WatchEvent::Error(e))) => assert_eq!(e.code, 410),
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 410),
        other => panic!("expected 410, got {other:?}"),
    }
}

#[tokio::test]
async fn token_request_mints_a_signed_token() {
    let (server, c) = started().await;
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(c.clone(), "bookinfo");
    let request = |aud: &str, seconds: i64| {
        serde_json::from_value::<k8s_openapi::api::authentication::v1::TokenRequest>(
            json!({"spec": {"audiences": [aud], "expirationSeconds": seconds}}),
        )
        .unwrap()
    };
    // No such ServiceAccount: 404.
    let e = sas
        .create_token_request("ratings", &PostParams::default(), &request("istio-ca", 3600))
        .await
        .unwrap_err();
    assert_eq!(code(e), 404);
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "ratings"}})).unwrap(),
    )
    .await
    .unwrap();
    // Too short: 422.
    let e = sas
        .create_token_request("ratings", &PostParams::default(), &request("istio-ca", 60))
        .await
        .unwrap_err();
    assert_eq!(code(e), 422);

    let got = sas
        .create_token_request("ratings", &PostParams::default(), &request("istio-ca", 7200))
        .await
        .unwrap();
    let token = got.status.expect("status").token;
    let key = jsonwebtoken::DecodingKey::from_jwk(server.token_key().jwk()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&["istio-ca"]);
    validation.set_issuer(&[TOKEN_ISSUER]);
    let claims = jsonwebtoken::decode::<Value>(&token, &key, &validation)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], "system:serviceaccount:bookinfo:ratings");
    assert_eq!(claims["kubernetes.io"]["namespace"], "bookinfo");
    let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert_eq!(lifetime, 7200);
    // Another audience is refused by a verifier expecting istio-ca.
    let other = sas
        .create_token_request("ratings", &PostParams::default(), &request("api", 3600))
        .await
        .unwrap();
    assert!(jsonwebtoken::decode::<Value>(&other.status.unwrap().token, &key, &validation).is_err());
}

#[tokio::test]
async fn owner_deletion_collects_dependents() {
    let (_server, c) = started().await;
    let group = groups(&c, "bookinfo")
        .create(
            &PostParams::default(),
            &obj(json!({
                "apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup",
                "metadata": {"name": "ratings"},
                "spec": {"template": {"serviceAccount": "ratings"}},
            })),
        )
        .await
        .unwrap();
    let api = entries(&c, "bookinfo", "v1");
    let owned = |name: &str, uid: &str| {
        let mut e = entry(name, "10.0.0.1");
        e.metadata.owner_references = Some(vec![serde_json::from_value(json!({
            "apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup", "name": "ratings", "uid": uid, "controller": true,
        })).unwrap()]);
        e
    };
    let uid = group.metadata.uid.clone().unwrap();
    api.create(&PostParams::default(), &owned("vm-1", &uid))
        .await
        .unwrap();
    api.create(&PostParams::default(), &owned("vm-2", &uid))
        .await
        .unwrap();
    api.create(&PostParams::default(), &entry("manual", "10.0.0.3"))
        .await
        .unwrap();
    groups(&c, "bookinfo")
        .delete("ratings", &DeleteParams::default())
        .await
        .unwrap();
    let left: Vec<String> = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|o| o.metadata.name)
        .collect();
    assert_eq!(left, ["manual"]);
}

#[tokio::test]
async fn crds_are_served_once_created_and_discovered() {
    let server = Server::start().await.unwrap();
    let c = client(&server);
    // Not served yet.
    assert!(
        c.list_api_group_resources("networking.istio.io/v1")
            .await
            .is_err()
    );
    server.install_istio_crds(&["v1beta1"]).unwrap();
    assert!(
        c.list_api_group_resources("networking.istio.io/v1")
            .await
            .is_err()
    );
    let list = c
        .list_api_group_resources("networking.istio.io/v1beta1")
        .await
        .unwrap();
    assert!(list.resources.iter().any(|r| r.name == "workloadentries"));
    assert!(list.resources.iter().any(|r| r.name == "workloadentries/status"));
    let groups = c.list_api_groups().await.unwrap();
    assert!(groups.groups.iter().any(|g| g.name == "networking.istio.io"));
    let core = c.list_core_api_resources("v1").await.unwrap();
    assert!(core.resources.iter().any(|r| r.name == "serviceaccounts/token"));
}

/// The `Status` of a refused call.
fn refusal(e: kube::Error) -> kube::core::Status {
    match e {
        kube::Error::Api(s) => *s,
        other => panic!("expected an API error, got {other}"),
    }
}

/// Asserts `s` is a 422 `Invalid` about `kind` (in `group`) `name` whose causes are `causes`
/// (`(field, message)`, all `FieldValueInvalid`), with the API server's message.
fn assert_invalid(s: &kube::core::Status, group: &str, kind: &str, name: &str, causes: &[(&str, &str)]) {
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"), "{s:?}");
    let details = s.details.as_ref().expect("details");
    assert_eq!(
        (
            details.group.as_str(),
            details.kind.as_str(),
            details.name.as_str()
        ),
        (group, kind, name),
        "{s:?}"
    );
    let got: Vec<(&str, &str, &str)> = details
        .causes
        .iter()
        .map(|c| (c.reason.as_str(), c.field.as_str(), c.message.as_str()))
        .collect();
    let want: Vec<(&str, &str, &str)> = causes
        .iter()
        .map(|(f, m)| ("FieldValueInvalid", *f, *m))
        .collect();
    assert_eq!(got, want);
    let qualified = if group.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}.{group}")
    };
    let errors: Vec<String> = causes.iter().map(|(f, m)| format!("{f}: {m}")).collect();
    let errors = match errors.as_slice() {
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    };
    assert_eq!(s.message, format!("{qualified} {name:?} is invalid: {errors}"));
}

const LABEL_REGEX: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const SUBDOMAIN_REGEX: &str = r"a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

/// A real API server refuses a Namespace name over 63 characters (a test namespace built from
/// a long scenario name and a pid once was); the stand-in used to take any name.
#[tokio::test]
async fn namespace_names_are_dns_labels() {
    let (server, c) = started().await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(c.clone());
    let ns = |name: &str| serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    let pp = PostParams::default();

    let long = "a".repeat(64);
    let s = refusal(namespaces.create(&pp, &ns(&long)).await.unwrap_err());
    assert_invalid(
        &s,
        "",
        "Namespace",
        &long,
        &[(
            "metadata.name",
            &format!("Invalid value: \"{long}\": must be no more than 63 characters"),
        )],
    );
    assert_eq!(
        s.message,
        format!(
            "Namespace \"{long}\" is invalid: metadata.name: Invalid value: \"{long}\": must be no more than 63 characters"
        )
    );
    // Dots make a subdomain, not a label.
    let s = refusal(namespaces.create(&pp, &ns("bookinfo.prod")).await.unwrap_err());
    assert_invalid(
        &s,
        "",
        "Namespace",
        "bookinfo.prod",
        &[(
            "metadata.name",
            "Invalid value: \"bookinfo.prod\": must not contain dots",
        )],
    );
    let s = refusal(namespaces.create(&pp, &ns("Bookinfo")).await.unwrap_err());
    assert_invalid(
        &s,
        "",
        "Namespace",
        "Bookinfo",
        &[(
            "metadata.name",
            &format!("Invalid value: \"Bookinfo\": {LABEL_REGEX}"),
        )],
    );
    assert_eq!(server.write_count("namespaces"), 0, "nothing was created");
    // Test setup obeys the same rule.
    let e = server
        .seed(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": long}}))
        .unwrap_err();
    assert_eq!((e.code, e.reason), (422, "Invalid"));

    // 63 characters is fine.
    let fits = "a".repeat(63);
    namespaces.create(&pp, &ns(&fits)).await.unwrap();
    // Objects in a namespace whose name is not a label are refused too.
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(c.clone(), &long);
    let s = refusal(
        cms.create(
            &pp,
            &serde_json::from_value(json!({"metadata": {"name": "istio"}})).unwrap(),
        )
        .await
        .unwrap_err(),
    );
    assert_invalid(
        &s,
        "",
        "ConfigMap",
        "istio",
        &[(
            "metadata.namespace",
            &format!("Invalid value: \"{long}\": must be no more than 63 characters"),
        )],
    );
}

/// Leases, ConfigMaps, Secrets, ServiceAccounts and custom resources are named by DNS-1123
/// subdomains (up to 253 characters, dots allowed); Services by DNS-1035 labels.
#[tokio::test]
async fn object_names_follow_their_kinds_rule() {
    let (server, c) = started().await;
    let pp = PostParams::default();
    let named = |name: &str| json!({"metadata": {"name": name}});
    let part = "a".repeat(63);
    let longest = format!("{part}.{part}.{part}.{}", "b".repeat(61));
    assert_eq!(longest.len(), 253);
    let too_long = format!("{longest}c");

    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(c.clone(), "gangplank-system");
    leases
        .create(&pp, &serde_json::from_value(named(&longest)).unwrap())
        .await
        .unwrap();
    let s = refusal(
        leases
            .create(&pp, &serde_json::from_value(named(&too_long)).unwrap())
            .await
            .unwrap_err(),
    );
    assert_invalid(
        &s,
        "coordination.k8s.io",
        "Lease",
        &too_long,
        &[(
            "metadata.name",
            &format!("Invalid value: \"{too_long}\": must be no more than 253 characters"),
        )],
    );

    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(c.clone(), "bookinfo");
    let s = refusal(
        cms.create(&pp, &serde_json::from_value(named("root_cert")).unwrap())
            .await
            .unwrap_err(),
    );
    assert_invalid(
        &s,
        "",
        "ConfigMap",
        "root_cert",
        &[(
            "metadata.name",
            &format!("Invalid value: \"root_cert\": {SUBDOMAIN_REGEX}"),
        )],
    );
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(c.clone(), "bookinfo");
    let s = refusal(
        secrets
            .create(&pp, &serde_json::from_value(named("tls-")).unwrap())
            .await
            .unwrap_err(),
    );
    assert_invalid(
        &s,
        "",
        "Secret",
        "tls-",
        &[(
            "metadata.name",
            &format!("Invalid value: \"tls-\": {SUBDOMAIN_REGEX}"),
        )],
    );
    // A ServiceAccount name may be long and dotted.
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(c.clone(), "bookinfo");
    sas.create(&pp, &serde_json::from_value(named("ratings.v1")).unwrap())
        .await
        .unwrap();
    sas.create(&pp, &serde_json::from_value(named(&"s".repeat(100))).unwrap())
        .await
        .unwrap();

    // A custom resource: a subdomain as well.
    let api = entries(&c, "bookinfo", "v1");
    api.create(&pp, &entry(&"v".repeat(100), "10.0.0.1"))
        .await
        .unwrap();
    let s = refusal(api.create(&pp, &entry("VM-1", "10.0.0.2")).await.unwrap_err());
    assert_invalid(
        &s,
        "networking.istio.io",
        "WorkloadEntry",
        "VM-1",
        &[(
            "metadata.name",
            &format!("Invalid value: \"VM-1\": {SUBDOMAIN_REGEX}"),
        )],
    );

    // A Service: a DNS-1035 label (starts with a letter).
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(c.clone(), "bookinfo");
    services
        .create(&pp, &serde_json::from_value(named("ratings")).unwrap())
        .await
        .unwrap();
    let s = refusal(
        services
            .create(&pp, &serde_json::from_value(named("9ratings")).unwrap())
            .await
            .unwrap_err(),
    );
    assert_invalid(
        &s,
        "",
        "Service",
        "9ratings",
        &[(
            "metadata.name",
            "Invalid value: \"9ratings\": a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')",
        )],
    );

    // No name at all.
    let s = refusal(
        cms.create(&pp, &serde_json::from_value(json!({"metadata": {}})).unwrap())
            .await
            .unwrap_err(),
    );
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        s.message,
        "ConfigMap \"\" is invalid: metadata.name: Required value: name or generateName is required"
    );
    let cause = &s.details.as_ref().unwrap().causes[0];
    assert_eq!(
        (cause.reason.as_str(), cause.field.as_str()),
        ("FieldValueRequired", "metadata.name")
    );
    // Only the valid objects were written.
    let written: Vec<String> = server.writes().iter().map(|w| w.name.clone()).collect();
    assert_eq!(written.len(), 5, "{written:?}");
}

/// `generateName`: the prefix (cut to 58 characters) and five random characters, validated
/// like a name; a fresh name every time.
#[tokio::test]
async fn generate_name_makes_fresh_valid_names() {
    let (_server, c) = started().await;
    let pp = PostParams::default();
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(c.clone(), "bookinfo");
    let generated = |prefix: &str| {
        serde_json::from_value::<k8s_openapi::api::core::v1::ConfigMap>(
            json!({"metadata": {"generateName": prefix}}),
        )
        .unwrap()
    };
    let mut names = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let made = cms.create(&pp, &generated("ratings-")).await.unwrap();
        let name = made.metadata.name.unwrap();
        let suffix = name.strip_prefix("ratings-").expect("the prefix");
        assert_eq!(suffix.len(), 5, "{name}");
        assert!(
            suffix
                .bytes()
                .all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b)),
            "{name}"
        );
        assert_eq!(made.metadata.generate_name.as_deref(), Some("ratings-"));
        assert!(cms.get(&name).await.is_ok());
        names.insert(name);
    }
    assert_eq!(names.len(), 20, "every generated name is fresh");

    // A long prefix is cut so the name is 63 characters.
    let long = format!("{}-", "n".repeat(69));
    let name = cms
        .create(&pp, &generated(&long))
        .await
        .unwrap()
        .metadata
        .name
        .unwrap();
    assert_eq!(name.len(), 63, "{name}");
    assert!(name.starts_with(&"n".repeat(58)), "{name}");
    // But the prefix itself follows the kind's rule: a Namespace's is at most 63 characters.
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(c.clone());
    let s = refusal(
        namespaces
            .create(
                &pp,
                &serde_json::from_value(json!({"metadata": {"generateName": long}})).unwrap(),
            )
            .await
            .unwrap_err(),
    );
    let causes = &s.details.as_ref().unwrap().causes;
    assert_eq!(causes.len(), 1, "{s:?}");
    assert_eq!(causes[0].field, "metadata.generateName");
    assert_eq!(
        causes[0].message,
        format!("Invalid value: \"{long}\": must be no more than 63 characters")
    );

    // An invalid prefix: both it and the name made from it are refused.
    let s = refusal(
        namespaces
            .create(
                &pp,
                &serde_json::from_value(json!({"metadata": {"generateName": "Book_"}})).unwrap(),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    let fields: Vec<&str> = s
        .details
        .as_ref()
        .unwrap()
        .causes
        .iter()
        .map(|c| c.field.as_str())
        .collect();
    assert_eq!(fields, ["metadata.generateName", "metadata.name"], "{s:?}");
    assert!(
        s.message
            .contains("metadata.generateName: Invalid value: \"Book_\": a lowercase RFC 1123 label"),
        "{}",
        s.message
    );
}

/// TokenRequest refusals say what a real API server says (no object name, the value given).
#[tokio::test]
async fn token_request_lifetimes_are_bounded_as_the_api_servers() {
    let (_server, c) = started().await;
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(c.clone(), "bookinfo");
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "ratings"}})).unwrap(),
    )
    .await
    .unwrap();
    let request = |seconds: i64| {
        serde_json::from_value::<k8s_openapi::api::authentication::v1::TokenRequest>(
            json!({"spec": {"audiences": ["istio-ca"], "expirationSeconds": seconds}}),
        )
        .unwrap()
    };
    for (seconds, detail) in [
        (599, "may not specify a duration less than 10 minutes"),
        (
            (1 << 32) + 1,
            "may not specify a duration larger than 2^32 seconds",
        ),
    ] {
        let s = refusal(
            sas.create_token_request("ratings", &PostParams::default(), &request(seconds))
                .await
                .unwrap_err(),
        );
        assert_invalid(
            &s,
            "authentication.k8s.io",
            "TokenRequest",
            "",
            &[(
                "spec.expirationSeconds",
                &format!("Invalid value: {seconds}: {detail}"),
            )],
        );
    }
    sas.create_token_request("ratings", &PostParams::default(), &request(600))
        .await
        .unwrap();
}

#[tokio::test]
async fn finalizers_defer_deletion_until_removed_by_json_patch() {
    let (_server, c) = started().await;
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(c.clone(), "bookinfo");
    let parent = cms
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "parent", "finalizers": ["example.com/hold"]}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let child = json!({"metadata": {"name": "child", "ownerReferences": [{
        "apiVersion": "v1", "kind": "ConfigMap", "name": "parent", "uid": parent.metadata.uid.clone().unwrap(),
    }]}});
    cms.create(&PostParams::default(), &serde_json::from_value(child).unwrap())
        .await
        .unwrap();
    // The delete only marks it; its dependents stay.
    let marked = cms
        .delete("parent", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .expect("still there");
    assert!(marked.metadata.deletion_timestamp.is_some());
    let again = cms.get("parent").await.unwrap();
    assert_eq!(
        again.metadata.deletion_timestamp,
        marked.metadata.deletion_timestamp
    );
    assert!(cms.get_opt("child").await.unwrap().is_some());
    // No write clears deletionTimestamp.
    cms.patch(
        "parent",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"deletionTimestamp": null, "labels": {"a": "b"}}})),
    )
    .await
    .unwrap();
    assert!(
        cms.get("parent")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_some()
    );
    // A JSON patch whose test fails is refused whole.
    let wrong: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/finalizers/0", "value": "example.com/other"},
        {"op": "remove", "path": "/metadata/finalizers/0"},
    ]))
    .unwrap();
    assert_eq!(
        code(
            cms.patch("parent", &PatchParams::default(), &Patch::Json::<()>(wrong))
                .await
                .unwrap_err()
        ),
        422
    );
    assert!(cms.get_opt("parent").await.unwrap().is_some());
    // Removing the last finalizer deletes it, and the collector takes its dependents.
    let remove: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/finalizers/0", "value": "example.com/hold"},
        {"op": "remove", "path": "/metadata/finalizers/0"},
    ]))
    .unwrap();
    cms.patch("parent", &PatchParams::default(), &Patch::Json::<()>(remove))
        .await
        .unwrap();
    assert!(cms.get_opt("parent").await.unwrap().is_none());
    assert!(cms.get_opt("child").await.unwrap().is_none());
}

#[tokio::test]
async fn json_patch_test_of_a_missing_path_against_null_passes() {
    let (_server, c) = started().await;
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(c.clone(), "bookinfo");
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "cm"}})).unwrap(),
    )
    .await
    .unwrap();
    // What kube-runtime's finalizer helper sends to add the first finalizer.
    let add: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/finalizers", "value": null},
        {"op": "add", "path": "/metadata/finalizers", "value": ["example.com/hold"]},
    ]))
    .unwrap();
    let out = cms
        .patch("cm", &PatchParams::default(), &Patch::Json::<()>(add))
        .await
        .unwrap();
    assert_eq!(out.metadata.finalizers, Some(vec!["example.com/hold".to_owned()]));
}

#[tokio::test]
async fn deployments_pdbs_and_rbac_are_served_with_status_subresources() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding};
    let (_server, c) = started().await;
    let deployments: Api<Deployment> = Api::namespaced(c.clone(), "bookinfo");
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "web:1"}]}}},
        "status": {"readyReplicas": 5},
    }))
    .unwrap();
    let created = deployments
        .patch("web", &PatchParams::apply("test"), &Patch::Apply(&d))
        .await
        .unwrap();
    // A status sent with the object is dropped; only /status writes it.
    assert!(created.status.is_none());
    deployments
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"readyReplicas": 1}})),
        )
        .await
        .unwrap();
    let got = deployments.get("web").await.unwrap();
    assert_eq!(got.status.unwrap().ready_replicas, Some(1));
    assert_eq!(
        got.metadata.generation,
        Some(1),
        "a status write is not a spec change"
    );
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(c.clone(), "bookinfo");
    pdbs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "web"}, "spec": {"minAvailable": 1}})).unwrap(),
    )
    .await
    .unwrap();
    let roles: Api<ClusterRole> = Api::all(c.clone());
    let role = roles
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "reader.bookinfo"}, "rules": []})).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(role.metadata.namespace, None);
    let bindings: Api<RoleBinding> = Api::namespaced(c.clone(), "bookinfo");
    bindings
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "r"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "reader.bookinfo"}})).unwrap(),
        )
        .await
        .unwrap();
}
