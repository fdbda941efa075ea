//! Network namespaces for in-pod proxying: a socket created while a thread is inside a pod's
//! network namespace belongs to that namespace for the rest of its life, wherever it is used.
//! So ztunnel enters the pod's namespace only for the `socket()` call and returns at once; the
//! listeners and outbound connections then live in the pod (packets carry the pod's address).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, OnceLock};

use nix::sched::{CloneFlags, setns};

/// A network namespace held open by a file descriptor.
#[derive(Clone, Debug)]
pub struct Netns {
    fd: Arc<OwnedFd>,
    id: (u64, u64),
}

impl PartialEq for Netns {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for Netns {}

/// The namespace the process started in, which every thread returns to.
fn home() -> &'static io::Result<OwnedFd> {
    static HOME: OnceLock<io::Result<OwnedFd>> = OnceLock::new();
    HOME.get_or_init(|| File::open("/proc/self/ns/net").map(OwnedFd::from))
}

impl Netns {
    /// Takes ownership of a namespace fd (e.g. one received over ZDS).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let meta = File::from(fd.try_clone()?).metadata()?;
        Ok(Netns {
            fd: Arc::new(fd),
            id: (meta.dev(), meta.ino()),
        })
    }

    /// Opens a namespace by path (e.g. `/var/run/netns/<name>`).
    pub fn open(path: &std::path::Path) -> io::Result<Self> {
        Self::from_fd(File::open(path)?.into())
    }

    /// (device, inode): equal for two fds of the same namespace.
    pub fn id(&self) -> (u64, u64) {
        self.id
    }

    /// Runs `f` with the current thread inside this namespace, then returns the thread to the
    /// process's own. `f` must not block or await: the thread is a runtime worker.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let home = home()
            .as_ref()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open /proc/self/ns/net: {e}")))?;
        setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
            io::Error::other(format!(
                "cannot enter the pod's network namespace (needs CAP_SYS_ADMIN): {e}"
            ))
        })?;
        // Returns the thread home even if `f` panics. If that fails, the thread (a runtime
        // worker) would go on serving other pods from inside this one: stop the process.
        struct Home<'a>(&'a OwnedFd);
        impl Drop for Home<'_> {
            fn drop(&mut self) {
                if setns(self.0.as_fd(), CloneFlags::CLONE_NEWNET).is_err() {
                    eprintln!("fatal: cannot return to ztunnel's own network namespace");
                    std::process::abort();
                }
            }
        }
        let _home = Home(home);
        let out = f();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_namespace_same_id() {
        let a = Netns::open(std::path::Path::new("/proc/self/ns/net")).unwrap();
        let b = Netns::open(std::path::Path::new("/proc/thread-self/ns/net")).unwrap();
        assert_eq!(a, b);
        // Entering our own namespace and coming back works and runs the closure.
        assert_eq!(a.run(|| 7).unwrap_or(0), 7);
    }
}
