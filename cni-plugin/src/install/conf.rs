//! Finding the primary CNI config and editing our entry in and out of it.
//!
//! Validity follows libcni by extension, as runtimes load files: a `.conflist` must be a JSON
//! object whose `plugins` is a non-empty array of objects; a `.conf` or `.json` must be a JSON
//! object with a non-empty string `type`. Other files, directories and our own temp files
//! (`.*.tmp`) are ignored. Names sort bytewise, as Go's `sort.Strings` does.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::json::{Json, Object};
use super::{DEFAULT_CNI_VERSION, DEFAULT_NETWORK_NAME, InstallError, PLUGIN_TYPE, write_atomic};

/// How a config file declares its plugins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryKind {
    /// A `.conflist`: `{"cniVersion", "name", "plugins": [...]}`.
    List,
    /// A legacy single-plugin `.conf` or `.json`.
    Single,
}

/// A valid network config file, parsed.
#[derive(Debug, Clone)]
pub struct Primary {
    /// The file.
    pub path: PathBuf,
    /// List or single plugin.
    pub kind: PrimaryKind,
    /// Its top-level object, keys in file order.
    pub doc: Object,
    /// Permission bits, kept on rewrite.
    mode: u32,
    /// Owner (uid, gid), kept on rewrite when we can.
    owner: (u32, u32),
}

impl Primary {
    /// Whether the file is a list whose `plugins` holds a `zmesh-cni` entry.
    pub fn has_entry(&self) -> bool {
        self.kind == PrimaryKind::List && plugins(&self.doc).is_some_and(|p| p.iter().any(is_ours))
    }
}

/// Every config file of a conf dir, as a runtime sees them.
#[derive(Debug, Default)]
pub struct Scan {
    /// Valid files in load order: the first is the primary.
    pub valid: Vec<Primary>,
    /// Files with a config extension that a runtime would skip, and why.
    pub skipped: Vec<InstallError>,
}

impl Scan {
    /// The file a runtime loads, if any.
    pub fn primary(&self) -> Option<&Primary> {
        self.valid.first()
    }

    fn no_primary(&self, dir: &Path) -> InstallError {
        let skipped = if self.skipped.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = self.skipped.iter().map(ToString::to_string).collect();
            format!("; skipped: {}", list.join(" | "))
        };
        InstallError::NoPrimary {
            dir: dir.to_owned(),
            skipped,
        }
    }
}

/// What [`chain`] did, for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainChange {
    /// The primary already ends with exactly our entry: nothing written.
    Unchanged {
        /// The primary.
        path: PathBuf,
    },
    /// Our entry was appended to the primary's `plugins`.
    Appended {
        /// The primary.
        path: PathBuf,
        /// Stale `zmesh-cni` entries removed first (0 on a fresh install).
        replaced: usize,
    },
    /// A single-plugin file was converted to a conflist ending with our entry.
    Wrapped {
        /// The removed `.conf`/`.json`.
        from: PathBuf,
        /// The new `.conflist`.
        to: PathBuf,
    },
}

/// Reads every config file in `conf_dir` and sorts them into valid (load order) and skipped.
pub fn scan(conf_dir: &Path) -> Result<Scan, InstallError> {
    let read_err = |source| InstallError::Read {
        path: conf_dir.to_owned(),
        source,
    };
    let mut names = Vec::new();
    for entry in fs::read_dir(conf_dir).map_err(read_err)? {
        let name = entry.map_err(read_err)?.file_name();
        let path = Path::new(&name);
        let config_ext = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("conflist" | "conf" | "json")
        );
        if config_ext {
            names.push(name);
        }
    }
    names.sort();
    let mut scan = Scan::default();
    for name in names {
        let path = conf_dir.join(name);
        match load(&path) {
            Ok(Some(primary)) => scan.valid.push(primary),
            Ok(None) => {}
            Err(error) => scan.skipped.push(error),
        }
    }
    Ok(scan)
}

