//! CRD schema validation: checks an object against a CustomResourceDefinition's
//! `openAPIV3Schema` the way the Kubernetes API server does for custom resources.
//!
//! Implemented: the structural OpenAPI v3 subset Kubernetes enforces: `type` (object, array,
//! string, integer, number, boolean), `nullable`, `properties`, `required`,
//! `additionalProperties` (schema or bool), `items`, `enum`, `maxLength`/`minLength`
//! (characters), `maxItems`/`minItems`, `maxProperties`/`minProperties`,
//! `minimum`/`maximum` (with `exclusiveMinimum`/`exclusiveMaximum`), `pattern`, `format`
//! (`date-time`, `byte`, `int32`, `int64`; others are ignored), `oneOf`/`anyOf`/`allOf`/`not`,
//! `x-kubernetes-preserve-unknown-fields`, `x-kubernetes-int-or-string` and
//! `x-kubernetes-list-type` (`set`, `map` with `x-kubernetes-list-map-keys`).
//!
//! Stricter than the API server in one way, on purpose: a field the schema does not know is a
//! violation, where the server would prune it silently; for Gangplank a pruned field is a bug.
//! `null` for a field that is not `nullable` counts as absent, as the server prunes it.
//!
//! `metadata` is checked as an ObjectMeta: only its known fields, `name` required and a
//! DNS-1123 subdomain, `namespace` a DNS-1123 label, label keys and values and annotation
//! keys valid; `apiVersion` and `kind`, when present, must be the schema's.
//!
//! CEL (`x-kubernetes-validations`): no CEL interpreter. Only these exact rules (whitespace
//! aside), which Istio's WorkloadEntry and WorkloadGroup schemas use, are evaluated:
//!
//! - `0 < self && self <= 65535`
//! - `self in ["a", "b", ...]` (string literals)
//! - `self.startsWith("unix://") ? (self.substring(7, 8) == "/" || self.substring(7, 8) == "@") : true`
//! - `self.startsWith("unix://") ? !self.endsWith("/") : true`
//! - `self.all(key, size(key) < 63 && key.matches("^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$"))`
//! - `has(self.address) || has(self.network)`
//! - `(has(self.address) ? self.address : "").startsWith("unix://") ? !has(self.ports) : true`
//!
//! Every other rule is not evaluated and is listed by [`Schema::unevaluated_rules`], so a test
//! can see exactly what it does not cover.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use gangplank_api::meta::{is_dns1123_label, is_dns1123_subdomain};
use regex::Regex;
use serde_json::{Map, Value, json};

/// What can go wrong loading a schema.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CRD file could not be read.
    #[error("reading CRD file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The CRD file is not YAML.
    #[error("{path} is not valid YAML: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What the parser said.
        message: String,
    },
    /// The file has no CRD for the requested group, kind and version.
    #[error(
        "{path} has no CustomResourceDefinition serving {kind}.{group} version {version}: check \
         the group, kind and version"
    )]
    NotFound {
        /// The file.
        path: String,
        /// The API group asked for.
        group: String,
        /// The kind asked for.
        kind: String,
        /// The version asked for.
        version: String,
    },
    /// The schema uses something this validator cannot read.
    #[error("schema of {crd} at {at}: {message}")]
    Schema {
        /// `kind.group/version`.
        crd: String,
        /// Where in the schema.
        at: String,
        /// What is wrong.
        message: String,
    },
}

/// A loading result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One way an object breaks its schema: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The field, Kubernetes style: `spec.ports[http]`, `status.conditions[0].type`; empty
    /// for the object itself.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "<root>: {}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// The folder of Istio's own data files (`shared/reference/istio-data`, beside the
/// repository), or `$GANGPLANK_ISTIO_DATA` when set.
pub fn istio_data_dir() -> PathBuf {
    match std::env::var_os("GANGPLANK_ISTIO_DATA") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/reference/istio-data"),
    }
}

/// The file of every Istio CRD: `crd-all.gen.yaml` in [`istio_data_dir`].
pub fn istio_crds_path() -> PathBuf {
    istio_data_dir().join("crd-all.gen.yaml")
}

/// The cache key of a compiled schema: file, group, kind, version.
type SchemaKey = (PathBuf, String, String, String);

/// One version of one CRD's schema, ready to validate objects. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Schema {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    group: String,
    kind: String,
    version: String,
    plural: String,
    namespaced: bool,
    root: Node,
    unevaluated: Vec<String>,
}

