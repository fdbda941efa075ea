//! The double's writes over HTTP, as the real API server answers them: `PATCH` of one object
//! as server-side apply (`application/apply-patch+yaml`, `fieldManager` required) or JSON
//! merge patch (`application/merge-patch+json`), `DELETE` of one object, `GET /version`, and
//! a CustomResourceDefinition starting to serve its kind once stored.
//!
//! `POST` of one object to its collection creates it (`201`, or `409 AlreadyExists`). A
//! Service created over HTTP (`POST`, or an apply that creates it) without a cluster IP gets
//! one. An apply that creates its object needs RBAC's `create` as well as `patch`, as on the
//! real server (`rbac.rs`).
//!
//! Simplified: server-side apply merges the applied configuration into the stored object key
//! by key (lists replaced whole) and records the manager in `managedFields`, but keeps no
//! per-field ownership, so it never removes fields a manager stopped applying and never
//! reports a conflict (`409` without `force`: `force` is accepted and changes nothing);
//! `status` in an applied or patched object is ignored (the main resource does not write it);
//! `DELETE` removes at once (no finalizers), and with it, at once, the objects whose
//! `ownerReferences` name it by uid (the garbage collector's background deletion; no
//! `blockOwnerDeletion`, no orphaning). No discovery (`/api`, `/apis`): nothing zmesh calls
//! needs it (typed and `ApiResource` requests).

use http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::parse::now_rfc3339;
use super::store::merge_patch;
use super::{Body, ResourceType, State, bad_request, full, status};

/// `GET /version`, as `kubectl version` reads it.
pub(super) fn version(st: &State) -> http::Response<Body> {
    let (major, minor) = st
        .version
        .clone()
        .unwrap_or_else(|| ("1".to_owned(), "34".to_owned()));
    let git = format!("v{major}.{}.0", minor.trim_end_matches('+'));
    let body = json!({
        "major": major, "minor": minor, "gitVersion": git,
        "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24.0", "compiler": "gc",
        "platform": "linux/amd64",
    });
    full(StatusCode::OK, &body)
}

fn unsupported(content_type: &str) -> http::Response<Body> {
    status(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UnsupportedMediaType",
        &format!(
            "the body of the request was in an unknown format - accepted media types include: application/apply-patch+yaml, application/merge-patch+json (got {content_type:?})"
        ),
        json!({}),
    )
}

impl State {
    /// `PATCH` of the object `name` of type `ty`.
    pub(super) fn patch(
        &mut self,
        ty: usize,
        namespace: &str,
        name: &str,
        headers: &HeaderMap,
        query: &std::collections::HashMap<String, String>,
        body: &[u8],
    ) -> http::Response<Body> {
        let content_type = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_owned();
        let key = (ty, namespace.to_owned(), name.to_owned());
        let existing = self.objects.get(&key).cloned();
        let t = self.types[ty].clone();
        let mut object = match content_type.as_str() {
            "application/apply-patch+yaml" => {
                let Some(manager) = query.get("fieldManager").filter(|m| !m.is_empty()) else {
                    return bad_request("PATCH /: fieldManager is required for apply requests");
                };
                let Ok(mut applied) = serde_yaml::from_slice::<Value>(body) else {
                    return bad_request("error decoding YAML: the apply patch is not an object");
                };
                if let Err(e) = check_identity(&t, namespace, name, &applied) {
                    return bad_request(&e);
                }
                if let Some(m) = applied.as_object_mut() {
                    m.remove("status");
                }
                let mut object = existing.clone().unwrap_or_else(|| json!({}));
                merge_patch(&mut object, &applied);
                if existing.is_none() {
                    self.allocate_cluster_ip(&mut object);
                }
                // A no-op apply changes nothing, not even the manager's time.
                let unchanged = existing
                    .as_ref()
                    .is_some_and(|e| e == &object && has_manager(e, manager, "Apply"));
                if !unchanged {
                    set_manager(&mut object, manager, "Apply", &t.api_version());
                }
                object
            }
            "application/merge-patch+json" => {
                let Some(mut object) = existing.clone() else {
                    return self.get_one(ty, namespace, name);
                };
                let Ok(mut patch) = serde_json::from_slice::<Value>(body) else {
                    return bad_request("the merge patch is not JSON");
                };
                if let Some(m) = patch.as_object_mut() {
                    m.remove("status");
                }
                merge_patch(&mut object, &patch);
                object
            }
            other => return unsupported(other),
        };
        if t.namespaced {
            object["metadata"]["namespace"] = json!(namespace);
        }
        if let Some(prev) = &existing {
            object["status"] = prev.get("status").cloned().unwrap_or(Value::Null);
            if object["status"].is_null()
                && let Some(m) = object.as_object_mut()
            {
                m.remove("status");
            }
        }
        match self.apply(object) {
            Ok(_) => self.get_one(ty, namespace, name),
            Err(e) => bad_request(&e.to_string()),
        }
    }

