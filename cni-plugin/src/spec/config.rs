//! The request configuration on stdin: the standard keys (SPEC.md §1, §3) and ours
//! (docs/CNI.md "Plugin configuration"). Unknown keys are ignored.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::CniError;

/// Default `agent_socket`.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/zmesh/agent.sock";
/// Default `log_file`.
pub const DEFAULT_LOG_FILE: &str = "/var/log/zmesh-cni.log";
/// Default `exclude_namespaces`.
pub const DEFAULT_EXCLUDE_NAMESPACES: [&str; 2] = ["kube-system", "istio-system"];

/// One entry of `cni.dev/valid-attachments` (GC).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Attachment {
    /// The container id of a live attachment.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Its interface name.
    pub ifname: String,
}

/// The decoded request configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// `cniVersion` as declared (absent means 0.1.0 to the negotiation).
    pub cni_version: Option<String>,
    /// `name`: the network's name.
    pub name: Option<String>,
    /// `type`: the plugin's binary name.
    pub plugin_type: Option<String>,
    /// `prevResult` as JSON (always an object when present).
    pub prev_result: Option<Map<String, Value>>,
    /// `runtimeConfig` as JSON (always an object when present).
    pub runtime_config: Option<Map<String, Value>>,
    /// `cni.dev/valid-attachments` (GC only).
    pub valid_attachments: Option<Vec<Attachment>>,
    /// Our own keys, validated, defaults filled in.
    pub plugin: PluginConfig,
}

/// Decodes stdin as a JSON object (code 6 when it is not one).
pub fn parse_object(stdin: &[u8]) -> Result<Map<String, Value>, CniError> {
    let decode = |reason: String| CniError::Decode {
        what: "the network configuration on stdin",
        reason,
    };
    match serde_json::from_slice::<Value>(stdin).map_err(|e| decode(e.to_string()))? {
        Value::Object(map) => Ok(map),
        other => Err(decode(format!(
            "expected a JSON object, got {}",
            kind(&other)
        ))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A standard key: absent and `null` are `None`; the wrong JSON type is a decode failure.
fn standard<'a, T>(
    map: &'a Map<String, Value>,
    key: &'static str,
    want: &'static str,
    get: impl Fn(&'a Value) -> Option<T>,
) -> Result<Option<T>, CniError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => get(v).map(Some).ok_or_else(|| CniError::Decode {
            what: key,
            reason: format!("expected {want}, got {}", kind(v)),
        }),
    }
}

/// The `cniVersion` declared by a decoded stdin object, if it is a string.
pub fn declared_version(map: &Map<String, Value>) -> Option<&str> {
    map.get("cniVersion").and_then(Value::as_str)
}

impl NetConf {
    /// Decodes stdin: code 6 for malformed JSON or a standard key of the wrong type,
    /// code 7 for a bad value in one of our keys.
    pub fn decode(stdin: &[u8]) -> Result<Self, CniError> {
        Self::from_object(&parse_object(stdin)?)
    }

    /// Decodes an already parsed stdin object (see [`NetConf::decode`]).
    pub fn from_object(map: &Map<String, Value>) -> Result<Self, CniError> {
        let string = |v: &Value| v.as_str().map(str::to_owned);
        let object = |v: &Value| v.as_object().cloned();
        let valid_attachments = match map.get("cni.dev/valid-attachments") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                Vec::<Attachment>::deserialize(v).map_err(|e| CniError::Decode {
                    what: "cni.dev/valid-attachments",
                    reason: e.to_string(),
                })?,
            ),
        };
        Ok(Self {
            cni_version: standard(map, "cniVersion", "a string", string)?,
            name: standard(map, "name", "a string", string)?,
            plugin_type: standard(map, "type", "a string", string)?,
            prev_result: standard(map, "prevResult", "an object", object)?,
            runtime_config: standard(map, "runtimeConfig", "an object", object)?,
            valid_attachments,
            plugin: PluginConfig::from_object(map)?,
        })
    }
}

/// How much the plugin writes to its log file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    /// Failures only.
    Error,
    /// Failures and ignored problems (e.g. DEL with the agent down).
    Warn,
    /// One line per invocation (default).
    Info,
    /// Also the agent exchanges.
    Debug,
}

impl LogLevel {
    /// Parses `error`, `warn`/`warning`, `info`, `debug` (any case).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "error" => Self::Error,
            "warn" | "warning" => Self::Warn,
            "info" => Self::Info,
            "debug" => Self::Debug,
            _ => return None,
        })
    }

    /// Lower-case name for log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
        }
    }
}