/// The file a runtime would load from `conf_dir`, or `None` while there is none.
pub fn find_primary(conf_dir: &Path) -> Result<Option<Primary>, InstallError> {
    Ok(scan(conf_dir)?.valid.into_iter().next())
}

/// Whether the file a runtime would load holds our entry.
pub fn is_chained(conf_dir: &Path) -> bool {
    matches!(find_primary(conf_dir), Ok(Some(p)) if p.has_entry())
}

/// Appends `entry` (our plugin object; any `cniVersion` in it is dropped) to the primary's
/// `plugins`, after removing every previous `zmesh-cni` entry. Idempotent: a second call with
/// the same entry writes nothing. A single-plugin `.conf`/`.json` is rewritten as
/// `<stem>.conflist` (`{cniVersion, name, plugins: [original, entry]}`) and removed.
pub fn chain(conf_dir: &Path, entry: Value) -> Result<ChainChange, InstallError> {
    let entry = prepare_entry(entry)?;
    let scan = scan(conf_dir)?;
    let Some(primary) = scan.primary() else {
        return Err(scan.no_primary(conf_dir));
    };
    match primary.kind {
        PrimaryKind::List => append(primary, entry),
        PrimaryKind::Single => wrap(&scan, primary, entry),
    }
}

/// Removes our entry from every config file in `conf_dir` that has one, leaving all else
/// as it was. Returns the files rewritten. A `.conflist` that [`chain`] made from a `.conf`
/// stays a `.conflist` holding the original plugin.
pub fn unchain(conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let scan = scan(conf_dir)?;
    let mut changed = Vec::new();
    for file in scan.valid.iter().filter(|p| p.has_entry()) {
        let mut doc = file.doc.clone();
        if let Some(Json::Array(list)) = doc.get_mut("plugins") {
            list.retain(|p| !is_ours(p));
        }
        write_doc(file, &file.path, &doc)?;
        changed.push(file.path.clone());
    }
    Ok(changed)
}

fn append(primary: &Primary, entry: Object) -> Result<ChainChange, InstallError> {
    let mut doc = primary.doc.clone();
    let Some(Json::Array(list)) = doc.get_mut("plugins") else {
        // `load` only accepts lists with a `plugins` array.
        return Err(not_config(&primary.path, "no `plugins` array"));
    };
    let before = list.len();
    list.retain(|p| !is_ours(p));
    let replaced = before - list.len();
    list.push(Json::Object(entry));
    if doc == primary.doc {
        return Ok(ChainChange::Unchanged {
            path: primary.path.clone(),
        });
    }
    write_doc(primary, &primary.path, &doc)?;
    Ok(ChainChange::Appended {
        path: primary.path.clone(),
        replaced,
    })
}

fn wrap(scan: &Scan, primary: &Primary, entry: Object) -> Result<ChainChange, InstallError> {
    let from = primary.path.clone();
    let stem = from.file_stem().unwrap_or_default().to_string_lossy();
    let to = from.with_file_name(format!("{stem}.conflist"));
    let cannot = |reason: String| InstallError::CannotWrap {
        from: from.clone(),
        to: to.clone(),
        reason,
    };
    // The new name must be what runtimes load once `from` is gone: nothing valid may sort
    // between the two names (everything valid already sorts after `from`).
    if let Some(other) = scan.valid.iter().find(|p| p.path > from && p.path < to) {
        let reason = format!(
            "{} sorts between them and would be loaded",
            other.path.display()
        );
        return Err(cannot(reason));
    }
    if to.exists() {
        // Only our own earlier wrap (interrupted before removing `from`) may be replaced.
        let ours = scan.valid.iter().any(|p| p.path == to && p.has_entry());
        if !ours {
            return Err(cannot("the target already exists".to_owned()));
        }
    }
    let doc = &primary.doc;
    let mut list = Object::default();
    let version = match doc.get("cniVersion") {
        Some(Json::String(v)) => v.clone(),
        _ => DEFAULT_CNI_VERSION.to_owned(),
    };
    list.insert("cniVersion", Json::String(version));
    let name = doc.get_str("name").unwrap_or(DEFAULT_NETWORK_NAME);
    list.insert("name", Json::String(name.to_owned()));
    let original = Json::Object(doc.clone());
    let mut plugins = Vec::new();
    if !is_ours(&original) {
        plugins.push(original);
    }
    plugins.push(Json::Object(entry));
    list.insert("plugins", Json::Array(plugins));
    write_doc(primary, &to, &list)?;
    fs::remove_file(&from).map_err(|source| InstallError::Write {
        path: from.clone(),
        source,
    })?;
    Ok(ChainChange::Wrapped { from, to })
}

