//! The plugin's log: one line per invocation appended to `log_file`, never stdout (that
//! is the result) and not stderr (runtimes surface it as a failure hint). When the file
//! cannot be opened, the plugin logs nothing rather than fail a pod.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::spec::{CniError, Command, DEFAULT_LOG_FILE, LogLevel};

/// What one invocation did, gathered while it runs.
#[derive(Debug, Default)]
pub struct Record {
    /// The command, once known.
    pub command: Option<Command>,
    /// `CNI_CONTAINERID`.
    pub container_id: Option<String>,
    /// `CNI_NETNS`.
    pub netns: Option<String>,
    /// `CNI_IFNAME`.
    pub ifname: Option<String>,
    /// `namespace/name` of the pod.
    pub pod: Option<String>,
    /// What happened, for the operator (`enrolled`, `skipped: ...`).
    pub outcome: String,
    /// Set when a problem was ignored (DEL with the agent down): logged at warn.
    pub warning: bool,
    /// Set for routine successes logged at debug only: STATUS, which CNI 1.1 runtimes
    /// call every few seconds and would otherwise grow the log without bound.
    pub routine: bool,
    /// Extra lines logged at debug (the agent exchange).
    pub debug: Vec<String>,
}

/// Where and how much to log.
#[derive(Debug)]
pub struct Logger {
    file: Option<File>,
    level: LogLevel,
}

impl Logger {
    /// A logger that writes nothing.
    pub fn disabled() -> Self {
        Self {
            file: None,
            level: LogLevel::Error,
        }
    }

    /// Opens the log target named by the stdin object, leniently (the configuration is
    /// validated later, and its errors are worth a log line too): `log_file` absent or
    /// not a string → the default file; `""` → no log; unknown `log_level` → info.
    /// Parent directories are created; any failure means no logging.
    pub fn from_stdin(map: &Map<String, Value>) -> Self {
        let path = match map.get("log_file") {
            Some(Value::String(p)) if p.is_empty() => return Self::disabled(),
            Some(Value::String(p)) => PathBuf::from(p),
            _ => PathBuf::from(DEFAULT_LOG_FILE),
        };
        let level = map
            .get("log_level")
            .and_then(Value::as_str)
            .and_then(LogLevel::parse)
            .unwrap_or(LogLevel::Info);
        if let Some(parent) = path.parent() {
            let _ = fs::create_dir_all(parent);
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .ok();
        Self { file, level }
    }

    /// Appends the invocation's line (and its debug lines at debug level).
    pub fn invocation(&mut self, record: &Record, error: Option<&CniError>, elapsed: Duration) {
        let level = match (error, record.warning, record.routine) {
            (Some(_), _, _) => LogLevel::Error,
            (None, true, _) => LogLevel::Warn,
            (None, false, true) => LogLevel::Debug,
            (None, false, false) => LogLevel::Info,
        };
        let mut text = String::new();
        if self.level >= LogLevel::Debug {
            for line in &record.debug {
                text.push_str(&line_prefix(LogLevel::Debug));
                let _ = writeln!(text, "{}", quote(line));
            }
        }
        if self.level >= level {
            text.push_str(&line_prefix(level));
            let command = record.command.map_or("-", Command::as_str);
            let _ = write!(text, "cmd={command}");
            field(&mut text, "container", record.container_id.as_deref());
            field(&mut text, "ifname", record.ifname.as_deref());
            field(&mut text, "netns", record.netns.as_deref());
            field(&mut text, "pod", record.pod.as_deref());
            match error {
                Some(e) => {
                    let _ = write!(text, " outcome=failed code={}", e.code());
                    field(&mut text, "error", Some(&e.to_string()));
                    let details = e.details();
                    field(
                        &mut text,
                        "details",
                        Some(details.as_str()).filter(|d| !d.is_empty()),
                    );
                }
                None => field(&mut text, "outcome", Some(&record.outcome)),
            }
            let _ = writeln!(text, " duration_ms={}", elapsed.as_millis());
        }
        if let Some(file) = &mut self.file
            && !text.is_empty()
        {
            // One write of whole lines: O_APPEND keeps concurrent plugins' lines apart.
            let _ = file.write_all(text.as_bytes());
        }
    }
}

fn line_prefix(level: LogLevel) -> String {
    format!(
        "{} {:5} zmesh-cni[{}] ",
        timestamp(SystemTime::now()),
        level.as_str(),
        std::process::id()
    )
}

fn field(text: &mut String, key: &str, value: Option<&str>) {
    if let Some(value) = value {
        let _ = write!(text, " {key}={}", quote(value));
    }
}

/// Leaves simple values bare, quotes the rest (logfmt style) and escapes control bytes.
fn quote(value: &str) -> String {
    let bare = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '=' && c != '\\');
    if bare {
        value.to_owned()
    } else {
        format!("{value:?}")
    }
}

/// RFC 3339 UTC with milliseconds, e.g. `2025-11-23T15:27:01.123Z`.
pub fn timestamp(now: SystemTime) -> String {
    humantime::format_rfc3339_millis(now.max(UNIX_EPOCH)).to_string()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_251_199_123); // leap year end of Feb
        assert_eq!(timestamp(t), "2024-02-29T23:59:59.123Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(timestamp(t), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("default/web-0"), "default/web-0");
        assert_eq!(quote("a b"), "\"a b\"");
        assert_eq!(quote(""), "\"\"");
        assert_eq!(quote("x\ny"), "\"x\\ny\"");
    }

    #[test]
    fn writes_one_line_per_invocation_at_the_configured_level() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/cni.log");
        let conf = json!({"log_file": path, "log_level": "warn"});
        let mut logger = Logger::from_stdin(conf.as_object().unwrap());
        let mut record = Record {
            command: Some(Command::Add),
            container_id: Some("c1".into()),
            pod: Some("default/web".into()),
            outcome: "enrolled".into(),
            debug: vec!["agent POST /v1/cni/add -> 200".into()],
            ..Record::default()
        };
        logger.invocation(&record, None, Duration::from_millis(3)); // info: filtered
        record.warning = true;
        record.command = Some(Command::Del);
        logger.invocation(&record, None, Duration::from_millis(4));
        let err = CniError::InvalidConfig("x".into());
        logger.invocation(&record, Some(&err), Duration::ZERO);
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains(" warn  zmesh-cni[") && lines[0].contains("cmd=DEL"));
        assert!(lines[0].contains("pod=default/web outcome=enrolled duration_ms=4"));
        assert!(lines[1].contains("error") && lines[1].contains("code=7"));
        // An unwritable target disables logging without failing.
        let conf = json!({"log_file": "/proc/definitely/not/here.log"});
        let mut logger = Logger::from_stdin(conf.as_object().unwrap());
        logger.invocation(&record, None, Duration::ZERO);
    }
}
