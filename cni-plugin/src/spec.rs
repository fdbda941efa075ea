//! The CNI specification (1.1.0) as far as a chained plugin needs it: the commands, the
//! versions we speak, the `CNI_*` environment, the request configuration on stdin, the
//! previous plugin's result and its conversion between result versions, and the error
//! result.
//!
//! # Why our own types and not `rscni-plugin`/`rscni-types`
//!
//! `rscni-plugin` 0.5 / `rscni-types` 0.2 were evaluated (source read from crates.io).
//! They are careful about the environment matrix, the version floors of CHECK/GC/STATUS
//! and the 0.4.0 ↔ 1.x result layouts, and we mirror those rules here. We do not use
//! them because, for a plugin whose main job is to echo `prevResult` faithfully:
//!
//! - `prevResult` is decoded into fixed structs without extra-field capture on
//!   interfaces, ips, routes and dns, so anything a primary plugin adds beyond the
//!   spec's fields is silently dropped from the result we hand back to the runtime;
//!   we keep the result as JSON and touch only the keys a version conversion changes.
//! - the error result is always labelled with the plugin's own version instead of the
//!   `cniVersion` the configuration supplied (SPEC.md §5 "same value as provided");
//! - the VERSION answer always carries the plugin's version, while we echo the
//!   requested one when we support it (what a runtime asking `{"cniVersion":X}` expects);
//! - `CNI_ARGS` is handed over as a raw string, so the Kubernetes keys and the
//!   `IgnoreUnknown` rule would be ours to write anyway.
//!
//! Fixing those means replacing the result types, the error output and VERSION, i.e.
//! most of what the crates do; the remaining few hundred lines are simpler to own.
//!
//! Rules taken from the reference implementation (`containernetworking/cni` `skel`):
//! CHECK needs a configuration version ≥ 0.4.0, GC and STATUS ≥ 1.1.0 (code 1 below
//! that); an absent `cniVersion` means 0.1.0; the version check is plain membership in
//! [`SUPPORTED_VERSIONS`]; 0.1.0 and 0.2.0 (the `ip4`/`ip6` result layout) are not
//! supported.

mod config;
mod env;
mod error;
mod result;

use std::fmt;

use serde::Serialize;

pub use config::{
    Attachment, DEFAULT_AGENT_SOCKET, DEFAULT_EXCLUDE_NAMESPACES, DEFAULT_LOG_FILE, LogLevel,
    NetConf, PluginConfig, declared_version, parse_object,
};
pub use env::{
    CNI_ARGS, CNI_COMMAND, CNI_CONTAINERID, CNI_IFNAME, CNI_NETNS, CNI_PATH, CniArgs, CniEnv,
    PodRef,
};
pub use error::{CniError, ErrorResult};
pub use result::PrevResult;

/// Every CNI specification version this plugin can be asked to speak, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A CNI specification version this plugin supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    /// 0.3.0: first version with the `ips`/`interfaces` result layout.
    V0_3_0,
    /// 0.3.1: same result layout as 0.3.0.
    V0_3_1,
    /// 0.4.0: adds CHECK; same result layout as 0.3.x.
    V0_4_0,
    /// 1.0.0: drops `ips[].version`.
    V1_0_0,
    /// 1.1.0: adds GC and STATUS, and `mtu`/`socketPath`/`pciID` on interfaces.
    V1_1_0,
}

impl CniVersion {
    /// The newest version we speak: what VERSION answers when asked for nothing else.
    pub const LATEST: Self = Self::V1_1_0;

    /// All supported versions, oldest first (same order as [`SUPPORTED_VERSIONS`]).
    pub const ALL: [Self; 5] = [
        Self::V0_3_0,
        Self::V0_3_1,
        Self::V0_4_0,
        Self::V1_0_0,
        Self::V1_1_0,
    ];

