//! `capstan ctl` for cluster objects, in kubectl's words and output: `apply -f`, `get`
//! (tables aligned like kubectl's, `-o wide|yaml|json|name`, `-w`), `describe`, `delete`,
//! `scale`, `cordon`, `uncordon`. Objects are read and written through
//! [`capstan_client::Objects`], so every update is at the version read.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::time::SystemTime;

use anyhow::{bail, Context};
use capstan_client::{ClientError, Objects};
use capstan_proto::objects::manifest::decode_documents;
use capstan_proto::objects::validate::validate;
use capstan_proto::objects::{
    condition, decode_stored, parse_timestamp, Kind, Node, Object, Pod, PodPhase, ReplicaSet, CONDITION_TRUE,
    DEFAULT_NAMESPACE, NODE_READY, RESOURCE_CPU, RESOURCE_MEMORY, RESOURCE_PODS,
};
use clap::{Args, ValueEnum};
use etcd_client::{EventType, WatchOptions};

#[derive(Args, Debug)]
pub struct GetArgs {
    /// pods, nodes or replicasets (or po, no, rs; or KIND/NAME).
    pub kind: String,
    /// Only these objects.
    pub names: Vec<String>,
    #[command(flatten)]
    pub namespace: NamespaceArgs,
    /// Every namespace.
    #[arg(long, short = 'A')]
    pub all_namespaces: bool,
    /// Output format.
    #[arg(long, short = 'o', value_enum)]
    pub output: Option<Format>,
    /// Only objects with these labels (`app=web,tier=front`).
    #[arg(long, short = 'l')]
    pub selector: Option<String>,
    /// After listing, print changes as they happen (kubectl's `-w`).
    #[arg(long)]
    pub watch: bool,
}

#[derive(Args, Debug, Clone)]
pub struct NamespaceArgs {
    /// The namespace (default: `default`).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
}

impl NamespaceArgs {
    fn name(&self) -> &str {
        self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Wide,
    Yaml,
    Json,
    Name,
}

/// kubectl's `get pods` and `get pod/web` are `get`'s object form; etcdctl's `get KEY` is
/// the key form. The object form is parsed as the hidden `get-objects` subcommand, where
/// kubectl's `-w` means `--watch` (etcdctl's `-w` is `--write-out`).
pub fn route_object_get(mut args: Vec<String>) -> Vec<String> {
    let Some(ctl) = args.iter().position(|arg| arg == "ctl") else { return args };
    let mut index = ctl + 1;
    while index < args.len() {
        let arg = args[index].as_str();
        match arg {
            "--endpoints"
            | "--write-out"
            | "-w"
            | "--command-timeout-secs"
            | "--cacert"
            | "--cert"
            | "--key"
            | "--user" => index += 2,
            _ if arg.starts_with('-') => index += 1,
            _ => break,
        }
    }
    let is_resource = |arg: &String| Kind::from_resource(arg.split('/').next().unwrap_or_default()).is_some();
    if args.get(index).map(String::as_str) != Some("get") || !args.get(index + 1).is_some_and(is_resource) {
        return args;
    }
    args[index] = "get-objects".into();
    for arg in &mut args[index + 1..] {
        if arg == "-w" {
            *arg = "--watch".into();
        }
    }
    args
}

/// Splits `pods` / `pod/web` into the kind and the names asked for.
fn kind_and_names(kind: &str, names: &[String]) -> anyhow::Result<(Kind, Vec<String>)> {
    let (resource, name) = match kind.split_once('/') {
        Some((resource, name)) => (resource, Some(name.to_string())),
        None => (kind, None),
    };
    let kind = Kind::from_resource(resource).with_context(|| {
        format!("the server doesn't have a resource type {resource:?} (Capstan has pods, nodes and replicasets)")
    })?;
    Ok((kind, name.into_iter().chain(names.iter().cloned()).collect()))
}

// ---------------------------------------------------------------------------------------
// apply

/// Reads manifests from files, directories (their .yaml, .yml and .json files, in name
/// order) or standard input (`-`).
fn read_manifests(paths: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    let mut texts = Vec::new();
    for path in paths {
        if path == "-" {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).context("cannot read standard input")?;
            texts.push(("STDIN".to_string(), text));
            continue;
        }
        let path = Path::new(path);
        if path.is_dir() {
            let mut files: Vec<_> = std::fs::read_dir(path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|file| file.extension().is_some_and(|ext| ext == "yaml" || ext == "yml" || ext == "json"))
                .collect();
            files.sort();
            for file in files {
                texts.push((
                    file.display().to_string(),
                    std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?,
                ));
            }
        } else {
            texts.push((
                path.display().to_string(),
                std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
            ));
        }
    }
    Ok(texts)
}