/// Reads and validates one config file; `None` if it vanished meanwhile.
fn load(path: &Path) -> Result<Option<Primary>, InstallError> {
    let meta = match fs::metadata(path) {
        Ok(meta) if meta.is_file() => meta,
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(InstallError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(InstallError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let doc = Json::from_slice(&bytes).map_err(|source| InstallError::InvalidJson {
        path: path.to_owned(),
        source,
    })?;
    let Json::Object(doc) = doc else {
        let reason = format!("the top level is {}, not an object", doc.kind());
        return Err(not_config(path, &reason));
    };
    let kind = if path.extension().is_some_and(|e| e == "conflist") {
        check_list(path, &doc)?;
        PrimaryKind::List
    } else {
        if doc.get_str("type").is_none_or(str::is_empty) {
            return Err(not_config(path, "no `type` string naming its plugin"));
        }
        PrimaryKind::Single
    };
    Ok(Some(Primary {
        path: path.to_owned(),
        kind,
        doc,
        mode: meta.mode() & 0o7777,
        owner: (meta.uid(), meta.gid()),
    }))
}

fn check_list(path: &Path, doc: &Object) -> Result<(), InstallError> {
    match doc.get("plugins") {
        None => Err(not_config(path, "no `plugins` list")),
        Some(Json::Array(list)) if list.is_empty() => Err(not_config(path, "`plugins` is empty")),
        Some(Json::Array(list)) => match list.iter().position(|p| p.as_object().is_none()) {
            Some(i) => {
                let reason = format!("plugins[{i}] is {}, not an object", list[i].kind());
                Err(not_config(path, &reason))
            }
            None => Ok(()),
        },
        Some(other) => {
            let reason = format!("`plugins` is {}, not an array", other.kind());
            Err(not_config(path, &reason))
        }
    }
}

fn prepare_entry(entry: Value) -> Result<Object, InstallError> {
    let Json::Object(mut object) = Json::from(entry) else {
        return Err(InstallError::BadEntry("a non-object".to_owned()));
    };
    match object.remove("type") {
        Some(Json::String(t)) if t == PLUGIN_TYPE => {}
        Some(other) => {
            let got = serde_json::to_string(&other).unwrap_or_default();
            return Err(InstallError::BadEntry(format!("\"type\": {got}")));
        }
        None => return Err(InstallError::BadEntry("no \"type\"".to_owned())),
    }
    object.remove("cniVersion");
    // `type` first, for whoever reads the file; the other keys in the given order.
    let mut ordered = Object::default();
    ordered.insert("type", Json::String(PLUGIN_TYPE.to_owned()));
    for (k, v) in object.iter() {
        ordered.insert(k, v.clone());
    }
    Ok(ordered)
}

fn plugins(doc: &Object) -> Option<&Vec<Json>> {
    match doc.get("plugins") {
        Some(Json::Array(list)) => Some(list),
        _ => None,
    }
}

fn is_ours(plugin: &Json) -> bool {
    plugin
        .as_object()
        .is_some_and(|p| p.get_str("type") == Some(PLUGIN_TYPE))
}

fn not_config(path: &Path, reason: &str) -> InstallError {
    InstallError::NotCniConfig {
        path: path.to_owned(),
        reason: reason.to_owned(),
    }
}

fn write_doc(like: &Primary, dest: &Path, doc: &Object) -> Result<(), InstallError> {
    let bytes = Json::Object(doc.clone()).to_pretty_bytes();
    write_atomic(dest, &bytes, like.mode, Some(like.owner))
}