    /// `POST` of a new object to the collection of type `ty`: `201` with the stored object,
    /// `409 AlreadyExists`, or `400` when the body does not name this type, the URL's
    /// namespace and a name (`generateName` is not done).
    pub(super) fn create(
        &mut self,
        ty: usize,
        namespace: &str,
        body: &[u8],
    ) -> http::Response<Body> {
        let t = self.types[ty].clone();
        let Ok(mut object) = serde_json::from_slice::<Value>(body) else {
            return bad_request("the body is not a JSON object");
        };
        let Some(name) = object["metadata"]["name"].as_str().map(str::to_owned) else {
            return bad_request(
                "metadata.name: Required value (the double does not generate names)",
            );
        };
        if let Err(e) = check_identity(&t, namespace, &name, &object) {
            return bad_request(&e);
        }
        let key = (ty, namespace.to_owned(), name.clone());
        if self.objects.contains_key(&key) {
            let qualified = if t.group.is_empty() {
                t.plural.clone()
            } else {
                format!("{}.{}", t.plural, t.group)
            };
            return status(
                StatusCode::CONFLICT,
                "AlreadyExists",
                &format!("{qualified} {name:?} already exists"),
                json!({"name": name, "group": t.group, "kind": t.plural}),
            );
        }
        if let Some(m) = object.as_object_mut() {
            m.remove("status");
        }
        if t.namespaced {
            object["metadata"]["namespace"] = json!(namespace);
        }
        self.allocate_cluster_ip(&mut object);
        match self.apply(object) {
            Ok(_) => {
                let stored = self.objects.get(&key).cloned().unwrap_or_default();
                full(StatusCode::CREATED, &stored)
            }
            Err(e) => bad_request(&e.to_string()),
        }
    }

    /// A new Service without `spec.clusterIP` gets one, as the real server's allocator gives
    /// it (from `10.96.128.0/17` here, never one already in use; not for `ExternalName`).
    /// Only objects created over HTTP: the tests' [`super::ApiServer::apply`] stores what it
    /// is given.
    fn allocate_cluster_ip(&mut self, object: &mut Value) {
        if object["kind"] != "Service"
            || object["spec"]["type"] == "ExternalName"
            || object["spec"]["clusterIP"]
                .as_str()
                .is_some_and(|ip| !ip.is_empty())
        {
            return;
        }
        let in_use: std::collections::HashSet<String> = self
            .objects
            .values()
            .filter_map(|o| o["spec"]["clusterIP"].as_str().map(str::to_owned))
            .collect();
        let ip = loop {
            self.next_ip += 1;
            let n = self.next_ip;
            let ip = format!("10.96.{}.{}", 128 + (n / 254) % 128, 1 + n % 254);
            if !in_use.contains(&ip) {
                break ip;
            }
        };
        object["spec"]["clusterIP"] = json!(ip);
        object["spec"]["clusterIPs"] = json!([ip]);
    }

