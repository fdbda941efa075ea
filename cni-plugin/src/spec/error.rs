//! Plugin errors and the CNI error result (SPEC.md §5 "Error").

use serde::Serialize;

use super::SUPPORTED_VERSIONS;

/// Everything that makes an invocation fail, each mapped to a CNI error code.
///
/// `Display` is the short `msg` of the error result; [`CniError::details`] the longer
/// `details`. Messages say what an operator should check.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// Code 1: the configuration declares a version we do not speak.
    #[error("incompatible CNI versions")]
    IncompatibleVersion {
        /// The declared `cniVersion` (`0.1.0` when absent).
        declared: String,
    },
    /// Code 1: the command does not exist at the declared version.
    #[error("config version does not allow {command}")]
    CommandNotAllowed {
        /// The command.
        command: &'static str,
        /// The declared version.
        version: &'static str,
    },
    /// Code 1 (SPEC.md §5 "Error": incompatible CNI version): `prevResult` declares a
    /// version we do not speak, or uses the layout before 0.3.0. It is never relabelled:
    /// a result we cannot read could carry anything.
    #[error(
        "prevResult declares cniVersion {declared}, which zmesh-cni cannot read; check the \
         output version of the plugin chained before zmesh-cni and the conflist's cniVersion"
    )]
    PrevResultVersion {
        /// The `cniVersion` declared inside `prevResult`.
        declared: String,
    },
    /// Code 4: required `CNI_*` variables are unset or empty.
    #[error("required env variables {vars:?} missing")]
    MissingEnv {
        /// The names of the missing variables.
        vars: Vec<&'static str>,
    },
    /// Code 4: `CNI_COMMAND` names no CNI operation.
    #[error("unknown CNI_COMMAND: {0}")]
    UnknownCommand(String),
    /// Code 4: a `CNI_*` variable is present but unusable.
    #[error("invalid {var}")]
    InvalidEnv {
        /// The variable's name.
        var: &'static str,
        /// Why it is unusable.
        reason: String,
    },
    /// Code 5: stdin could not be read.
    #[error("cannot read the network configuration from stdin")]
    Io(#[source] std::io::Error),
    /// Code 6: stdin (or a standard key in it) is not the JSON the spec defines.
    #[error("cannot decode {what}")]
    Decode {
        /// What failed to decode (`network configuration`, `prevResult`, ...).
        what: &'static str,
        /// The decoder's complaint.
        reason: String,
    },
    /// Code 7: our own configuration keys (or the chain) are wrong.
    #[error("invalid zmesh-cni configuration: {0}")]
    InvalidConfig(String),
    /// Code 11: the node agent cannot be reached; the runtime retries the ADD.
    #[error(
        "zmesh node agent is not reachable at {socket}; the pod cannot be enrolled yet and the container runtime will retry"
    )]
    AgentUnreachable {
        /// The configured `agent_socket`.
        socket: String,
        /// What went wrong (connect error, timeout, malformed answer).
        reason: String,
    },
    /// Code 11: the node agent answered that it cannot enrol the pod now.
    #[error(
        "zmesh node agent cannot enrol the pod now (HTTP {status}: {reason}); the container runtime will retry"
    )]
    AgentNotReady {
        /// The HTTP status the agent answered with.
        status: u16,
        /// The agent's `error` text, if any.
        reason: String,
    },
    /// Code 11: the node agent answered ADD with something the contract does not allow
    /// (a `200` whose body is not exactly `{"enrolled": bool}` as JSON, or an unexpected
    /// status), so enrolment is not confirmed and the pod must not start.
    #[error(
        "zmesh node agent at {socket} answered ADD with HTTP {status} and no valid \
         {{\"enrolled\": bool}}, so the pod's enrolment is not confirmed and it is not started; \
         check that the agent and zmesh-cni come from the same zmesh release and read the \
         agent's log; the container runtime will retry"
    )]
    AgentBadAnswer {
        /// The configured `agent_socket`.
        socket: String,
        /// The HTTP status of the answer.
        status: u16,
        /// What is wrong with the answer (bounded excerpt of the body).
        reason: String,
    },
    /// Code 7: the node agent refused the request as malformed.
    #[error("zmesh node agent rejected the request as invalid")]
    AgentRejected {
        /// The agent's `error` text.
        reason: String,
    },
    /// Code 50 (STATUS): the plugin cannot serve ADDs because the agent is not ready.
    #[error("zmesh node agent is not available at {socket}; pods cannot be enrolled on this node")]
    NotAvailable {
        /// The configured `agent_socket`.
        socket: String,
        /// What the readiness probe saw.
        reason: String,
    },
}