/// Decodes, validates and applies every object in the manifests; reports each, and fails
/// at the end if any failed.
pub async fn apply(objects: &Objects, paths: &[String], namespace: &NamespaceArgs) -> anyhow::Result<()> {
    let mut failures = 0;
    for (source, text) in read_manifests(paths)? {
        let documents = decode_documents(&text).with_context(|| format!("error parsing {source}"))?;
        for document in documents {
            let decoded = match document {
                Ok(decoded) => decoded,
                Err(error) => {
                    eprintln!("error: {source}: {error}");
                    failures += 1;
                    continue;
                }
            };
            let mut object = decoded.object;
            let label = format!("{}/{}", object.kind().qualified(), object.metadata().name);
            for field in &decoded.ignored_fields {
                eprintln!("Warning: {label}: unknown field \"{field}\" (Capstan does not support it; ignored)");
            }
            if object.kind().namespaced() && object.metadata().namespace.is_empty() {
                object.metadata_mut().namespace = namespace.name().to_string();
            }
            let report = validate(&object);
            for warning in &report.warnings {
                eprintln!("Warning: {label}: {warning}");
            }
            if !report.errors.is_empty() {
                let errors: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
                eprintln!(
                    "The {} {:?} is invalid: {}",
                    object.kind().name(),
                    object.metadata().name,
                    errors.join(", ")
                );
                failures += 1;
                continue;
            }
            match apply_one(objects, object).await {
                Ok(outcome) => println!("{label} {outcome}"),
                Err(error) => {
                    eprintln!("error: {label}: {error:#}");
                    failures += 1;
                }
            }
        }
    }
    if failures > 0 {
        bail!("{failures} object(s) not applied");
    }
    Ok(())
}

/// Creates the object, or updates what the manifest owns (labels, annotations, spec; a
/// node's status too, since nodes without an agent are registered by manifest).
async fn apply_one(objects: &Objects, desired: Object) -> anyhow::Result<&'static str> {
    let (kind, namespace, name) = (desired.kind(), desired.namespace().to_string(), desired.metadata().name.clone());
    objects
        .modify_or_create(kind, &namespace, &name, |current| match current {
            None => {
                // The client gives it a UID and creation time.
                let mut created = desired.clone();
                created.metadata_mut().resource_version.clear();
                Ok((Some(created), "created"))
            }
            Some(current) => {
                let mut merged = current.clone();
                let (meta, wanted) = (merged.metadata_mut(), desired.metadata());
                meta.labels = wanted.labels.clone();
                meta.annotations = wanted.annotations.clone();
                match (&mut merged, &desired) {
                    (Object::Pod(pod), Object::Pod(wanted)) => {
                        let mut spec = wanted.spec.clone();
                        if spec.node_name.is_empty() {
                            spec.node_name = pod.spec.node_name.clone();
                        }
                        if spec != pod.spec {
                            bail!("The Pod {name:?} is invalid: spec: Forbidden: pod updates may not change fields other than metadata.labels and metadata.annotations");
                        }
                    }
                    (Object::ReplicaSet(rs), Object::ReplicaSet(wanted)) => rs.spec = wanted.spec.clone(),
                    (Object::Node(node), Object::Node(wanted)) => {
                        node.spec = wanted.spec.clone();
                        if wanted.status != Default::default() {
                            node.status = wanted.status.clone();
                        }
                    }
                    _ => unreachable!("current and desired are read from the same key, so of one kind"),
                }
                if merged == *current {
                    Ok((None, "unchanged"))
                } else {
                    Ok((Some(merged), "configured"))
                }
            }
        })
        .await
}

