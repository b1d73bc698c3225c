//! Real-stack test harness: a loopback Distribution registry, a private containerd 1.6 with its own
//! config/root/state/sockets, busybox-static image fixtures, a CRI client over a unix socket, and the
//! pullgate binary in front of containerd.
//!
//! Include it from an integration test with `mod support;`. Everything a test starts lives under one
//! short temp dir (`/tmp/pg-<name>-<pid>-<n>`), listens only on 127.0.0.1 or unix sockets there, and is
//! torn down by `Drop` — also when the test panics: the processes the harness spawned are killed by PID
//! (SIGTERM, then SIGKILL), containerd's shims and their containers are killed, whatever is mounted
//! under the temp dir is lazily unmounted, and the dir is removed (kept with `PULLGATE_KEEP_TMP=1`).
//! On a panic the tails of every log are printed, so a CI failure shows containerd's and pullgate's view.
//!
//! Start stacks from the test's own thread (the body of a `#[tokio::test]`, not a spawned task): the
//! spawned daemons get `PR_SET_PDEATHSIG`, so they die with the thread that spawned them even when the
//! test binary is killed before `Drop` runs.
//!
//! Gate every end-to-end test with [`e2e_enabled`]: `PULLGATE_SKIP_E2E=1` skips loudly; otherwise
//! a missing prerequisite (root, a binary) fails the test with a message naming it.
#![allow(dead_code)]

pub mod cri;
pub mod distribution;
pub mod images;
pub mod node;
pub mod process;
pub mod pullgate;
pub mod stack;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

// Not every test binary uses every re-export.
#[allow(unused_imports)]
pub use cri::Cri;
#[allow(unused_imports)]
pub use images::ImageFactory;
#[allow(unused_imports)]
pub use pullgate::Pullgate;
#[allow(unused_imports)]
pub use stack::{Containerd, ContainerdOpts, Registry, Stack};

/// The external binaries the real stack needs, and the Debian package that ships each.
pub const E2E_BINARIES: &[(&str, &str)] = &[
    ("containerd", "containerd"),
    ("containerd-shim-runc-v2", "containerd"),
    ("runc", "runc"),
    ("docker-registry", "docker-registry"),
    ("skopeo", "skopeo"),
    ("umoci", "umoci"),
    ("busybox", "busybox-static"),
];

/// Writes straight to the process's stderr, bypassing libtest's output capture, so a notice shows up
/// even for a passing test.
pub fn loud(msg: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{msg}");
    let _ = err.flush();
}

/// Whether `PULLGATE_SKIP_E2E` asks to skip the end-to-end tests.
pub fn skip_requested() -> bool {
    matches!(
        std::env::var("PULLGATE_SKIP_E2E").as_deref().map(str::trim),
        Ok("1") | Ok("true") | Ok("yes")
    )
}

/// The gate of every end-to-end test. Returns `false` (after a loud notice) when the run opted out with
/// `PULLGATE_SKIP_E2E=1`; panics naming every missing prerequisite otherwise; `true` when all is there.
pub fn e2e_enabled(test: &str) -> bool {
    if skip_requested() {
        loud(&format!(
            "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
             !!! SKIPPED end-to-end test `{test}`: PULLGATE_SKIP_E2E is set.\n\
             !!! Nothing was checked against a real containerd.\n\
             !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
        ));
        return false;
    }
    let missing = missing_prerequisites();
    assert!(
        missing.is_empty(),
        "end-to-end test `{test}` cannot run; missing prerequisites:\n  - {}\n\
         Install them with `sudo scripts/install-deps.sh` and run as root, \
         or opt out explicitly with PULLGATE_SKIP_E2E=1.",
        missing.join("\n  - ")
    );
    true
}

/// Every missing prerequisite of the real stack, as human-readable lines (empty when all is there).
pub fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing
            .push("root: containerd, runc and mounts need euid 0 (run the tests as root)".into());
    }
    for (bin, package) in E2E_BINARIES {
        if which(bin).is_none() {
            missing.push(format!(
                "binary `{bin}` on PATH (Debian package `{package}`)"
            ));
        }
    }
    if let Some(busybox) = which("busybox") {
        if !images::is_static_elf(&busybox) {
            missing.push(format!(
                "a statically linked busybox ({} is dynamic; install Debian package `busybox-static`)",
                busybox.display()
            ));
        }
    }
    missing
}

/// Looks `name` up on PATH (plus the sbin dirs, where Debian puts runc).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/local/sbin", "/usr/sbin", "/sbin"]
                .iter()
                .map(PathBuf::from),
        )
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The temp root of one test: `/tmp/pg-<name>-<pid>-<n>` (short, because unix socket paths are
/// limited to 107 bytes). Dropping it unmounts anything still mounted below it and removes it.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let short: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(24)
            .collect();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = PathBuf::from(format!("/tmp/pg-{short}-{}-{n}", std::process::id()));
        if path.exists() {
            process::unmount_below(&path);
            let _ = std::fs::remove_dir_all(&path);
        }
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        process::unmount_below(&self.path);
        if std::env::var_os("PULLGATE_KEEP_TMP").is_some() {
            loud(&format!(
                "PULLGATE_KEEP_TMP: keeping {}",
                self.path.display()
            ));
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            loud(&format!(
                "warning: could not remove {}: {e}",
                self.path.display()
            ));
        }
    }
}

/// The last `lines` lines of a file (for failure messages).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("<cannot read: {e}>"));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