    /// Whether the object a single-object URL names exists (`None` for any other URL).
    pub(super) fn exists_at(&self, path: &str) -> Option<bool> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version, rest) = match segments.as_slice() {
            ["api", version, rest @ ..] => ("", *version, rest),
            ["apis", group, version, rest @ ..] => (*group, *version, rest),
            _ => return None,
        };
        let (ns, plural, name) = match rest {
            ["namespaces", ns, plural, name] => (*ns, *plural, *name),
            [plural, name] => ("", *plural, *name),
            _ => return None,
        };
        let ty = self
            .types
            .iter()
            .position(|t| t.group == group && t.version == version && t.plural == plural)?;
        Some(
            self.objects
                .contains_key(&(ty, ns.to_owned(), name.to_owned())),
        )
    }

    /// `DELETE` of the object `name` of type `ty`: its last state, or `404`.
    pub(super) fn delete_one(
        &mut self,
        ty: usize,
        namespace: &str,
        name: &str,
    ) -> http::Response<Body> {
        let key = (ty, namespace.to_owned(), name.to_owned());
        let Some(object) = self.objects.get(&key).cloned() else {
            return self.get_one(ty, namespace, name);
        };
        let t = &self.types[ty];
        let (api_version, kind) = (t.api_version(), t.kind.clone());
        self.delete(&api_version, &kind, namespace, name);
        full(StatusCode::OK, &object)
    }

    /// A stored CustomResourceDefinition serves its versions from now on.
    pub(super) fn serve_crd(&mut self, crd: &Value) {
        let spec = &crd["spec"];
        let (Some(group), Some(kind), Some(plural)) = (
            spec["group"].as_str(),
            spec["names"]["kind"].as_str(),
            spec["names"]["plural"].as_str(),
        ) else {
            return;
        };
        let namespaced = spec["scope"].as_str() != Some("Cluster");
        for v in spec["versions"].as_array().into_iter().flatten() {
            let (Some(version), true) = (v["name"].as_str(), v["served"] == json!(true)) else {
                continue;
            };
            let mut ty = ResourceType::new(group, version, kind, plural, namespaced);
            ty.builtin = false;
            if !self.types.contains(&ty) {
                self.types.push(ty);
            }
        }
    }
}

/// The applied object names the URL's type, name and namespace, as the real server demands.
fn check_identity(t: &ResourceType, namespace: &str, name: &str, o: &Value) -> Result<(), String> {
    if o["apiVersion"].as_str() != Some(&t.api_version()) || o["kind"].as_str() != Some(&t.kind) {
        return Err(format!(
            "the apply patch's apiVersion/kind ({}, {}) is not {} {}",
            o["apiVersion"],
            o["kind"],
            t.api_version(),
            t.kind
        ));
    }
    if o["metadata"]["name"].as_str() != Some(name) {
        return Err("the name of the object does not match the name on the URL".into());
    }
    match o["metadata"]["namespace"].as_str() {
        Some(ns) if t.namespaced && ns != namespace => Err(
            "the namespace of the provided object does not match the namespace sent on the request"
                .into(),
        ),
        _ => Ok(()),
    }
}

fn has_manager(object: &Value, manager: &str, operation: &str) -> bool {
    object["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| e["manager"] == json!(manager) && e["operation"] == json!(operation))
}

/// Records `manager`'s `operation` in `metadata.managedFields` (one entry per manager and
/// operation, as the real server keeps them; without the field set).
fn set_manager(object: &mut Value, manager: &str, operation: &str, api_version: &str) {
    let entry = json!({
        "manager": manager, "operation": operation, "apiVersion": api_version,
        "time": now_rfc3339(), "fieldsType": "FieldsV1", "fieldsV1": {},
    });
    let fields = &mut object["metadata"]["managedFields"];
    if !fields.is_array() {
        *fields = json!([]);
    }
    let list = fields.as_array_mut().expect("made an array above");
    list.retain(|e| !(e["manager"] == json!(manager) && e["operation"] == json!(operation)));
    list.push(entry);
}