// ---------------------------------------------------------------------------------------
// get

pub async fn get(objects: &Objects, args: &GetArgs) -> anyhow::Result<()> {
    let (kind, names) = kind_and_names(&args.kind, &args.names)?;
    let all_namespaces = args.all_namespaces && kind.namespaced();
    let namespace = if all_namespaces || !kind.namespaced() { None } else { Some(args.namespace.name()) };
    let selector = parse_selector(args.selector.as_deref())?;
    let listed = objects.list(kind, namespace).await?;
    for error in &listed.undecodable {
        eprintln!("Warning: {error}");
    }
    let mut found: Vec<Object> = listed
        .objects
        .into_iter()
        .filter(|object| names.is_empty() || names.contains(&object.metadata().name))
        .filter(|object| selector.iter().all(|(k, v)| object.metadata().labels.get(k) == Some(v)))
        .collect();
    found.sort_by(|a, b| (a.namespace(), &a.metadata().name).cmp(&(b.namespace(), &b.metadata().name)));
    for name in &names {
        if !found.iter().any(|object| &object.metadata().name == name) {
            bail!("{} {name:?} not found", kind.qualified());
        }
    }
    let nodes_pods = if kind == Kind::Node && args.output == Some(Format::Wide) {
        Some(objects.list(Kind::Pod, None).await?.objects)
    } else {
        None
    };
    let table = Table { kind, all_namespaces, wide: args.output == Some(Format::Wide), pods: nodes_pods };
    match args.output {
        Some(Format::Json) => println!("{}", serde_json::to_string_pretty(&as_document(&found, names.len() == 1))?),
        Some(Format::Yaml) => print!("{}", serde_yaml_ng::to_string(&as_document(&found, names.len() == 1))?),
        Some(Format::Name) => {
            found.iter().for_each(|object| println!("{}/{}", kind.qualified(), object.metadata().name))
        }
        _ if found.is_empty() && !args.watch => match namespace {
            Some(namespace) => eprintln!("No resources found in {namespace} namespace."),
            None => eprintln!("No resources found"),
        },
        _ => print!("{}", table.render(&found, true)),
    }
    if args.watch {
        let prefix = match namespace {
            Some(namespace) => kind.namespace_prefix(namespace),
            None => kind.prefix(),
        };
        let options = WatchOptions::new().with_prefix().with_prev_key().with_start_revision(listed.revision + 1);
        let mut stream = objects.client().watch_client().watch(prefix, Some(options)).await?;
        while let Some(response) = stream.message().await? {
            for event in response.events() {
                let kv = match event.event_type() {
                    EventType::Put => event.kv(),
                    EventType::Delete => event.prev_kv(),
                };
                let Some(kv) = kv else { continue };
                match decode_stored(kv.key(), kv.value(), kv.mod_revision()) {
                    Ok(object) if names.is_empty() || names.contains(&object.metadata().name) => {
                        print!("{}", table.render(&[object], false))
                    }
                    Ok(_) => {}
                    Err(error) => eprintln!("Warning: {error}"),
                }
            }
        }
    }
    Ok(())
}

/// One object as itself, several as a kubectl `List`.
fn as_document(found: &[Object], single: bool) -> serde_json::Value {
    if single && found.len() == 1 {
        return found[0].to_value();
    }
    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": found.iter().map(Object::to_value).collect::<Vec<_>>()})
}

fn parse_selector(text: Option<&str>) -> anyhow::Result<BTreeMap<String, String>> {
    let Some(text) = text else { return Ok(BTreeMap::new()) };
    text.split(',')
        .map(|term| {
            let (key, value) = term
                .split_once('=')
                .with_context(|| format!("unable to parse selector term {term:?}: want key=value"))?;
            Ok((key.trim().to_string(), value.trim_start_matches('=').trim().to_string()))
        })
        .collect()
}

struct Table {
    kind: Kind,
    all_namespaces: bool,
    wide: bool,
    /// Every pod, for the wide node table's requested resources.
    pods: Option<Vec<Object>>,
}