impl Schema {
    /// The schema of `kind` in `group`, version `version`, from the multi-document CRD file
    /// at `path`. Files and schemas are cached for the life of the process.
    pub fn load(path: impl AsRef<Path>, group: &str, kind: &str, version: &str) -> Result<Self> {
        let path = path.as_ref();
        let file_key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        let key = (
            file_key.clone(),
            group.to_owned(),
            kind.to_owned(),
            version.to_owned(),
        );
        static SCHEMAS: OnceLock<Mutex<HashMap<SchemaKey, Schema>>> = OnceLock::new();
        // Held while compiling, so parallel tests compile each schema once.
        let mut schemas = SCHEMAS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = schemas.get(&key) {
            return Ok(s.clone());
        }
        let text = file_text(&file_key)?;
        let schema = Self::from_text(&text, &path.display().to_string(), group, kind, version)?;
        schemas.insert(key, schema.clone());
        Ok(schema)
    }

    /// The `networking.istio.io/v1` schema of `kind` from [`istio_crds_path`].
    pub fn istio(kind: &str) -> Result<Self> {
        Self::load(istio_crds_path(), "networking.istio.io", kind, "v1")
    }

    /// The schema of `version` of a CustomResourceDefinition object (as posted to an API
    /// server); not cached.
    pub fn from_crd(crd: &Value, version: &str) -> Result<Self> {
        let group = crd["spec"]["group"].as_str().unwrap_or_default();
        let kind = crd["spec"]["names"]["kind"].as_str().unwrap_or_default();
        let name = crd["metadata"]["name"].as_str().unwrap_or("<unnamed CRD>");
        Self::compile(crd, name, group, kind, version)
    }

    /// Finds and compiles the schema in the CRD documents of `text` (named `path` in errors).
    fn from_text(text: &str, path: &str, group: &str, kind: &str, version: &str) -> Result<Self> {
        // Parsing a megabyte of YAML is slow; only documents that mention the kind and the
        // group are parsed, and then checked properly.
        for doc in split_documents(text) {
            if !doc.contains(kind) || !doc.contains(group) {
                continue;
            }
            let crd: Value = serde_saphyr::from_str(doc).map_err(|e| Error::Parse {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
            let spec = &crd["spec"];
            if crd["kind"] == "CustomResourceDefinition"
                && spec["group"] == group
                && spec["names"]["kind"] == kind
            {
                return Self::compile(&crd, path, group, kind, version);
            }
        }
        Err(not_found(path, group, kind, version))
    }

    /// Compiles `version` of the CRD object `crd` (found in `source`).
    fn compile(crd: &Value, source: &str, group: &str, kind: &str, version: &str) -> Result<Self> {
        let spec = &crd["spec"];
        let Some(served) = spec["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == version)
        else {
            return Err(not_found(source, group, kind, version));
        };
        let mut compiler = Compiler {
            crd: format!("{kind}.{group}/{version}"),
            unevaluated: Vec::new(),
        };
        let mut root = compiler.node(&served["schema"]["openAPIV3Schema"], "")?;
        add_object_fields(&mut root, &compiler.crd)?;
        Ok(Self {
            inner: Arc::new(Inner {
                group: group.to_owned(),
                kind: kind.to_owned(),
                version: version.to_owned(),
                plural: spec["names"]["plural"].as_str().unwrap_or_default().to_owned(),
                namespaced: spec["scope"] == "Namespaced",
                root,
                unevaluated: compiler.unevaluated,
            }),
        })
    }

    /// The API group, e.g. `networking.istio.io`.
    pub fn group(&self) -> &str {
        &self.inner.group
    }

    /// The kind, e.g. `WorkloadEntry`.
    pub fn kind(&self) -> &str {
        &self.inner.kind
    }

    /// The version, e.g. `v1`.
    pub fn version(&self) -> &str {
        &self.inner.version
    }

    /// The resource's plural, e.g. `workloadentries`.
    pub fn plural(&self) -> &str {
        &self.inner.plural
    }

    /// Whether the resource is namespaced.
    pub fn namespaced(&self) -> bool {
        self.inner.namespaced
    }

    /// The CEL rules this validator does not evaluate, as `<path>: <rule>`.
    pub fn unevaluated_rules(&self) -> &[String] {
        &self.inner.unevaluated
    }

    /// Checks `object` (a whole resource: apiVersion, kind, metadata, spec, status); returns
    /// every violation found.
    pub fn validate(&self, object: &Value) -> Result<(), Vec<Violation>> {
        let mut out = Vec::new();
        check(&self.inner.root, object, "", true, &mut out);
        if let Some(obj) = object.as_object() {
            let api_version = format!("{}/{}", self.inner.group, self.inner.version);
            if let Some(v) = obj.get("apiVersion").and_then(Value::as_str)
                && v != api_version
            {
                out.push(violation(
                    "apiVersion",
                    format!("must be {api_version}, got {v:?}"),
                ));
            }
            if let Some(k) = obj.get("kind").and_then(Value::as_str)
                && k != self.inner.kind
            {
                out.push(violation(
                    "kind",
                    format!("must be {}, got {k:?}", self.inner.kind),
                ));
            }
            if let Some(meta) = obj.get("metadata").and_then(Value::as_object) {
                check_meta(meta, self.inner.namespaced, &mut out);
            }
        }
        if out.is_empty() { Ok(()) } else { Err(out) }
    }
}

fn not_found(path: &str, group: &str, kind: &str, version: &str) -> Error {
    Error::NotFound {
        path: path.to_owned(),
        group: group.to_owned(),
        kind: kind.to_owned(),
        version: version.to_owned(),
    }
}

/// The text of a CRD file, read once per process.
fn file_text(path: &Path) -> Result<Arc<str>> {
    static FILES: OnceLock<Mutex<HashMap<PathBuf, Arc<str>>>> = OnceLock::new();
    let mut files = FILES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(t) = files.get(path) {
        return Ok(Arc::clone(t));
    }
    let text: Arc<str> = std::fs::read_to_string(path)
        .map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })?
        .into();
    files.insert(path.to_path_buf(), Arc::clone(&text));
    Ok(text)
}

/// The documents of a multi-document YAML text (split at `---` lines).
fn split_documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_end() == "---" {
            docs.push(&text[start..offset]);
            start = offset + line.len();
        }
        offset += line.len();
    }
    docs.push(&text[start..]);
    docs
}

