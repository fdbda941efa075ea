//! Fault injection for the lab's fault tests (`tests/tests/faults_cni.rs`), off unless its
//! environment variable is set; an unknown value stops the agent at startup.
//!
//! | variable | value | effect |
//! |---|---|---|
//! | [`PAUSE_ADD_ENV`] | `after-rules` | an enrolling ADD stops after the pod's rules are installed, before ztunnel is told |
//! | | `after-ack` | an enrolling ADD stops after ztunnel's ack and the state file, before the plugin gets its answer |
//! | [`ZDS_DROP_ENV`] | `n` | the first ZDS snapshot of more than `n` pods is cut after `n` ([`zmesh_core::zds::ServerOptions::fault_drop_mid_snapshot`]) |
//!
//! A paused ADD logs `fault injection: ADD paused at <point>` and never goes on (it holds
//! the enrolment lock): the test kills the agent there.

use std::sync::OnceLock;

use tracing::warn;

/// Pauses enrolling ADDs at a point.
pub const PAUSE_ADD_ENV: &str = "ZMESH_AGENT_FAULT_PAUSE_ADD";
/// Cuts the first large enough ZDS snapshot.
pub const ZDS_DROP_ENV: &str = "ZMESH_AGENT_FAULT_ZDS_DROP_AFTER";

/// Where an enrolling ADD can be paused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddPoint {
    /// Rules installed in the pod netns; ztunnel not told yet.
    AfterRules,
    /// ztunnel acknowledged the pod and the state file has it; no answer sent yet.
    AfterAck,
}

impl AddPoint {
    fn parse(s: &str) -> Option<AddPoint> {
        match s {
            "after-rules" => Some(AddPoint::AfterRules),
            "after-ack" => Some(AddPoint::AfterAck),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            AddPoint::AfterRules => "after-rules",
            AddPoint::AfterAck => "after-ack",
        }
    }
}

/// The faults asked for by the environment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// [`PAUSE_ADD_ENV`].
    pub pause_add: Option<AddPoint>,
    /// [`ZDS_DROP_ENV`].
    pub zds_drop_after: Option<usize>,
}

/// A fault variable with a value the agent does not know.
#[derive(Debug, thiserror::Error)]
#[error(
    "{var}={value:?} is not a fault the agent knows ({expected}); unset it outside fault tests"
)]
pub struct FaultError {
    var: &'static str,
    value: String,
    expected: &'static str,
}

static FAULTS: OnceLock<Faults> = OnceLock::new();

impl Faults {
    /// Reads the variables through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Faults, FaultError> {
        let pause_add = match lookup(PAUSE_ADD_ENV) {
            None => None,
            Some(v) => Some(AddPoint::parse(&v).ok_or(FaultError {
                var: PAUSE_ADD_ENV,
                expected: "after-rules or after-ack",
                value: v,
            })?),
        };
        let zds_drop_after = match lookup(ZDS_DROP_ENV) {
            None => None,
            Some(v) => Some(v.parse().map_err(|_| FaultError {
                var: ZDS_DROP_ENV,
                expected: "a number of pods",
                value: v,
            })?),
        };
        Ok(Faults {
            pause_add,
            zds_drop_after,
        })
    }

    /// Reads the process environment and makes the result the process-wide faults; logs
    /// a warning for each one that is on.
    pub fn install_from_env() -> Result<Faults, FaultError> {
        let faults = Faults::from_lookup(|k| std::env::var(k).ok())?;
        if faults != Faults::default() {
            warn!(
                ?faults,
                "fault injection is on: this agent is for fault tests only"
            );
        }
        Ok(*FAULTS.get_or_init(|| faults))
    }
}

/// Stops here forever if the installed faults pause ADDs at `point`.
pub async fn pause_add(point: AddPoint) {
    if FAULTS.get().and_then(|f| f.pause_add) == Some(point) {
        warn!("fault injection: ADD paused at {}", point.as_str());
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default_and_strict() {
        assert_eq!(Faults::from_lookup(|_| None).unwrap(), Faults::default());
        let on = Faults::from_lookup(|k| {
            Some(if k == PAUSE_ADD_ENV { "after-ack" } else { "2" }.to_owned())
        })
        .unwrap();
        assert_eq!(on.pause_add, Some(AddPoint::AfterAck));
        assert_eq!(on.zds_drop_after, Some(2));
        for (var, bad) in [(PAUSE_ADD_ENV, "later"), (ZDS_DROP_ENV, "-1")] {
            let err = Faults::from_lookup(|k| (k == var).then(|| bad.to_owned())).unwrap_err();
            assert!(err.to_string().contains(var), "{err}");
        }
    }
}
