//! The node agent's CNI installer: puts the `zmesh-cni` binary into the CNI bin dir and
//! chains our plugin entry into the primary CNI's config, then keeps it there.
//!
//! What a container runtime does, and so what we follow (reference `cni.md` §1.4):
//! it loads the **lexicographically first valid** file among `*.conflist`, `*.conf` and
//! `*.json` in the conf dir (`/etc/cni/net.d`). That file is the *primary*: chaining means
//! appending our object to its `plugins` array.
//!
//! | step | function |
//! |---|---|
//! | copy the plugin binary, atomically (temp + fsync + chmod 0755 + rename) | [`install_binary`] |
//! | find the file a runtime would pick | [`find_primary`], [`scan`] |
//! | append our entry (idempotent; wraps a bare `.conf` into a `.conflist`) | [`chain`] |
//! | remove only our entry, from every file that has it | [`unchain`] |
//! | readiness / repair check | [`is_chained`] |
//! | re-chain whenever the primary CNI rewrites its file | [`watch_and_repair`] |
//!
//! Every write is atomic (a temp file in the same directory whose name no runtime loads,
//! fsync, rename, fsync of the directory) and keeps the replaced file's mode, so a runtime
//! never reads a half-written config nor execs a half-written binary. Edits keep every key
//! of the file and of the other plugins, in their order (see [`json`]); the file is
//! re-indented with two spaces. A config that is a symlink is replaced by a regular file
//! (as Istio's installer does): the primary CNI's later edits to the link target no longer
//! show, and [`watch_and_repair`] does not see them either.
//!
//! Uninstalling leaves a `.conf` that [`chain`] wrapped as a `.conflist` holding just the
//! original plugin: runtimes load it exactly as they loaded the `.conf`.

mod conf;
pub mod json;
mod watch;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use self::conf::{
    ChainChange, Primary, PrimaryKind, Scan, chain, find_primary, is_chained, scan, unchain,
};
pub use self::watch::{RepairStats, WatchOptions, watch_and_repair};

/// The plugin's `type` in the conflist and its file name in the CNI bin dir.
pub const PLUGIN_TYPE: &str = "zmesh-cni";

/// Name given to a wrapped single-plugin config that had no `name`.
pub const DEFAULT_NETWORK_NAME: &str = "k8s-pod-network";

/// `cniVersion` given to a wrapped single-plugin config that had none.
pub const DEFAULT_CNI_VERSION: &str = "0.3.1";

/// Everything the installer can fail at, each naming the file and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file or directory could not be read.
    #[error("cannot read {path}: {source}; check that the host path is mounted and readable")]
    Read {
        /// What we tried to read.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A file could not be written, synced, renamed or removed.
    #[error(
        "cannot write {path}: {source}; check that the host path is mounted read-write, \
         has free space, and that the agent runs as root"
    )]
    Write {
        /// What we tried to write.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A config file does not parse as JSON.
    #[error("{path} is not valid JSON: {source}; fix or remove it")]
    InvalidJson {
        /// The file.
        path: PathBuf,
        /// Where parsing stopped.
        source: serde_json::Error,
    },
    /// A config file is JSON but not what its extension promises.
    #[error("{path} is not a CNI network config: {reason}; fix or remove it")]
    NotCniConfig {
        /// The file.
        path: PathBuf,
        /// What is missing or wrong.
        reason: String,
    },
    /// No valid config yet: the primary CNI has not written one.
    #[error(
        "no valid CNI network config in {dir} (*.conflist with `plugins`, *.conf or *.json with \
         `type`){skipped}; wait for the primary CNI (check its pods) or fix the files listed"
    )]
    NoPrimary {
        /// The conf dir.
        dir: PathBuf,
        /// Files skipped as invalid, already formatted (`; skipped: ...`), or empty.
        skipped: String,
    },
    /// The entry given to [`chain`] is not a `zmesh-cni` plugin object.
    #[error("the plugin entry must be a JSON object with \"type\": \"{PLUGIN_TYPE}\", got {0}")]
    BadEntry(String),
    /// A bare `.conf` cannot be wrapped into a `.conflist` without changing what runtimes load.
    #[error("cannot convert {from} into {to}: {reason}; rename or remove the conflicting file")]
    CannotWrap {
        /// The single-plugin file.
        from: PathBuf,
        /// The conflist name it would get.
        to: PathBuf,
        /// Why not.
        reason: String,
    },
    /// The conf dir cannot be watched.
    #[error(
        "cannot watch {dir}: {source}; check that it exists and the inotify limits \
         (fs.inotify.max_user_watches, max_user_instances)"
    )]
    Watch {
        /// The conf dir.
        dir: PathBuf,
        /// The watcher's error.
        source: notify::Error,
    },
}

/// Copies the plugin binary `src` into `bin_dir` as [`PLUGIN_TYPE`], atomically.
///
/// The new binary is written to a temp file in `bin_dir`, fsynced, made 0755 and renamed
/// over the old one: a runtime exec'ing the plugin meanwhile runs either the old or the new
/// file, never a partial one, and never gets "text file busy". Returns `false` (and only
/// fixes the mode) when the installed file already has the same content.
pub fn install_binary(src: &Path, bin_dir: &Path) -> Result<bool, InstallError> {
    let dest = bin_dir.join(PLUGIN_TYPE);
    let content = fs::read(src).map_err(|source| InstallError::Read {
        path: src.to_owned(),
        source,
    })?;
    let write_err = |source| InstallError::Write {
        path: dest.clone(),
        source,
    };
    if let Ok(existing) = fs::read(&dest)
        && existing == content
    {
        let mode = fs::metadata(&dest).map_err(write_err)?.mode() & 0o7777;
        if mode != 0o755 {
            fs::set_permissions(&dest, fs::Permissions::from_mode(0o755)).map_err(write_err)?;
        }
        return Ok(false);
    }
    write_atomic(&dest, &content, 0o755, None)?;
    Ok(true)
}

/// Writes `content` to `dest` atomically with permission bits `mode`; `owner` (uid, gid)
/// is applied when it differs from ours (best effort: needs root).
pub(crate) fn write_atomic(
    dest: &Path,
    content: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), InstallError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = dest.parent().unwrap_or(Path::new("."));
    let file_name = dest.file_name().unwrap_or_default().to_string_lossy();
    // A dot name ending in `.tmp`: no runtime loads it as a config or a plugin.
    let temp = dir.join(format!(
        ".{file_name}.{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        file.write_all(content)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = owner {
            let meta = file.metadata()?;
            if (meta.uid(), meta.gid()) != (uid, gid)
                && let Err(error) = std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
            {
                tracing::warn!(path = %dest.display(), %error, "cannot keep the file's owner");
            }
        }
        file.sync_all()?;
        fs::rename(&temp, dest)?;
        File::open(dir)?.sync_all()
    })();
    result.map_err(|source| {
        let _ = fs::remove_file(&temp);
        InstallError::Write {
            path: dest.to_owned(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a.conflist");
        write_atomic(&dest, b"{}\n", 0o600, None).unwrap();
        write_atomic(&dest, b"[]\n", 0o640, None).unwrap();
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["a.conflist"]);
        assert_eq!(fs::read(&dest).unwrap(), b"[]\n");
        assert_eq!(fs::metadata(&dest).unwrap().mode() & 0o7777, 0o640);
    }
}