/// Adds what every object has beside its schema: apiVersion, kind and metadata.
fn add_object_fields(root: &mut Node, crd: &str) -> Result<()> {
    let mut compiler = Compiler {
        crd: crd.to_owned(),
        unevaluated: Vec::new(),
    };
    let meta = compiler.node(&object_meta_schema(), "metadata")?;
    let props = root.properties.get_or_insert_default();
    props.insert("apiVersion".into(), Node::of_type(Type::String));
    props.insert("kind".into(), Node::of_type(Type::String));
    props.insert("metadata".into(), meta);
    if !root.required.iter().any(|r| r == "metadata") {
        root.required.push("metadata".into());
    }
    Ok(())
}

/// ObjectMeta's fields, as an OpenAPI schema (name and key rules are in [`check_meta`]).
fn object_meta_schema() -> Value {
    let string_map = json!({"type": "object", "additionalProperties": {"type": "string"}});
    json!({
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "generateName": {"type": "string"},
            "namespace": {"type": "string"},
            "selfLink": {"type": "string"},
            "uid": {"type": "string"},
            "resourceVersion": {"type": "string"},
            "generation": {"type": "integer", "format": "int64"},
            "creationTimestamp": {"type": "string", "format": "date-time", "nullable": true},
            "deletionTimestamp": {"type": "string", "format": "date-time", "nullable": true},
            "deletionGracePeriodSeconds": {"type": "integer", "format": "int64"},
            "labels": string_map,
            "annotations": string_map,
            "finalizers": {"type": "array", "items": {"type": "string"}},
            "managedFields": {
                "type": "array",
                "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
            },
            "ownerReferences": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["apiVersion", "kind", "name", "uid"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "uid": {"type": "string"},
                        "controller": {"type": "boolean"},
                        "blockOwnerDeletion": {"type": "boolean"}
                    }
                }
            }
        }
    })
}