impl Table {
    fn headers(&self) -> Vec<&'static str> {
        let mut headers = match self.kind {
            Kind::Pod => vec!["NAME", "READY", "STATUS", "RESTARTS", "AGE"],
            Kind::Node => vec!["NAME", "STATUS", "AGE"],
            Kind::ReplicaSet => vec!["NAME", "DESIRED", "CURRENT", "READY", "AGE"],
        };
        if self.wide {
            headers.extend(match self.kind {
                Kind::Pod => vec!["IP", "NODE"],
                Kind::Node => vec!["INTERNAL-IP", "CPU", "MEMORY", "PODS", "TAINTS"],
                Kind::ReplicaSet => vec!["CONTAINERS", "SELECTOR"],
            });
        }
        if self.all_namespaces {
            headers.insert(0, "NAMESPACE");
        }
        headers
    }

    fn row(&self, object: &Object) -> Vec<String> {
        let meta = object.metadata();
        let age = age(&meta.creation_timestamp);
        let mut row = match object {
            Object::Pod(pod) => {
                let ready = pod.status.container_statuses.iter().filter(|c| c.ready).count();
                let restarts: i32 = pod.status.container_statuses.iter().map(|c| c.restart_count).sum();
                let mut row = vec![
                    meta.name.clone(),
                    format!("{ready}/{}", pod.spec.containers.len()),
                    pod_status(pod),
                    restarts.to_string(),
                    age,
                ];
                if self.wide {
                    row.push(or_none(&pod.status.host_ip));
                    row.push(or_none(&pod.spec.node_name));
                }
                row
            }
            Object::Node(node) => {
                let mut row = vec![meta.name.clone(), node_status(node), age];
                if self.wide {
                    let address =
                        node.status.addresses.iter().find(|a| a.type_ == "InternalIP").map(|a| a.address.clone());
                    let (cpu, memory, pods) = self.node_requests(&meta.name);
                    let total = |resource: &str| {
                        node.allocatable(resource).map(ToString::to_string).unwrap_or_else(|| "0".into())
                    };
                    row.push(address.unwrap_or_else(|| "<none>".into()));
                    row.push(format!("{cpu}m/{}", total(RESOURCE_CPU)));
                    row.push(format!("{}/{}", bytes(memory), total(RESOURCE_MEMORY)));
                    row.push(format!("{pods}/{}", total(RESOURCE_PODS)));
                    let taints: Vec<String> =
                        node.spec.taints.iter().map(|t| format!("{}={}:{:?}", t.key, t.value, t.effect)).collect();
                    row.push(if taints.is_empty() { "<none>".into() } else { taints.join(",") });
                }
                row
            }
            Object::ReplicaSet(rs) => {
                let mut row = vec![
                    meta.name.clone(),
                    rs.spec.replicas.to_string(),
                    rs.status.replicas.to_string(),
                    rs.status.ready_replicas.to_string(),
                    age,
                ];
                if self.wide {
                    row.push(
                        rs.spec.template.spec.containers.iter().map(|c| c.name.clone()).collect::<Vec<_>>().join(","),
                    );
                    row.push(rs.spec.selector.to_text());
                }
                row
            }
        };
        if self.all_namespaces {
            row.insert(0, object.namespace().to_string());
        }
        row
    }

    /// cpu millis, memory bytes and pods requested on a node by the pods bound to it.
    fn node_requests(&self, node: &str) -> (i64, i64, usize) {
        let pods = self.pods.iter().flatten().filter_map(|object| match object {
            Object::Pod(pod) if pod.spec.node_name == node && pod.holds_resources() => Some(pod),
            _ => None,
        });
        pods.fold((0, 0, 0), |(cpu, memory, count), pod| {
            let requests = pod.requests();
            (cpu + requests.cpu_millis, memory + requests.memory_bytes, count + 1)
        })
    }

    /// kubectl's layout: left-aligned columns, three spaces apart.
    fn render(&self, objects: &[Object], header: bool) -> String {
        let mut rows: Vec<Vec<String>> = Vec::new();
        if header {
            rows.push(self.headers().into_iter().map(String::from).collect());
        }
        rows.extend(objects.iter().map(|object| self.row(object)));
        render_rows(&rows)
    }
}