impl CniError {
    /// The CNI error code (SPEC.md §5: 0-99 reserved by the spec).
    pub fn code(&self) -> u32 {
        match self {
            Self::IncompatibleVersion { .. }
            | Self::CommandNotAllowed { .. }
            | Self::PrevResultVersion { .. } => 1,
            Self::MissingEnv { .. } | Self::UnknownCommand(_) | Self::InvalidEnv { .. } => 4,
            Self::Io(_) => 5,
            Self::Decode { .. } => 6,
            Self::InvalidConfig(_) | Self::AgentRejected { .. } => 7,
            Self::AgentUnreachable { .. }
            | Self::AgentNotReady { .. }
            | Self::AgentBadAnswer { .. } => 11,
            Self::NotAvailable { .. } => 50,
        }
    }

    /// The longer explanation for the `details` field of the error result.
    pub fn details(&self) -> String {
        match self {
            Self::IncompatibleVersion { declared } => {
                format!("config is {declared:?}, plugin supports {SUPPORTED_VERSIONS:?}")
            }
            Self::CommandNotAllowed { version, .. } => format!("config is {version:?}"),
            Self::PrevResultVersion { .. } => {
                format!("plugin reads results of versions {SUPPORTED_VERSIONS:?}")
            }
            Self::InvalidEnv { reason, .. }
            | Self::Decode { reason, .. }
            | Self::AgentUnreachable { reason, .. }
            | Self::AgentNotReady { reason, .. }
            | Self::AgentRejected { reason }
            | Self::AgentBadAnswer { reason, .. }
            | Self::NotAvailable { reason, .. } => reason.clone(),
            Self::Io(e) => e.to_string(),
            Self::MissingEnv { .. } | Self::UnknownCommand(_) | Self::InvalidConfig(_) => {
                String::new()
            }
        }
    }
}

/// The JSON a failing plugin prints on stdout (and exits non-zero).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorResult {
    /// The version the configuration declared (ours when it declared none).
    pub cni_version: String,
    /// The CNI error code.
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer explanation (may be empty).
    pub details: String,
}

impl ErrorResult {
    /// Builds the error result for `error`, labelled with `cni_version`.
    pub fn new(cni_version: &str, error: &CniError) -> Self {
        Self {
            cni_version: cni_version.to_owned(),
            code: error.code(),
            msg: error.to_string(),
            details: error.details(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_result_shape() {
        let e = CniError::AgentNotReady {
            status: 503,
            reason: "ztunnel not connected".into(),
        };
        let json = serde_json::to_value(ErrorResult::new("1.0.0", &e)).unwrap();
        assert_eq!(json["cniVersion"], "1.0.0");
        assert_eq!(json["code"], 11);
        assert_eq!(json["details"], "ztunnel not connected");
        assert!(json["msg"].as_str().unwrap().contains("will retry"));
        let e = CniError::IncompatibleVersion {
            declared: "9.9.9".into(),
        };
        assert!(e.details().contains("\"1.1.0\""));
        assert_eq!(
            CniError::MissingEnv {
                vars: vec!["CNI_NETNS"]
            }
            .to_string(),
            "required env variables [\"CNI_NETNS\"] missing"
        );
    }
}