/// What ObjectMeta's validation checks beyond types.
fn check_meta(meta: &Map<String, Value>, namespaced: bool, out: &mut Vec<Violation>) {
    if let Some(name) = meta.get("name").and_then(Value::as_str)
        && (name.is_empty() || !is_dns1123_subdomain(name))
    {
        out.push(violation(
            "metadata.name",
            format!(
                "{name:?} is not a DNS-1123 subdomain (lower-case letters, digits, '-' and '.', \
                 at most 253 characters, starting and ending with a letter or digit)"
            ),
        ));
    }
    match meta.get("namespace").and_then(Value::as_str) {
        Some(ns) if !is_dns1123_label(ns) => out.push(violation(
            "metadata.namespace",
            format!("{ns:?} is not a DNS-1123 label"),
        )),
        Some(_) if !namespaced => out.push(violation(
            "metadata.namespace",
            "must not be set: the resource is cluster-scoped".into(),
        )),
        _ => {}
    }
    if let Some(labels) = meta.get("labels").and_then(Value::as_object) {
        for (k, v) in labels {
            let path = format!("metadata.labels[{k}]");
            if let Some(problem) = qualified_name_problem(k) {
                out.push(violation(&path, format!("key {k:?} {problem}")));
            }
            if let Some(v) = v.as_str()
                && !label_value_ok(v)
            {
                out.push(violation(
                    &path,
                    format!(
                        "value {v:?} is not a valid label value (at most 63 characters of \
                         letters, digits, '-', '_' and '.', starting and ending with a letter \
                         or digit)"
                    ),
                ));
            }
        }
    }
    if let Some(annotations) = meta.get("annotations").and_then(Value::as_object) {
        for k in annotations.keys() {
            if let Some(problem) = qualified_name_problem(k) {
                out.push(violation(
                    &format!("metadata.annotations[{k}]"),
                    format!("key {k:?} {problem}"),
                ));
            }
        }
    }
}

/// Why `key` is not a Kubernetes qualified name (`[prefix/]name`), or `None`.
fn qualified_name_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && (p.is_empty() || !is_dns1123_subdomain(p))
    {
        return Some(format!("has prefix {p:?}, which is not a DNS-1123 subdomain"));
    }
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    (!ok).then(|| {
        "has a name part that is not 1-63 letters, digits, '-', '_' or '.' starting and \
         ending with a letter or digit"
            .to_owned()
    })
}

fn label_value_ok(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

fn violation(path: &str, message: String) -> Violation {
    Violation {
        path: path.to_owned(),
        message,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Type {
    Object,
    Array,
    String,
    Integer,
    Number,
    Boolean,
}

impl Type {
    fn name(self) -> &'static str {
        match self {
            Type::Object => "object",
            Type::Array => "array",
            Type::String => "string",
            Type::Integer => "integer",
            Type::Number => "number",
            Type::Boolean => "boolean",
        }
    }

    fn matches(self, v: &Value) -> bool {
        match self {
            Type::Object => v.is_object(),
            Type::Array => v.is_array(),
            Type::String => v.is_string(),
            Type::Integer => is_integer(v),
            Type::Number => v.is_number(),
            Type::Boolean => v.is_boolean(),
        }
    }
}

fn is_integer(v: &Value) -> bool {
    v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0)
}

/// The JSON type of a value, for messages.
fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) if is_integer(v) => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[derive(Debug, Default)]
enum Additional {
    /// Not given: unknown fields are pruned (an error here) unless preserved.
    #[default]
    Unset,
    /// `true` or `false`.
    Allowed(bool),
    /// A schema for every value.
    Schema(Box<Node>),
}

#[derive(Debug, Clone, Copy)]
enum Format {
    DateTime,
    Byte,
    Int32,
    Int64,
}

#[derive(Debug, Default)]
enum ListType {
    #[default]
    Atomic,
    Set,
    Map(Vec<String>),
}

/// A CEL rule this validator recognises.
#[derive(Debug)]
enum RuleKind {
    PortRange,
    OneOfStrings(Vec<String>),
    UdsAbsolute,
    UdsNotDir,
    PortNames,
    AddressRequired,
    UdsNoPorts,
}

#[derive(Debug)]
struct Rule {
    kind: RuleKind,
    message: String,
}

/// A compiled schema node.
#[derive(Debug, Default)]
struct Node {
    ty: Option<Type>,
    nullable: bool,
    properties: Option<BTreeMap<String, Node>>,
    additional: Additional,
    required: Vec<String>,
    items: Option<Box<Node>>,
    enumeration: Option<Vec<Value>>,
    max_length: Option<u64>,
    min_length: Option<u64>,
    max_items: Option<u64>,
    min_items: Option<u64>,
    max_properties: Option<u64>,
    min_properties: Option<u64>,
    minimum: Option<f64>,
    maximum: Option<f64>,
    exclusive_minimum: bool,
    exclusive_maximum: bool,
    pattern: Option<Regex>,
    format: Option<Format>,
    one_of: Vec<Node>,
    any_of: Vec<Node>,
    all_of: Vec<Node>,
    not: Option<Box<Node>>,
    preserve_unknown: bool,
    int_or_string: bool,
    list_type: ListType,
    rules: Vec<Rule>,
}

impl Node {
    fn of_type(ty: Type) -> Self {
        Self {
            ty: Some(ty),
            ..Default::default()
        }
    }
}

