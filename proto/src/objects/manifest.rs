//! Reads manifests: one or more YAML (or JSON) documents, each an object of a kind Capstan
//! stores, or a `kind: List` of them (what `capstan ctl get -o yaml` prints). Every field
//! the types do not have is reported by its path (`spec.containers[0].image`), so a
//! Kubernetes manifest applies unchanged and the user sees what Capstan will not act on.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::{Kind, Node, Object, Pod, ReplicaSet};

/// One object read from a manifest, with the fields Capstan ignored in it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub object: Object,
    pub ignored_fields: Vec<String>,
}

/// Why a document is not an object Capstan stores.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("invalid YAML: {0}")]
    Syntax(String),
    #[error("document {document}: {message}")]
    Document { document: usize, message: String },
}

/// Decodes every document of a manifest, in order; empty documents are skipped. A
/// document that does not decode gives an error in its place and the others still decode.
pub fn decode_documents(text: &str) -> Result<Vec<Result<Decoded, ManifestError>>, ManifestError> {
    let mut decoded = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(document).map_err(|e| ManifestError::Syntax(e.to_string()))?;
        let number = index + 1;
        let error = |message: String| ManifestError::Document { document: number, message };
        match strip_nulls(value) {
            Value::Null => {}
            Value::Object(fields) if fields.get("kind").and_then(Value::as_str) == Some("List") => {
                match fields.get("items") {
                    Some(Value::Array(items)) => {
                        decoded.extend(items.iter().map(|item| decode_value(item.clone()).map_err(error)))
                    }
                    _ => decoded.push(Err(error("items: a List needs an array of items".into()))),
                }
            }
            value => decoded.push(decode_value(value).map_err(error)),
        }
    }
    Ok(decoded)
}

/// Decodes one object from its JSON value, by apiVersion and kind.
fn decode_value(value: Value) -> Result<Decoded, String> {
    let Value::Object(fields) = &value else {
        return Err("not an object: a manifest document is a mapping with apiVersion, kind and metadata".into());
    };
    let text = |name: &str| fields.get(name).and_then(Value::as_str).unwrap_or_default().to_string();
    let (api_version, kind_name) = (text("apiVersion"), text("kind"));
    if kind_name.is_empty() {
        return Err("kind: required value".into());
    }
    let kind = Kind::ALL
        .into_iter()
        .find(|kind| kind.name() == kind_name && kind.api_version() == api_version)
        .ok_or_else(|| format!("no matches for kind {kind_name:?} in version {api_version:?}"))?;
    let mut ignored_fields = Vec::new();
    let object = match kind {
        Kind::Node => Object::Node(typed::<Node>(value, &mut ignored_fields)?),
        Kind::Pod => Object::Pod(typed::<Pod>(value, &mut ignored_fields)?),
        Kind::ReplicaSet => Object::ReplicaSet(typed::<ReplicaSet>(value, &mut ignored_fields)?),
    };
    Ok(Decoded { object, ignored_fields })
}

/// Deserialises `value` as `T`, naming the path of a field that does not fit and
/// collecting the paths of the fields `T` does not have.
fn typed<T: DeserializeOwned>(value: Value, ignored_fields: &mut Vec<String>) -> Result<T, String> {
    let mut record = |path: serde_ignored::Path<'_>| ignored_fields.push(path_text(&path));
    let ignoring = serde_ignored::Deserializer::new(value, &mut record);
    serde_path_to_error::deserialize(ignoring).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        if path == "." {
            message
        } else {
            format!("{path}: {message}")
        }
    })
}

/// `spec.containers[0].image` for serde_ignored's path.
fn path_text(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", path_text(parent)),
        Path::Map { parent, key } => match path_text(parent) {
            parent if parent.is_empty() => key.clone(),
            parent => format!("{parent}.{key}"),
        },
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => path_text(parent),
    }
}

/// Drops fields whose value is null: in a manifest they mean "not set" (`kubectl create
/// --dry-run -o yaml` writes `creationTimestamp: null`).
fn strip_nulls(value: Value) -> Value {
    match value {
        Value::Object(fields) => {
            Value::Object(fields.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k, strip_nulls(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{Quantity, RestartPolicy};

    const KUBERNETES_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {app: web}
  creationTimestamp: null
spec:
  containers:
  - name: main
    image: busybox:1.36
    imagePullPolicy: IfNotPresent
    command: ["sleep", "3600"]
    resources:
      requests: {cpu: 250m, memory: 64Mi}
      limits: {cpu: 1, memory: 128Mi}
  restartPolicy: OnFailure
  dnsPolicy: ClusterFirst
---
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
"#;

    #[test]
    fn a_kubernetes_pod_decodes_and_unsupported_fields_are_reported() {
        let documents = decode_documents(KUBERNETES_POD).unwrap();
        assert_eq!(documents.len(), 2, "the empty document is skipped");
        let decoded = documents[0].as_ref().unwrap();
        let Object::Pod(pod) = &decoded.object else { panic!("not a pod: {decoded:?}") };
        assert_eq!(pod.spec.restart_policy, RestartPolicy::OnFailure);
        assert_eq!(pod.spec.containers[0].resources.limits["cpu"], Quantity::new("1"));
        assert_eq!(
            decoded.ignored_fields,
            vec!["spec.containers[0].image", "spec.containers[0].imagePullPolicy", "spec.dnsPolicy"]
        );
        assert_eq!(
            documents[1],
            Err(ManifestError::Document {
                document: 3,
                message: "no matches for kind \"Deployment\" in version \"apps/v1\"".into()
            })
        );
    }

    #[test]
    fn a_field_of_the_wrong_type_is_named() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec:\n  restartPolicy: Sometimes\n";
        let error = decode_documents(text).unwrap().remove(0).unwrap_err().to_string();
        assert!(error.starts_with("document 1: spec.restartPolicy: unknown variant `Sometimes`"), "{error}");
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec:\n  containers:\n  - name: a\n    ports: [{containerPort: eighty}]\n";
        let error = decode_documents(text).unwrap().remove(0).unwrap_err().to_string();
        assert!(error.starts_with("document 1: spec.containers[0].ports[0].containerPort: invalid type"), "{error}");
    }

    #[test]
    fn broken_yaml_and_odd_documents_are_errors() {
        assert!(matches!(decode_documents("a: [1, 2"), Err(ManifestError::Syntax(_))));
        let documents = decode_documents("- 1\n- 2\n---\nkind: Pod\n").unwrap();
        assert!(documents[0].as_ref().unwrap_err().to_string().contains("not an object"));
        assert_eq!(
            documents[1].as_ref().unwrap_err().to_string(),
            "document 2: no matches for kind \"Pod\" in version \"\""
        );
    }

    #[test]
    fn a_list_decodes_to_its_items_and_json_works_too() {
        let text = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Node","metadata":{"name":"n1"},"status":{"capacity":{"cpu":"4"}}},
            {"apiVersion":"apps/v1","kind":"ReplicaSet","metadata":{"name":"r"}}]}"#;
        let documents = decode_documents(text).unwrap();
        assert_eq!(documents.len(), 2);
        assert_eq!(documents[0].as_ref().unwrap().object.kind(), Kind::Node);
        let Object::ReplicaSet(rs) = &documents[1].as_ref().unwrap().object else { panic!() };
        assert_eq!(rs.spec.replicas, 1, "Kubernetes' default");
    }
}
