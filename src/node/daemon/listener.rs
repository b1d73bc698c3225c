//! The listening unix socket: create its directory, replace a stale socket (and only a socket),
//! apply mode and group, and remove it again when the daemon exits.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

use crate::node::config::SocketGroup;

/// Why the listening socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot create socket directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} exists and is not a socket; refusing to replace it (remove it or choose another server.listen)", path.display())]
    NotASocket { path: PathBuf },
    #[error("another process is serving on {}; stop it or choose another server.listen", path.display())]
    InUse { path: PathBuf },
    #[error("cannot remove stale socket {}: {source}", path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {}: {source}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set mode {mode:04o} on {}: {source}", path.display())]
    Chmod {
        path: PathBuf,
        mode: u32,
        #[source]
        source: io::Error,
    },
    #[error("socket group {group:?} does not exist on this host (server.socket_group)")]
    UnknownGroup { group: String },
    #[error("cannot give {} to group {gid}: {source}", path.display())]
    Chown {
        path: PathBuf,
        gid: u32,
        #[source]
        source: io::Error,
    },
}

/// A bound listening socket that removes its path when dropped.
pub struct SocketGuard {
    pub listener: UnixListener,
    path: PathBuf,
}

impl SocketGuard {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        // Only remove what is still a socket (and so most likely still ours).
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the listening socket at `path` with the given mode and group.
pub fn bind(
    path: &Path,
    mode: u32,
    group: Option<&SocketGroup>,
) -> Result<SocketGuard, ListenError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ListenError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // A live daemon still answers on it: do not steal its socket.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ListenError::InUse {
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path).map_err(|source| ListenError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(_) => {
            return Err(ListenError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| ListenError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    let guard = SocketGuard {
        listener,
        path: path.to_path_buf(),
    };
    if let Some(group) = group {
        let gid = resolve_group(group)?;
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|source| ListenError::Chown {
            path: path.to_path_buf(),
            gid,
            source,
        })?;
        if let Some(dir) = path.parent() {
            open_dir_to_group(dir, gid)?;
        }
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        ListenError::Chmod {
            path: path.to_path_buf(),
            mode,
            source,
        }
    })?;
    Ok(guard)
}

/// A socket group is useless if its members cannot traverse the socket's directory (systemd creates
/// `/run/pullgate` as 0750 root:root). When the directory is closed to others, hand it to the socket
/// group with traversal (`g+x`); a directory open to everyone (such as `/run`) is left alone.
fn open_dir_to_group(dir: &Path, gid: u32) -> Result<(), ListenError> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(dir) else {
        return Ok(());
    };
    if meta.mode() & 0o001 != 0 || meta.uid() != unsafe { libc::geteuid() } {
        return Ok(());
    }
    let chown_err = |source| ListenError::Chown {
        path: dir.to_path_buf(),
        gid,
        source,
    };
    std::os::unix::fs::chown(dir, None, Some(gid)).map_err(chown_err)?;
    let mode = (meta.mode() & 0o7777) | 0o010;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        ListenError::Chmod {
            path: dir.to_path_buf(),
            mode,
            source,
        }
    })
}

/// Looks a group name up in the host's group database (NSS), or takes a numeric gid as is.
pub fn resolve_group(group: &SocketGroup) -> Result<u32, ListenError> {
    match group {
        SocketGroup::Gid(gid) => Ok(*gid),
        SocketGroup::Name(name) => {
            let unknown = || ListenError::UnknownGroup {
                group: name.clone(),
            };
            let cname = std::ffi::CString::new(name.as_str()).map_err(|_| unknown())?;
            let mut grp: libc::group = unsafe { std::mem::zeroed() };
            let mut result: *mut libc::group = std::ptr::null_mut();
            let mut buf = vec![0 as libc::c_char; 16 * 1024];
            // SAFETY: getgrnam_r writes into grp/buf, which outlive the call; result is checked.
            let rc = unsafe {
                libc::getgrnam_r(
                    cname.as_ptr(),
                    &mut grp,
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut result,
                )
            };
            if rc != 0 || result.is_null() {
                return Err(unknown());
            }
            Ok(grp.gr_gid)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[tokio::test]
    async fn creates_dir_sets_mode_and_removes_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/pullgate/pg.sock");
        let guard = bind(&path, 0o660, Some(&SocketGroup::Gid(0))).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), 0);
        drop(guard);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn socket_group_can_traverse_a_closed_runtime_dir() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run-pullgate");
        std::fs::create_dir(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o750)).unwrap();
        let _g = bind(&run.join("pg.sock"), 0o660, Some(&SocketGroup::Gid(4242))).unwrap();
        let meta = std::fs::metadata(&run).unwrap();
        assert_eq!(meta.gid(), 4242);
        assert_eq!(meta.mode() & 0o777, 0o750);
        // Without a socket group the directory is not touched.
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o700)).unwrap();
        let _g = bind(&other.join("pg.sock"), 0o660, None).unwrap();
        assert_eq!(std::fs::metadata(&other).unwrap().mode() & 0o777, 0o700);
    }

    #[tokio::test]
    async fn replaces_only_stale_sockets() {
        let dir = tempfile::tempdir().unwrap();
        // A stale socket (nobody listening) is replaced.
        let path = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let g = bind(&path, 0o600, None).unwrap();
        // While it is live, a second bind refuses.
        let e = bind(&path, 0o600, None)
            .err()
            .expect("must refuse a live socket");
        assert!(matches!(e, ListenError::InUse { .. }), "{e}");
        drop(g);
        // A regular file is never removed.
        let file = dir.path().join("file.sock");
        std::fs::write(&file, b"precious").unwrap();
        let e = bind(&file, 0o600, None)
            .err()
            .expect("must refuse a regular file");
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    }

    #[test]
    fn groups_resolve_by_name_and_unknown_groups_are_errors() {
        assert_eq!(resolve_group(&SocketGroup::Name("root".into())).unwrap(), 0);
        assert_eq!(resolve_group(&SocketGroup::Gid(42)).unwrap(), 42);
        let e = resolve_group(&SocketGroup::Name("no-such-group-pullgate".into())).unwrap_err();
        assert!(e.to_string().contains("no-such-group-pullgate"));
    }
}