struct Compiler {
    crd: String,
    unevaluated: Vec<String>,
}

impl Compiler {
    fn err(&self, at: &str, message: String) -> Error {
        Error::Schema {
            crd: self.crd.clone(),
            at: if at.is_empty() { "<root>".into() } else { at.into() },
            message,
        }
    }

    fn node(&mut self, v: &Value, at: &str) -> Result<Node> {
        let Some(obj) = v.as_object() else {
            return Err(self.err(at, "a schema must be an object".into()));
        };
        let mut n = Node::default();
        let uint = |key: &str| obj.get(key).and_then(Value::as_u64);
        let flag = |key: &str| obj.get(key).and_then(Value::as_bool).unwrap_or(false);
        n.ty = match obj.get("type").and_then(Value::as_str) {
            None => None,
            Some("object") => Some(Type::Object),
            Some("array") => Some(Type::Array),
            Some("string") => Some(Type::String),
            Some("integer") => Some(Type::Integer),
            Some("number") => Some(Type::Number),
            Some("boolean") => Some(Type::Boolean),
            Some(other) => return Err(self.err(at, format!("unknown type {other:?}"))),
        };
        n.nullable = flag("nullable");
        n.preserve_unknown = flag("x-kubernetes-preserve-unknown-fields");
        n.int_or_string = flag("x-kubernetes-int-or-string");
        n.exclusive_minimum = flag("exclusiveMinimum");
        n.exclusive_maximum = flag("exclusiveMaximum");
        n.max_length = uint("maxLength");
        n.min_length = uint("minLength");
        n.max_items = uint("maxItems");
        n.min_items = uint("minItems");
        n.max_properties = uint("maxProperties");
        n.min_properties = uint("minProperties");
        n.minimum = obj.get("minimum").and_then(Value::as_f64);
        n.maximum = obj.get("maximum").and_then(Value::as_f64);
        n.enumeration = obj.get("enum").and_then(Value::as_array).cloned();
        n.required = obj
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str().map(str::to_owned))
            .collect();
        if let Some(p) = obj.get("pattern").and_then(Value::as_str) {
            n.pattern = Some(Regex::new(p).map_err(|e| self.err(at, format!("pattern {p:?}: {e}")))?);
        }
        n.format = match obj.get("format").and_then(Value::as_str) {
            Some("date-time") => Some(Format::DateTime),
            Some("byte") => Some(Format::Byte),
            Some("int32") => Some(Format::Int32),
            Some("int64") => Some(Format::Int64),
            _ => None,
        };
        if let Some(props) = obj.get("properties").and_then(Value::as_object) {
            let mut compiled = BTreeMap::new();
            for (k, v) in props {
                compiled.insert(k.clone(), self.node(v, &join(at, k))?);
            }
            n.properties = Some(compiled);
        }
        n.additional = match obj.get("additionalProperties") {
            None => Additional::Unset,
            Some(Value::Bool(b)) => Additional::Allowed(*b),
            Some(s) => Additional::Schema(Box::new(self.node(s, &format!("{at}[*]"))?)),
        };
        if let Some(items) = obj.get("items") {
            n.items = Some(Box::new(self.node(items, &format!("{at}[*]"))?));
        }
        for (key, list) in [
            ("oneOf", &mut n.one_of),
            ("anyOf", &mut n.any_of),
            ("allOf", &mut n.all_of),
        ] {
            for (i, sub) in obj
                .get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                list.push(self.node(sub, &format!("{at}({key}[{i}])"))?);
            }
        }
        if let Some(not) = obj.get("not") {
            n.not = Some(Box::new(self.node(not, &format!("{at}(not)"))?));
        }
        n.list_type = match obj.get("x-kubernetes-list-type").and_then(Value::as_str) {
            Some("set") => ListType::Set,
            Some("map") => ListType::Map(
                obj.get("x-kubernetes-list-map-keys")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|k| k.as_str().map(str::to_owned))
                    .collect(),
            ),
            _ => ListType::Atomic,
        };
        for rule in obj
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let text = rule.get("rule").and_then(Value::as_str).unwrap_or_default();
            let normalised = text.split_whitespace().collect::<Vec<_>>().join(" ");
            match recognise(&normalised) {
                Some(kind) => n.rules.push(Rule {
                    kind,
                    message: rule
                        .get("message")
                        .and_then(Value::as_str)
                        .map_or_else(|| format!("failed rule: {normalised}"), str::to_owned),
                }),
                None => self.unevaluated.push(format!(
                    "{}: {normalised}",
                    if at.is_empty() { "<root>" } else { at }
                )),
            }
        }
        Ok(n)
    }
}