fn render_rows(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}   ", width = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn or_none(text: &str) -> String {
    if text.is_empty() {
        "<none>".into()
    } else {
        text.to_string()
    }
}

/// What kubectl shows in STATUS: the reason when the pod failed for one (NodeLost), a
/// waiting container's reason, else the phase.
fn pod_status(pod: &Pod) -> String {
    if !pod.status.reason.is_empty() {
        return pod.status.reason.clone();
    }
    let waiting = pod.status.container_statuses.iter().find_map(|c| c.state.waiting.as_ref()).map(|w| w.reason.clone());
    if let Some(reason) = waiting.filter(|r| !r.is_empty()) {
        return reason;
    }
    let terminated = pod.status.container_statuses.iter().find_map(|c| c.state.terminated.as_ref());
    match (pod.status.phase, terminated) {
        (PodPhase::Succeeded, _) => "Completed".into(),
        (PodPhase::Failed, Some(t)) if !t.reason.is_empty() => t.reason.clone(),
        (phase, _) => phase.name().into(),
    }
}

/// `Ready`, `NotReady`, `Unknown`, with `,SchedulingDisabled` when cordoned.
fn node_status(node: &Node) -> String {
    let mut status = match condition(&node.status.conditions, NODE_READY) {
        Some(ready) if ready.status == CONDITION_TRUE => "Ready".to_string(),
        Some(_) => "NotReady".to_string(),
        None => "Unknown".to_string(),
    };
    if node.spec.unschedulable {
        status.push_str(",SchedulingDisabled");
    }
    status
}

/// kubectl's short ages: 45s, 3m12s, 17m, 5h3m, 2d4h, 12d.
fn age(created: &str) -> String {
    let Some(created) = parse_timestamp(created) else { return "<unknown>".into() };
    let secs = SystemTime::now().duration_since(created).unwrap_or_default().as_secs();
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86400);
    match secs {
        _ if secs < 120 => format!("{secs}s"),
        _ if m < 10 => format!("{m}m{}s", secs % 60),
        _ if h < 3 => format!("{m}m"),
        _ if h < 8 => format!("{h}h{}m", m % 60),
        _ if d < 2 => format!("{h}h"),
        _ if d < 8 => format!("{d}d{}h", h % 24),
        _ => format!("{d}d"),
    }
}

