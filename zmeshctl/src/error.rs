//! zmeshctl's errors: each says what to check or change.

/// Everything a zmeshctl command can fail with (a failed `check` is not an error: it is a
/// report with failed checks).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--hub` is not an image repository prefix.
    #[error(
        "--hub {0:?} is not an image repository prefix: give a registry and path such as \
         `ghcr.io/example/zmesh` (lower-case letters, digits, `.`, `_`, `-`, `/` and a \
         `:port` after the registry; no trailing `/`)"
    )]
    BadHub(String),
    /// `--tag` is not an image tag.
    #[error(
        "--tag {0:?} is not an image tag: use up to 128 letters, digits, `_`, `.` and `-`, \
         not starting with `.` or `-` (e.g. `0.1.0`)"
    )]
    BadTag(String),
    /// The embedded manifests could not be read (a build from a broken tree).
    #[error("the manifests built into zmeshctl are malformed ({0}); rebuild from a clean tree")]
    Embedded(String),
    /// No kubeconfig or in-cluster configuration.
    #[error(
        "no Kubernetes configuration: {0} (set KUBECONFIG or --kubeconfig, and --context to \
         pick a cluster)"
    )]
    Config(String),
    /// The Gateway API CRDs are missing, so the GatewayClass cannot be applied.
    #[error(
        "the cluster does not serve gateway.networking.k8s.io/v1 GatewayClass: install the \
         Gateway API CRDs first (manifests/README.md, step 1); nothing was applied"
    )]
    GatewayApiMissing,
    /// The namespace to enrol or unenrol does not exist.
    #[error("namespace {0:?} not found: check its name with `kubectl get namespaces`")]
    NamespaceNotFound(String),
    /// A namespace the node agent never captures.
    #[error(
        "namespace {0:?} cannot be enrolled: the node agent excludes kube-system and \
         istio-system (its --exclude-namespaces), so ztunnel's own pods start uncaptured"
    )]
    NamespaceExcluded(String),
    /// A port-forward to a pod failed or its answer was unusable.
    #[error(
        "port-forward to {target}: {reason} (check that the pod is running, \
         `kubectl -n istio-system get pods -o wide`, and that your credentials may create \
         pods/portforward)"
    )]
    Forward {
        /// `namespace/pod port N`.
        target: String,
        /// What went wrong.
        reason: String,
    },
    /// No ztunnel pod to read.
    #[error("{0}")]
    NoZtunnel(String),
    /// A waypoint name or option that Kubernetes would refuse.
    #[error("{0}")]
    BadWaypoint(String),
    /// `waypoint delete` of a Gateway that does not exist.
    #[error(
        "waypoint {namespace}/{name} not found: `zmeshctl waypoint list -n {namespace}` shows \
         the waypoints there"
    )]
    WaypointNotFound {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// An API request failed.
    #[error("{what}: {source} (check that the cluster is reachable and your credentials allow it)")]
    Api {
        /// What zmeshctl was doing.
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// An [`Error::Api`] for `what`.
    pub fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let what = what.into();
        move |source| Error::Api { what, source }
    }
}

/// Whether `e` is the API server's `404 Not Found`.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}