/// The recognised rule with this exact (whitespace-normalised) text.
fn recognise(rule: &str) -> Option<RuleKind> {
    const UDS_ABSOLUTE: &str =
        r#"self.startsWith("unix://") ? (self.substring(7, 8) == "/" || self.substring(7, 8) == "@") : true"#;
    const UDS_NOT_DIR: &str = r#"self.startsWith("unix://") ? !self.endsWith("/") : true"#;
    const PORT_NAMES: &str =
        r#"self.all(key, size(key) < 63 && key.matches("^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$"))"#;
    const UDS_NO_PORTS: &str =
        r#"(has(self.address) ? self.address : "").startsWith("unix://") ? !has(self.ports) : true"#;
    match rule {
        "0 < self && self <= 65535" => Some(RuleKind::PortRange),
        UDS_ABSOLUTE => Some(RuleKind::UdsAbsolute),
        UDS_NOT_DIR => Some(RuleKind::UdsNotDir),
        PORT_NAMES => Some(RuleKind::PortNames),
        "has(self.address) || has(self.network)" => Some(RuleKind::AddressRequired),
        UDS_NO_PORTS => Some(RuleKind::UdsNoPorts),
        _ => {
            let list = rule.strip_prefix("self in ")?;
            serde_json::from_str::<Vec<String>>(list)
                .ok()
                .map(RuleKind::OneOfStrings)
        }
    }
}