fn bytes(amount: i64) -> String {
    match amount {
        _ if amount >= 1 << 30 && amount % (1 << 30) == 0 => format!("{}Gi", amount >> 30),
        _ if amount >= 1 << 20 => format!("{}Mi", amount >> 20),
        _ if amount >= 1 << 10 => format!("{}Ki", amount >> 10),
        _ => amount.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// describe, delete, scale, cordon

pub async fn describe(objects: &Objects, kind: &str, name: &str, namespace: &NamespaceArgs) -> anyhow::Result<()> {
    let (kind, _) = kind_and_names(kind, &[])?;
    let object = objects.get_existing(kind, namespace.name(), name).await?;
    let meta = object.metadata();
    let mut lines: Vec<(String, String)> = vec![("Name".into(), meta.name.clone())];
    if kind.namespaced() {
        lines.push(("Namespace".into(), object.namespace().to_string()));
    }
    let labels: Vec<String> = meta.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    lines.push(("Labels".into(), if labels.is_empty() { "<none>".into() } else { labels.join(", ") }));
    lines.push(("Created".into(), or_none(&meta.creation_timestamp)));
    lines.push(("UID".into(), meta.uid.clone()));
    lines.push(("Resource Version".into(), meta.resource_version.clone()));
    let mut sections = Vec::new();
    match &object {
        Object::Pod(pod) => {
            lines.push(("Node".into(), or_none(&pod.spec.node_name)));
            lines.push(("Status".into(), pod_status(pod)));
            if !pod.status.message.is_empty() {
                lines.push(("Message".into(), pod.status.message.clone()));
            }
            if let Some(owner) = pod.controller() {
                lines.push(("Controlled By".into(), format!("{}/{}", owner.kind, owner.name)));
            }
            let mut containers = String::from("Containers:\n");
            for container in &pod.spec.containers {
                containers.push_str(&format!(
                    "  {}:\n    Command:  {}\n",
                    container.name,
                    [container.command.clone(), container.args.clone()].concat().join(" ")
                ));
                for (field, amounts) in
                    [("Requests", &container.resources.requests), ("Limits", &container.resources.limits)]
                {
                    if !amounts.is_empty() {
                        let text: Vec<String> = amounts.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        containers.push_str(&format!("    {field}:  {}\n", text.join(", ")));
                    }
                }
                if let Some(status) = pod.status.container_statuses.iter().find(|s| s.name == container.name) {
                    containers.push_str(&format!(
                        "    Ready:  {}\n    Restart Count:  {}\n",
                        status.ready, status.restart_count
                    ));
                }
            }
            sections.push(containers);
            sections.push(conditions_section(&pod.status.conditions));
        }
        Object::Node(node) => {
            lines.push(("Status".into(), node_status(node)));
            let taints: Vec<String> =
                node.spec.taints.iter().map(|t| format!("{}={}:{:?}", t.key, t.value, t.effect)).collect();
            lines.push(("Taints".into(), if taints.is_empty() { "<none>".into() } else { taints.join(", ") }));
            lines.push(("Unschedulable".into(), node.spec.unschedulable.to_string()));
            sections.push(conditions_section(&node.status.conditions));
            for (title, amounts) in [("Capacity", &node.status.capacity), ("Allocatable", &node.status.allocatable)] {
                let mut section = format!("{title}:\n");
                amounts.iter().for_each(|(k, v)| section.push_str(&format!("  {k}:  {v}\n")));
                sections.push(section);
            }
            let pods = objects.list(Kind::Pod, None).await?.objects;
            let table = Table { kind: Kind::Node, all_namespaces: false, wide: true, pods: Some(pods.clone()) };
            let (cpu, memory, count) = table.node_requests(&meta.name);
            sections.push(format!(
                "Allocated resources:\n  cpu:  {cpu}m\n  memory:  {}\n  pods:  {count}\n",
                bytes(memory)
            ));
            let mut section = String::from("Pods:\n");
            for object in &pods {
                if let Object::Pod(pod) = object {
                    if pod.spec.node_name == meta.name {
                        section.push_str(&format!(
                            "  {}/{}  {}\n",
                            pod.namespace(),
                            pod.metadata.name,
                            pod_status(pod)
                        ));
                    }
                }
            }
            sections.push(section);
        }
        Object::ReplicaSet(rs) => {
            lines.push(("Selector".into(), rs.spec.selector.to_text()));
            lines.push(("Replicas".into(), format!("{} current / {} desired", rs.status.replicas, rs.spec.replicas)));
            let pods = objects.list(Kind::Pod, Some(rs.namespace())).await?.objects;
            let mut phases: BTreeMap<&str, usize> = BTreeMap::new();
            for object in &pods {
                if let Object::Pod(pod) = object {
                    if pod.controller().is_some_and(|owner| owner.uid == rs.metadata.uid) {
                        *phases.entry(pod.status.phase.name()).or_default() += 1;
                    }
                }
            }
            let count = |phase: &str| phases.get(phase).copied().unwrap_or(0);
            lines.push((
                "Pods Status".into(),
                format!(
                    "{} Running / {} Pending / {} Succeeded / {} Failed",
                    count("Running"),
                    count("Pending"),
                    count("Succeeded"),
                    count("Failed")
                ),
            ));
            let template: Vec<String> = rs
                .spec
                .template
                .spec
                .containers
                .iter()
                .map(|c| format!("  {}:  {}", c.name, c.command.join(" ")))
                .collect();
            sections.push(format!("Pod Template Containers:\n{}\n", template.join("\n")));
        }
    }
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 2;
    for (key, value) in lines {
        println!("{:<width$}{value}", format!("{key}:"));
    }
    for section in sections {
        print!("{section}");
    }
    Ok(())
}

fn conditions_section(conditions: &[capstan_proto::objects::Condition]) -> String {
    if conditions.is_empty() {
        return "Conditions:  <none>\n".into();
    }
    let mut rows = vec![vec!["  Type".to_string(), "Status".into(), "Reason".into(), "Message".into()]];
    rows.extend(
        conditions
            .iter()
            .map(|c| vec![format!("  {}", c.type_), c.status.clone(), c.reason.clone(), c.message.clone()]),
    );
    format!("Conditions:\n{}", render_rows(&rows))
}

/// Deletes objects named on the command line or in manifests.
pub async fn delete(
    objects: &Objects,
    kind: Option<&str>,
    names: &[String],
    files: &[String],
    namespace: &NamespaceArgs,
) -> anyhow::Result<()> {
    let mut targets: Vec<(Kind, String, String)> = Vec::new();
    if !files.is_empty() {
        for (source, text) in read_manifests(files)? {
            for document in decode_documents(&text).with_context(|| format!("error parsing {source}"))? {
                let object = document.with_context(|| format!("error parsing {source}"))?.object;
                let namespace = if object.metadata().namespace.is_empty() {
                    namespace.name().to_string()
                } else {
                    object.namespace().to_string()
                };
                targets.push((object.kind(), namespace, object.metadata().name.clone()));
            }
        }
    } else {
        let kind = kind.context("delete needs a resource type and names, or -f FILE")?;
        let (kind, names) = kind_and_names(kind, names)?;
        if names.is_empty() {
            bail!("resource(s) were provided, but no name was specified");
        }
        targets.extend(names.into_iter().map(|name| (kind, namespace.name().to_string(), name)));
    }
    let mut failures = 0;
    for (kind, namespace, name) in targets {
        match objects.delete(kind, &namespace, &name).await {
            Ok(_) => println!("{} {name:?} deleted", kind.qualified()),
            Err(error) => {
                eprintln!("Error from server (NotFound): {error}");
                failures += 1;
            }
        }
    }
    if failures > 0 {
        bail!("{failures} object(s) not deleted");
    }
    Ok(())
}

pub async fn scale(
    objects: &Objects,
    kind: &str,
    name: &str,
    replicas: i32,
    namespace: &NamespaceArgs,
) -> anyhow::Result<()> {
    let (kind, _) = kind_and_names(kind, &[])?;
    if kind != Kind::ReplicaSet {
        bail!("scale works on replicasets, not {}", kind.resource());
    }
    if replicas < 0 {
        bail!("--replicas must be non-negative, not {replicas}");
    }
    objects
        .modify(kind, namespace.name(), name, |object| match object {
            Object::ReplicaSet(ReplicaSet { spec, .. }) if spec.replicas != replicas => {
                spec.replicas = replicas;
                Ok::<_, ClientError>(true)
            }
            _ => Ok(false),
        })
        .await?;
    println!("{}/{name} scaled", kind.qualified());
    Ok(())
}

pub async fn cordon(objects: &Objects, node: &str, unschedulable: bool) -> anyhow::Result<()> {
    let mut changed = false;
    objects
        .modify(Kind::Node, "", node, |object| match object {
            Object::Node(node) if node.spec.unschedulable != unschedulable => {
                node.spec.unschedulable = unschedulable;
                changed = true;
                Ok::<_, ClientError>(true)
            }
            _ => Ok(false),
        })
        .await?;
    let verb = if unschedulable { "cordoned" } else { "uncordoned" };
    if changed {
        println!("node/{node} {verb}");
    } else {
        println!("node/{node} already {verb}");
    }
    Ok(())
}

/// Cordons the node, then deletes its pods so their ReplicaSets replace them elsewhere;
/// the agent stops each within its grace period. Pods without a controller would be gone
/// for good, so they need `--force`, as with kubectl.
pub async fn drain(objects: &Objects, node: &str, force: bool) -> anyhow::Result<()> {
    cordon(objects, node, true).await?;
    let pods: Vec<Pod> = objects
        .list(Kind::Pod, None)
        .await?
        .objects
        .into_iter()
        .filter_map(|object| match object {
            Object::Pod(pod) if pod.spec.node_name == node && !pod.status.phase.is_terminal() => Some(pod),
            _ => None,
        })
        .collect();
    let bare: Vec<String> = pods
        .iter()
        .filter(|pod| pod.controller().is_none())
        .map(|pod| format!("{}/{}", pod.namespace(), pod.metadata.name))
        .collect();
    if !bare.is_empty() && !force {
        bail!("cannot delete Pods that declare no controller (use --force to override): {}", bare.join(", "));
    }
    for pod in &pods {
        println!("evicting pod {}/{}", pod.namespace(), pod.metadata.name);
        match objects.delete(Kind::Pod, pod.namespace(), &pod.metadata.name).await {
            Ok(_) | Err(ClientError::NotFound { .. }) => println!("pod/{} evicted", pod.metadata.name),
            Err(error) => bail!("cannot evict pod {}: {error}", pod.metadata.name),
        }
    }
    println!("node/{node} drained");
    Ok(())
}

/// Prints a container's log, from the agent of the pod's node (its address and log port
/// are in the Node's status).
pub async fn logs(
    objects: &Objects,
    pod: &str,
    container: Option<&str>,
    follow: bool,
    namespace: &NamespaceArgs,
) -> anyhow::Result<()> {
    use std::io::Write;
    let Some(Object::Pod(found)) = objects.get(Kind::Pod, namespace.name(), pod).await? else {
        bail!("pods {pod:?} not found");
    };
    if found.spec.node_name.is_empty() {
        bail!("pod {pod:?} is not bound to a node yet: it has no logs");
    }
    let Some(Object::Node(node)) = objects.get(Kind::Node, "", &found.spec.node_name).await? else {
        bail!("node {:?} of pod {pod:?} is not registered", found.spec.node_name);
    };
    let Some(url) = node.log_url() else {
        bail!("node {:?} does not advertise a log endpoint (is its agent running?)", node.metadata.name);
    };
    let mut client = capstan_proto::agentpb::pod_logs_client::PodLogsClient::connect(url.clone())
        .await
        .with_context(|| format!("cannot reach the agent of node {} at {url}", node.metadata.name))?;
    let request = capstan_proto::agentpb::LogsRequest {
        namespace: found.namespace().to_string(),
        pod: pod.to_string(),
        container: container.unwrap_or_default().to_string(),
        follow,
    };
    let mut stream = client.logs(request).await.map_err(|status| anyhow::anyhow!("{}", status.message()))?.into_inner();
    let mut stdout = std::io::stdout();
    while let Some(chunk) = stream.message().await.map_err(|status| anyhow::anyhow!("{}", status.message()))? {
        stdout.write_all(&chunk.data)?;
        stdout.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use capstan_proto::objects::timestamp;

    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split(' ').map(String::from).collect()
    }

    #[test]
    fn object_gets_are_routed_and_key_gets_are_not() {
        assert_eq!(route_object_get(args("capstan ctl get pods -w")), args("capstan ctl get-objects pods --watch"));
        assert_eq!(
            route_object_get(args("capstan ctl --endpoints a:1 -w json get pod/web -o yaml")),
            args("capstan ctl --endpoints a:1 -w json get-objects pod/web -o yaml")
        );
        assert_eq!(route_object_get(args("capstan ctl get foo -w json")), args("capstan ctl get foo -w json"));
        assert_eq!(route_object_get(args("capstan ctl put get pods")), args("capstan ctl put get pods"));
        assert_eq!(
            route_object_get(args("capstan ctl --cacert ca --cert c --key k get nodes")),
            args("capstan ctl --cacert ca --cert c --key k get-objects nodes")
        );
    }

    #[test]
    fn tables_align_like_kubectl() {
        let rows = vec![args("NAME READY STATUS"), args("web-7x2kq 1/1 Running"), args("a 0/1 Pending")];
        assert_eq!(
            render_rows(&rows),
            "NAME        READY   STATUS\nweb-7x2kq   1/1     Running\na           0/1     Pending\n"
        );
    }

    #[test]
    fn ages_read_like_kubectl() {
        let ago = |secs: u64| timestamp(SystemTime::now() - std::time::Duration::from_secs(secs));
        assert_eq!(age(&ago(45)), "45s");
        assert_eq!(age(&ago(192)), "3m12s");
        assert_eq!(age(&ago(3 * 3600 + 60)), "3h1m");
        assert_eq!(age(&ago(86400 * 3 + 3600 * 4)), "3d4h");
        assert_eq!(age("garbage"), "<unknown>");
    }
}