    /// Looks a declared version up by exact string, like the reference reconciler.
    pub fn from_declared(declared: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == declared)
    }

    /// The canonical string, as written in results.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_3_0 => "0.3.0",
            Self::V0_3_1 => "0.3.1",
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }

    /// Whether results of this version use the 0.3.x/0.4.0 layout (`ips[].version`).
    pub fn is_legacy(self) -> bool {
        self < Self::V1_0_0
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The operation a runtime asks for in `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Attach the container (for us: ask the node agent to enrol the pod).
    Add,
    /// Detach the container; best-effort and idempotent.
    Del,
    /// Verify that the attachment is still as expected.
    Check,
    /// Report the supported versions.
    Version,
    /// Report whether the plugin can serve ADDs (1.1.0).
    Status,
    /// Clean up resources of attachments the runtime no longer knows (1.1.0).
    Gc,
}

impl Command {
    /// Parses the value of `CNI_COMMAND` (exact, upper case, as the spec spells them).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            _ => return None,
        })
    }

    /// The spelling used in `CNI_COMMAND` and in our log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Version => "VERSION",
            Self::Status => "STATUS",
            Self::Gc => "GC",
        }
    }

    /// The first configuration version in which this command exists, if it has a floor.
    pub fn min_version(self) -> Option<CniVersion> {
        match self {
            Self::Check => Some(CniVersion::V0_4_0),
            Self::Status | Self::Gc => Some(CniVersion::V1_1_0),
            Self::Add | Self::Del | Self::Version => None,
        }
    }

    /// Checks the version declared by the configuration against the supported set and
    /// this command's floor; returns the version to answer in.
    pub fn negotiate(self, declared: Option<&str>) -> Result<CniVersion, CniError> {
        // No `cniVersion` at all means 0.1.0, which predates everything we speak.
        let declared = declared.filter(|d| !d.is_empty()).unwrap_or("0.1.0");
        let version =
            CniVersion::from_declared(declared).ok_or_else(|| CniError::IncompatibleVersion {
                declared: declared.to_owned(),
            })?;
        match self.min_version() {
            Some(floor) if version < floor => Err(CniError::CommandNotAllowed {
                command: self.as_str(),
                version: version.as_str(),
            }),
            _ => Ok(version),
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer to VERSION: `{"cniVersion", "supportedVersions"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    /// The version the runtime asked in when we support it, else [`CniVersion::LATEST`].
    pub cni_version: &'static str,
    /// [`SUPPORTED_VERSIONS`].
    pub supported_versions: Vec<&'static str>,
}

impl VersionInfo {
    /// Builds the answer to a VERSION request whose stdin declared `requested`.
    pub fn answering(requested: Option<&str>) -> Self {
        let version = requested
            .and_then(CniVersion::from_declared)
            .unwrap_or(CniVersion::LATEST);
        Self {
            cni_version: version.as_str(),
            supported_versions: SUPPORTED_VERSIONS.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_round_trip_and_order() {
        for (v, s) in CniVersion::ALL.iter().zip(SUPPORTED_VERSIONS) {
            assert_eq!(v.as_str(), s);
            assert_eq!(CniVersion::from_declared(s), Some(*v));
        }
        assert!(CniVersion::V0_4_0.is_legacy());
        assert!(!CniVersion::V1_0_0.is_legacy());
        for bad in ["0.1.0", "0.2.0", "9.9.9", "1.0", "", "v1.0.0"] {
            assert_eq!(CniVersion::from_declared(bad), None, "{bad}");
        }
    }

    #[test]
    fn negotiation_applies_floors_and_membership() {
        assert_eq!(
            Command::Add.negotiate(Some("0.3.1")).ok(),
            Some(CniVersion::V0_3_1)
        );
        assert_eq!(Command::Add.negotiate(None).unwrap_err().code(), 1);
        assert_eq!(Command::Add.negotiate(Some("9.9.9")).unwrap_err().code(), 1);
        assert_eq!(
            Command::Check.negotiate(Some("0.3.1")).unwrap_err().code(),
            1
        );
        assert!(Command::Check.negotiate(Some("0.4.0")).is_ok());
        assert_eq!(
            Command::Status.negotiate(Some("1.0.0")).unwrap_err().code(),
            1
        );
        assert_eq!(Command::Gc.negotiate(Some("1.0.0")).unwrap_err().code(), 1);
        assert!(Command::Gc.negotiate(Some("1.1.0")).is_ok());
        assert!(Command::Del.negotiate(Some("0.3.0")).is_ok());
    }

    #[test]
    fn version_info_echoes_supported_requests_only() {
        assert_eq!(VersionInfo::answering(Some("0.4.0")).cni_version, "0.4.0");
        assert_eq!(VersionInfo::answering(Some("9.9.9")).cni_version, "1.1.0");
        assert_eq!(VersionInfo::answering(None).cni_version, "1.1.0");
        for c in ["ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC"] {
            assert_eq!(Command::parse(c).map(Command::as_str), Some(c));
        }
        assert_eq!(Command::parse("add"), None);
    }
}