/// Whether a recognised rule holds for `v` (`None` when it does not apply to this value).
fn rule_holds(kind: &RuleKind, v: &Value) -> bool {
    static PORT_NAME: OnceLock<Option<Regex>> = OnceLock::new();
    match kind {
        RuleKind::PortRange => v.as_f64().is_some_and(|p| 0.0 < p && p <= 65535.0),
        RuleKind::OneOfStrings(options) => v.as_str().is_some_and(|s| options.iter().any(|o| o == s)),
        RuleKind::UdsAbsolute => match v.as_str().and_then(|s| s.strip_prefix("unix://")) {
            // CEL's substring(7, 8) fails on "unix://" itself, and a failing rule rejects.
            Some(rest) => rest.starts_with('/') || rest.starts_with('@'),
            None => true,
        },
        RuleKind::UdsNotDir => v
            .as_str()
            .is_none_or(|s| !s.starts_with("unix://") || !s.ends_with('/')),
        RuleKind::PortNames => {
            let re = PORT_NAME.get_or_init(|| Regex::new("^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$").ok());
            v.as_object().is_none_or(|m| {
                m.keys()
                    .all(|k| k.chars().count() < 63 && re.as_ref().is_some_and(|re| re.is_match(k)))
            })
        }
        RuleKind::AddressRequired => v.get("address").is_some() || v.get("network").is_some(),
        RuleKind::UdsNoPorts => {
            let uds = v
                .get("address")
                .and_then(Value::as_str)
                .is_some_and(|a| a.starts_with("unix://"));
            !uds || v.get("ports").is_none()
        }
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

/// Whether `v` satisfies `node` (a junctor branch: no unknown-field rule).
fn passes(node: &Node, v: &Value, path: &str) -> bool {
    let mut out = Vec::new();
    check(node, v, path, false, &mut out);
    out.is_empty()
}

/// Checks `v` against `node`, appending violations. `structural` is false inside
/// `oneOf`/`anyOf`/`allOf`/`not`, whose branches do not declare fields.
fn check(node: &Node, v: &Value, path: &str, structural: bool, out: &mut Vec<Violation>) {
    if v.is_null() {
        // Non-nullable nulls are pruned by the server: the field counts as absent.
        return;
    }
    if node.int_or_string && !(is_integer(v) || v.is_string()) {
        out.push(violation(
            path,
            format!("must be an integer or a string, got {}", type_of(v)),
        ));
        return;
    }
    if let Some(ty) = node.ty
        && !ty.matches(v)
    {
        out.push(violation(
            path,
            format!("must be of type {}, got {}", ty.name(), type_of(v)),
        ));
        return;
    }
    if let Some(options) = &node.enumeration
        && !options.contains(v)
    {
        let list: Vec<String> = options.iter().map(Value::to_string).collect();
        out.push(violation(
            path,
            format!("unsupported value {v}: must be one of {}", list.join(", ")),
        ));
    }
    match v {
        Value::String(s) => check_string(node, s, path, out),
        Value::Number(_) => check_number(node, v, path, out),
        Value::Array(items) => check_array(node, items, path, structural, out),
        Value::Object(map) => check_object(node, map, path, structural, out),
        Value::Bool(_) | Value::Null => {}
    }
    check_junctors(node, v, path, out);
    for rule in &node.rules {
        if !rule_holds(&rule.kind, v) {
            out.push(violation(path, rule.message.clone()));
        }
    }
}

fn check_string(node: &Node, s: &str, path: &str, out: &mut Vec<Violation>) {
    let len = s.chars().count() as u64;
    if let Some(max) = node.max_length
        && len > max
    {
        out.push(violation(
            path,
            format!("may not be longer than {max} characters (is {len})"),
        ));
    }
    if let Some(min) = node.min_length
        && len < min
    {
        out.push(violation(
            path,
            format!("must be at least {min} characters long (is {len})"),
        ));
    }
    if let Some(re) = &node.pattern
        && !re.is_match(s)
    {
        out.push(violation(
            path,
            format!("{s:?} does not match the pattern {}", re.as_str()),
        ));
    }
    match node.format {
        Some(Format::DateTime) if !is_date_time(s) => out.push(violation(
            path,
            format!("{s:?} is not an RFC 3339 date-time (like 2026-01-02T15:04:05Z)"),
        )),
        Some(Format::Byte) if !is_base64(s) => {
            out.push(violation(path, "is not valid base64".into()));
        }
        _ => {}
    }
}

fn check_number(node: &Node, v: &Value, path: &str, out: &mut Vec<Violation>) {
    let Some(x) = v.as_f64() else { return };
    if let Some(min) = node.minimum {
        if node.exclusive_minimum && x <= min {
            out.push(violation(path, format!("must be greater than {min}, got {v}")));
        } else if x < min {
            out.push(violation(path, format!("must be at least {min}, got {v}")));
        }
    }
    if let Some(max) = node.maximum {
        if node.exclusive_maximum && x >= max {
            out.push(violation(path, format!("must be less than {max}, got {v}")));
        } else if x > max {
            out.push(violation(path, format!("must be at most {max}, got {v}")));
        }
    }
    let range = match node.format {
        Some(Format::Int32) => Some((f64::from(i32::MIN), f64::from(i32::MAX), "int32")),
        Some(Format::Int64) => Some((i64::MIN as f64, i64::MAX as f64, "int64")),
        _ => None,
    };
    if let Some((lo, hi, name)) = range
        && (x < lo || x > hi)
    {
        out.push(violation(path, format!("{v} does not fit in an {name}")));
    }
}

fn check_array(node: &Node, items: &[Value], path: &str, structural: bool, out: &mut Vec<Violation>) {
    let n = items.len() as u64;
    if let Some(max) = node.max_items
        && n > max
    {
        out.push(violation(
            path,
            format!("must have at most {max} items (has {n})"),
        ));
    }
    if let Some(min) = node.min_items
        && n < min
    {
        out.push(violation(
            path,
            format!("must have at least {min} items (has {n})"),
        ));
    }
    if let Some(schema) = &node.items {
        for (i, item) in items.iter().enumerate() {
            check(schema, item, &format!("{path}[{i}]"), structural, out);
        }
    }
    match &node.list_type {
        ListType::Atomic => {}
        ListType::Set => {
            for (i, item) in items.iter().enumerate() {
                if items[..i].contains(item) {
                    out.push(violation(
                        &format!("{path}[{i}]"),
                        format!("duplicate value {item}"),
                    ));
                }
            }
        }
        ListType::Map(keys) => {
            let mut seen = HashSet::new();
            for (i, item) in items.iter().enumerate() {
                let key: Vec<String> = keys.iter().map(|k| item[k.as_str()].to_string()).collect();
                if !seen.insert(key.clone()) {
                    out.push(violation(
                        &format!("{path}[{i}]"),
                        format!("duplicate entry for key ({})", key.join(", ")),
                    ));
                }
            }
        }
    }
}

fn check_object(
    node: &Node,
    map: &Map<String, Value>,
    path: &str,
    structural: bool,
    out: &mut Vec<Violation>,
) {
    let n = map.len() as u64;
    if let Some(max) = node.max_properties
        && n > max
    {
        out.push(violation(
            path,
            format!("must have at most {max} entries (has {n})"),
        ));
    }
    if let Some(min) = node.min_properties
        && n < min
    {
        out.push(violation(
            path,
            format!("must have at least {min} entries (has {n})"),
        ));
    }
    for field in &node.required {
        let nullable = node
            .properties
            .as_ref()
            .and_then(|p| p.get(field))
            .is_some_and(|p| p.nullable);
        match map.get(field) {
            None => out.push(violation(&join(path, field), "required field is missing".into())),
            Some(Value::Null) if !nullable => {
                out.push(violation(&join(path, field), "required field is null".into()));
            }
            Some(_) => {}
        }
    }
    for (k, v) in map {
        if let Some(prop) = node.properties.as_ref().and_then(|p| p.get(k)) {
            check(prop, v, &join(path, k), structural, out);
            continue;
        }
        match &node.additional {
            Additional::Schema(s) => check(s, v, &format!("{path}[{k}]"), structural, out),
            Additional::Allowed(true) => {}
            Additional::Allowed(false) | Additional::Unset => {
                if structural && !node.preserve_unknown {
                    out.push(violation(&join(path, k), format!("unknown field {k:?}")));
                }
            }
        }
    }
}

fn check_junctors(node: &Node, v: &Value, path: &str, out: &mut Vec<Violation>) {
    for sub in &node.all_of {
        check(sub, v, path, false, out);
    }
    if !node.any_of.is_empty() && !node.any_of.iter().any(|s| passes(s, v, path)) {
        out.push(violation(path, "must match at least one schema of anyOf".into()));
    }
    if !node.one_of.is_empty() {
        let matched = node.one_of.iter().filter(|s| passes(s, v, path)).count();
        if matched != 1 {
            out.push(violation(path, one_of_message(node, v, matched)));
        }
    }
    if let Some(not) = &node.not
        && passes(not, v, path)
    {
        out.push(violation(path, "must not match the schema in not".into()));
    }
}

/// Istio writes a proto `oneof` as `oneOf: [{not: {anyOf: [{required: [a]}, ...]}},
/// {required: [a]}, ...]`; say that in words.
fn one_of_message(node: &Node, v: &Value, matched: usize) -> String {
    let fields: Vec<&str> = node
        .one_of
        .iter()
        .filter(|b| b.not.is_none() && b.required.len() == 1)
        .map(|b| b.required[0].as_str())
        .collect();
    let is_proto_oneof = fields.len() + 1 == node.one_of.len();
    if is_proto_oneof && matched > 1 {
        let set: Vec<&str> = fields.iter().copied().filter(|f| v.get(*f).is_some()).collect();
        return format!(
            "at most one of {} may be set, found {}",
            fields.join(", "),
            set.join(", ")
        );
    }
    format!("must match exactly one schema of oneOf, matched {matched}")
}

fn is_date_time(s: &str) -> bool {
    static RE: OnceLock<Option<Regex>> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$").ok()
    })
    .as_ref()
    .is_some_and(|re| re.is_match(s))
}

