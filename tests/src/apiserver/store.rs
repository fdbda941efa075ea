//! The double's object store: applies, deletes, status patches, lists with selectors and
//! snapshots at a resourceVersion, watch events and bookmarks (`State`'s methods).

use super::*;

impl State {
    pub(super) fn type_of(&self, api_version: &str, kind: &str) -> Option<usize> {
        self.types
            .iter()
            .position(|t| t.api_version() == api_version && t.kind == kind)
    }

    pub(super) fn apply(&mut self, mut object: Value) -> Result<u64, ApplyError> {
        let api_version = object["apiVersion"].as_str().unwrap_or("").to_owned();
        let kind = object["kind"].as_str().unwrap_or("").to_owned();
        let ty = self
            .type_of(&api_version, &kind)
            .ok_or(ApplyError::UnknownType { api_version, kind })?;
        let name = object["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or(ApplyError::NoName)?
            .to_owned();
        let ns = if self.types[ty].namespaced {
            let ns = object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned();
            object["metadata"]["namespace"] = json!(ns);
            ns
        } else {
            if let Some(m) = object["metadata"].as_object_mut() {
                m.remove("namespace");
            }
            String::new()
        };
        let key = (ty, ns, name);
        let previous = self.objects.get(&key).cloned();
        let meta = &mut object["metadata"];
        match &previous {
            Some(p) => {
                for f in ["uid", "creationTimestamp", "resourceVersion", "generation"] {
                    meta[f] = p["metadata"][f].clone();
                }
                if object == *p {
                    return Ok(self.rv);
                }
                if object.get("spec") != p.get("spec") {
                    let g = p["metadata"]["generation"].as_u64().unwrap_or(1);
                    object["metadata"]["generation"] = json!(g + 1);
                }
            }
            None => {
                self.uids += 1;
                if meta.get("uid").is_none() {
                    meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.uids));
                }
                meta["creationTimestamp"] = json!(now_rfc3339());
                meta["generation"] = json!(1);
            }
        }
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.objects.insert(key.clone(), object.clone());
        if object["kind"] == "CustomResourceDefinition" {
            self.serve_crd(&object);
        }
        self.record(Change {
            rv: self.rv,
            key,
            object,
            previous,
            deleted: false,
        });
        Ok(self.rv)
    }

    pub(super) fn delete(
        &mut self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Option<u64> {
        let ty = self.type_of(api_version, kind)?;
        let ns = if self.types[ty].namespaced {
            namespace
        } else {
            ""
        };
        self.delete_key((ty, ns.to_owned(), name.to_owned()))
    }

    /// Deletes the object at `key`, then (as the garbage collector does, in the background
    /// on a real cluster) every object whose `ownerReferences` name it by uid.
    fn delete_key(&mut self, key: Key) -> Option<u64> {
        let previous = self.objects.remove(&key)?;
        let rv = self.record_delete(key, previous.clone());
        let uid = previous["metadata"]["uid"].clone();
        let dependents: Vec<Key> = self
            .objects
            .iter()
            .filter(|(_, o)| {
                o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| !uid.is_null() && r["uid"] == uid))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in dependents {
            self.delete_key(k);
        }
        Some(rv)
    }

    fn record_delete(&mut self, key: Key, previous: Value) -> u64 {
        self.rv += 1;
        let mut object = previous.clone();
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(Change {
            rv: self.rv,
            key,
            object,
            previous: Some(previous),
            deleted: true,
        });
        self.rv
    }

    pub(super) fn record(&mut self, change: Change) {
        self.watches.retain(|w| !w.tx.is_closed());
        for w in &self.watches {
            w.send_change(&change);
        }
        self.history.push_back(change);
    }

    pub(super) fn bookmark_object(&self, ty: usize) -> Value {
        let t = &self.types[ty];
        json!({"kind": t.kind, "apiVersion": t.api_version(),
               "metadata": {"resourceVersion": self.rv.to_string()}})
    }

    pub(super) fn bookmark(&mut self) {
        self.watches.retain(|w| !w.tx.is_closed());
        for w in self.watches.iter().filter(|w| w.bookmarks) {
            w.send("BOOKMARK", &self.bookmark_object(w.ty));
        }
    }

    pub(super) fn selectors(
        &self,
        ty: usize,
        query: &HashMap<String, String>,
    ) -> Result<(Vec<LabelReq>, Vec<FieldReq>), String> {
        let labels = parse_labels(query.get("labelSelector").map_or("", String::as_str))
            .map_err(|e| format!("unable to parse requirement: {e}"))?;
        let fields = parse_fields(
            &self.types[ty],
            query.get("fieldSelector").map_or("", String::as_str),
        )?;
        Ok((labels, fields))
    }

    /// The objects of type `ty` as they were at version `rv`, if the history reaches back.
    pub(super) fn snapshot(&self, ty: usize, rv: u64) -> Option<BTreeMap<Key, Value>> {
        if rv < self.compacted {
            return None;
        }
        let mut objects: BTreeMap<Key, Value> = self
            .objects
            .iter()
            .filter(|(k, _)| k.0 == ty)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for ch in self
            .history
            .iter()
            .rev()
            .filter(|c| c.rv > rv && c.key.0 == ty)
        {
            match &ch.previous {
                Some(p) => objects.insert(ch.key.clone(), p.clone()),
                None => objects.remove(&ch.key),
            };
        }
        Some(objects)
    }

    pub(super) fn list(
        &self,
        ty: usize,
        namespace: Option<&str>,
        query: &HashMap<String, String>,
    ) -> Response<Body> {
        let (labels, fields) = match self.selectors(ty, query) {
            Ok(s) => s,
            Err(e) => return bad_request(&e),
        };
        let t = &self.types[ty];
        // (snapshot version, list after this key)
        let (at, after) = match query.get("continue").filter(|c| !c.is_empty()) {
            Some(token) => match decode_continue(token) {
                Some(x) => x,
                None => return bad_request("invalid continue token"),
            },
            None => {
                let exact = query
                    .get("resourceVersionMatch")
                    .is_some_and(|m| m == "Exact");
                match query
                    .get("resourceVersion")
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    Some(rv) if exact => (rv, None),
                    _ => (self.rv, None),
                }
            }
        };
        let Some(objects) = self.snapshot(ty, at) else {
            let message = if query.contains_key("continue") {
                "The provided continue parameter is too old to display a consistent list \
                 result. You can start a new list without the continue parameter."
                    .to_owned()
            } else {
                format!("too old resource version: {at} ({})", self.compacted + 1)
            };
            let body = expired(&message);
            return full(StatusCode::GONE, &body);
        };
        let w = Watch {
            conn: 0,
            ty,
            namespace: namespace.map(str::to_owned),
            labels,
            fields,
            bookmarks: false,
            tx: mpsc::unbounded_channel().0,
        };
        let limit = query
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let mut more = false;
        for o in objects
            .iter()
            .filter(|(k, _)| after.as_ref().is_none_or(|a| (&k.1, &k.2) > (&a.0, &a.1)))
            .map(|(_, o)| o)
            .filter(|o| w.matches(o))
        {
            if items.len() == limit {
                more = true;
                break;
            }
            let mut item = o.clone();
            if t.builtin
                && let Some(m) = item.as_object_mut()
            {
                m.remove("kind");
                m.remove("apiVersion");
            }
            items.push(item);
        }
        // The token names the last item returned: the next page starts after it, on the
        // same snapshot.
        let more = more.then(|| items.last()).flatten().map(|last: &Value| {
            let ns = last["metadata"]["namespace"].as_str().unwrap_or("");
            let name = last["metadata"]["name"].as_str().unwrap_or("");
            encode_continue(at, ns, name)
        });
        let mut metadata = json!({"resourceVersion": at.to_string()});
        if let Some(c) = more {
            metadata["continue"] = json!(c);
        }
        let body = json!({
            "kind": format!("{}List", t.kind), "apiVersion": t.api_version(),
            "metadata": metadata, "items": items,
        });
        full(StatusCode::OK, &body)
    }

    pub(super) fn patch_status(
        &mut self,
        group: &str,
        version: &str,
        plural: &str,
        namespace: &str,
        name: &str,
        patch: &Value,
    ) -> Response<Body> {
        let Some(ty) = self
            .types
            .iter()
            .position(|t| t.group == group && t.version == version && t.plural == plural)
        else {
            return not_found();
        };
        let key = (ty, namespace.to_owned(), name.to_owned());
        let Some(mut object) = self.objects.get(&key).cloned() else {
            return self.get_one(ty, namespace, name);
        };
        let mut status = object.get("status").cloned().unwrap_or(Value::Null);
        merge_patch(&mut status, patch.get("status").unwrap_or(&Value::Null));
        object["status"] = status;
        match self.apply(object) {
            Ok(_) => self.get_one(ty, namespace, name),
            Err(e) => bad_request(&e.to_string()),
        }
    }

    pub(super) fn get_one(&self, ty: usize, namespace: &str, name: &str) -> Response<Body> {
        match self
            .objects
            .get(&(ty, namespace.to_owned(), name.to_owned()))
        {
            Some(o) => full(StatusCode::OK, o),
            None => {
                let t = &self.types[ty];
                status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{} {name:?} not found", t.plural),
                    json!({"name": name, "group": t.group, "kind": t.plural}),
                )
            }
        }
    }
}

/// JSON Merge Patch (RFC 7386): objects merge key by key, `null` deletes, anything else
/// replaces.
pub(super) fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(fields) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let map = target.as_object_mut().expect("made an object above");
    for (k, v) in fields {
        if v.is_null() {
            map.remove(k);
        } else {
            merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}