/// Our keys in the plugin's conflist entry (docs/CNI.md), with defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginConfig {
    /// The node agent's unix socket.
    pub agent_socket: PathBuf,
    /// Where to append the per-invocation log line; `None` (`"log_file": ""`) disables it.
    pub log_file: Option<PathBuf>,
    /// Log verbosity.
    pub log_level: LogLevel,
    /// Namespaces whose pods start without asking the agent.
    pub exclude_namespaces: Vec<String>,
}

impl Default for PluginConfig {
    fn default() -> Self {
        Self {
            agent_socket: PathBuf::from(DEFAULT_AGENT_SOCKET),
            log_file: Some(PathBuf::from(DEFAULT_LOG_FILE)),
            log_level: LogLevel::Info,
            exclude_namespaces: DEFAULT_EXCLUDE_NAMESPACES.map(str::to_owned).to_vec(),
        }
    }
}

impl PluginConfig {
    /// Reads our keys out of the stdin object (`null` means the default); code 7 on a
    /// wrong type or value.
    pub fn from_object(map: &Map<String, Value>) -> Result<Self, CniError> {
        fn key<T: for<'de> Deserialize<'de>>(
            map: &Map<String, Value>,
            key: &str,
            want: &str,
        ) -> Result<Option<T>, CniError> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => T::deserialize(v)
                    .map(Some)
                    .map_err(|_| CniError::InvalidConfig(format!("{key} must be {want}"))),
            }
        }
        let mut config = Self::default();
        if let Some(socket) = key::<String>(map, "agent_socket", "a socket path")? {
            if socket.is_empty() {
                return Err(CniError::InvalidConfig("agent_socket is empty".into()));
            }
            config.agent_socket = PathBuf::from(socket);
        }
        if let Some(file) = key::<String>(map, "log_file", "a file path")? {
            config.log_file = (!file.is_empty()).then(|| PathBuf::from(file));
        }
        if let Some(level) = key::<String>(map, "log_level", "a string")? {
            config.log_level = LogLevel::parse(&level).ok_or_else(|| {
                CniError::InvalidConfig(format!(
                    "log_level {level:?} is not one of error, warn, info, debug"
                ))
            })?;
        }
        if let Some(namespaces) =
            key::<Vec<String>>(map, "exclude_namespaces", "an array of namespace names")?
        {
            config.exclude_namespaces = namespaces;
        }
        Ok(config)
    }

    /// Whether pods of `namespace` skip the agent.
    pub fn is_excluded(&self, namespace: &str) -> bool {
        self.exclude_namespaces.iter().any(|n| n == namespace)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn decode(v: Value) -> Result<NetConf, CniError> {
        NetConf::decode(v.to_string().as_bytes())
    }

    #[test]
    fn defaults_and_unknown_keys() {
        let c = decode(
            json!({"cniVersion": "1.0.0", "name": "k8s", "type": "zmesh-cni",
            "someoneElses": {"x": 1}, "args": {"cni": {}}}),
        )
        .unwrap();
        assert_eq!(c.cni_version.as_deref(), Some("1.0.0"));
        assert_eq!(c.plugin, PluginConfig::default());
        assert!(c.plugin.is_excluded("kube-system") && !c.plugin.is_excluded("default"));
    }

    #[test]
    fn our_keys() {
        let c = decode(json!({"cniVersion": "1.1.0", "agent_socket": "/tmp/a.sock",
            "log_file": "", "log_level": "DEBUG", "exclude_namespaces": ["infra"]}))
        .unwrap();
        assert_eq!(c.plugin.agent_socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(c.plugin.log_file, None);
        assert_eq!(c.plugin.log_level, LogLevel::Debug);
        assert_eq!(c.plugin.exclude_namespaces, vec!["infra".to_owned()]);
        for bad in [
            json!({"exclude_namespaces": "kube-system"}),
            json!({"log_level": "loud"}),
            json!({"agent_socket": 5}),
            json!({"agent_socket": ""}),
        ] {
            assert_eq!(decode(bad).unwrap_err().code(), 7);
        }
    }

    #[test]
    fn standard_keys_are_typed() {
        assert_eq!(NetConf::decode(b"{").unwrap_err().code(), 6);
        assert_eq!(NetConf::decode(b"[]").unwrap_err().code(), 6);
        assert_eq!(NetConf::decode(b"").unwrap_err().code(), 6);
        for bad in [
            json!({"cniVersion": 1}),
            json!({"prevResult": []}),
            json!({"runtimeConfig": "x"}),
            json!({"cni.dev/valid-attachments": [{"containerID": 1}]}),
        ] {
            assert_eq!(decode(bad).unwrap_err().code(), 6);
        }
        let c = decode(json!({"cniVersion": "1.1.0", "prevResult": null,
            "cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}]}))
        .unwrap();
        assert_eq!(c.prev_result, None);
        assert_eq!(c.valid_attachments.unwrap().len(), 1);
    }
}