fn is_base64(s: &str) -> bool {
    let s = s.trim_end_matches('=');
    s.len() % 4 != 1
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_split_at_separator_lines() {
        let docs = split_documents("a: 1\n---\nb: 2\n--- \nc: 3");
        assert_eq!(docs, ["a: 1\n", "b: 2\n", "c: 3"]);
    }

    #[test]
    fn rules_are_recognised_exactly() {
        assert!(matches!(
            recognise(r#"self in ["", "HTTP", "HTTPS"]"#),
            Some(RuleKind::OneOfStrings(v)) if v == ["", "HTTP", "HTTPS"]
        ));
        assert!(recognise("self.size() > 0").is_none());
        assert!(recognise("0 < self && self <= 65536").is_none());
    }

    #[test]
    fn uds_rules_follow_cel() {
        let abs = RuleKind::UdsAbsolute;
        assert!(rule_holds(&abs, &json!("unix:///var/run/x.sock")));
        assert!(rule_holds(&abs, &json!("unix://@abstract")));
        assert!(!rule_holds(&abs, &json!("unix://relative")));
        assert!(!rule_holds(&abs, &json!("unix://")));
        assert!(rule_holds(&abs, &json!("10.0.0.1")));
        assert!(!rule_holds(&RuleKind::UdsNotDir, &json!("unix:///var/run/")));
    }

    #[test]
    fn qualified_names() {
        assert!(qualified_name_problem("app.kubernetes.io/managed-by").is_none());
        assert!(qualified_name_problem("app").is_none());
        assert!(qualified_name_problem("Bad_Prefix/x").is_some());
        assert!(qualified_name_problem("x/").is_some());
        assert!(qualified_name_problem(&"a".repeat(64)).is_some());
        assert!(label_value_ok("") && label_value_ok("v1.2_x") && !label_value_ok("-x"));
    }
}
