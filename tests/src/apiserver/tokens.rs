//! `TokenReview` in the API-server double: the tokens a test registers, and the answers.

use std::collections::{BTreeMap, HashMap};

use http::{Response, StatusCode};
use serde_json::{Value, json};

use super::{Body, bad_request, full};

/// What the API server knows about a token (the `TokenReview` answer).
#[derive(Debug, Clone, Default)]
pub struct TokenInfo {
    /// `user.username`.
    pub username: String,
    /// `user.uid`.
    pub uid: String,
    /// `user.groups`.
    pub groups: Vec<String>,
    /// The token's audiences.
    pub audiences: Vec<String>,
    /// `user.extra`.
    pub extra: BTreeMap<String, Vec<String>>,
}

impl TokenInfo {
    /// A service account's token for `audiences`, bound to nothing.
    pub fn service_account(namespace: &str, name: &str, audiences: &[&str]) -> Self {
        TokenInfo {
            username: format!("system:serviceaccount:{namespace}:{name}"),
            uid: format!("uid-sa-{namespace}-{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            extra: BTreeMap::new(),
        }
    }

    /// Bound to a pod (`authentication.kubernetes.io/pod-name` and `pod-uid`).
    pub fn bound_to_pod(mut self, name: &str, uid: &str) -> Self {
        self.extra.insert(
            "authentication.kubernetes.io/pod-name".into(),
            vec![name.into()],
        );
        self.extra.insert(
            "authentication.kubernetes.io/pod-uid".into(),
            vec![uid.into()],
        );
        self
    }

    /// With the node of the pod (`authentication.kubernetes.io/node-name`).
    pub fn on_node(mut self, node: &str) -> Self {
        self.extra.insert(
            "authentication.kubernetes.io/node-name".into(),
            vec![node.into()],
        );
        self
    }
}

pub(super) fn token_review(tokens: &HashMap<String, TokenInfo>, body: &[u8]) -> Response<Body> {
    let Ok(review) = serde_json::from_slice::<Value>(body) else {
        return bad_request("the body is not a JSON TokenReview");
    };
    let token = review["spec"]["token"].as_str().unwrap_or("");
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let wanted = if wanted.is_empty() {
        vec!["https://kubernetes.default.svc.cluster.local".to_owned()]
    } else {
        wanted
    };
    let status = match tokens.get(token) {
        None => json!({"user": {}, "error": "[invalid bearer token, token lookup failed]"}),
        Some(info) => {
            let both: Vec<&String> = wanted
                .iter()
                .filter(|a| info.audiences.contains(a))
                .collect();
            if both.is_empty() {
                json!({"user": {}, "error": format!(
                    "[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]",
                    info.audiences, wanted)})
            } else {
                json!({
                    "authenticated": true,
                    "user": {"username": info.username, "uid": info.uid,
                             "groups": info.groups, "extra": info.extra},
                    "audiences": both,
                })
            }
        }
    };
    let answer = json!({
        "kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null}, "spec": review["spec"], "status": status,
    });
    full(StatusCode::CREATED, &answer)
}
