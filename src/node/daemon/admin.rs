//! Commands that act on an installed node: `pullgate status` (asks the running daemon over its
//! loopback endpoint) and `pullgate bundle install` (verifies and installs into the state directory,
//! then tells the daemon with SIGHUP).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::exit::{EXIT_CONFIG, EXIT_FAILURE};
use crate::node::config::Config;
use crate::node::enforce::store::BundleStore;
use crate::policy::load;

/// Where the daemon writes its PID: next to its socket.
pub fn pid_file(config: &Config) -> PathBuf {
    config
        .server
        .listen
        .parent()
        .unwrap_or(Path::new("/run/pullgate"))
        .join("pullgate.pid")
}

/// A minimal HTTP/1.0 GET against the loopback endpoint.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_string()))
}

fn daemon_status(config: &Config) -> Result<serde_json::Value, String> {
    let addr = config
        .metrics
        .listen
        .ok_or("the daemon's endpoint is off ([metrics] listen = \"off\"); turn it on to use pullgate status")?;
    let (code, body) = http_get(addr, "/status")
        .map_err(|e| format!("cannot reach the pullgate daemon at {addr}: {e} (is it running?)"))?;
    if code != 200 {
        return Err(format!("the daemon at {addr} answered HTTP {code}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("the daemon at {addr} sent invalid JSON: {e}"))
}

/// `pullgate status`.
pub fn status_command(config_path: &Path, json: bool) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pullgate: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let s = match daemon_status(&config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pullgate status: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    if json {
        println!("{s}");
        return ExitCode::SUCCESS;
    }
    println!("mode:      {}", s["mode"].as_str().unwrap_or("?"));
    match s["bundle"].as_object() {
        Some(b) => {
            println!(
                "bundle:    v{} issued by {} at {}",
                b["version"],
                b["issuer"].as_str().unwrap_or("?"),
                b["issued_at"].as_str().unwrap_or("?")
            );
            println!(
                "expires:   {}{}",
                b["expires_at"].as_str().unwrap_or("?"),
                if b["expired"].as_bool() == Some(true) {
                    "  (EXPIRED)"
                } else {
                    ""
                }
            );
            println!(
                "images:    {} entries, {} repositories",
                b["images"], b["repositories"]
            );
            println!("signed by: {}", b["signers"]);
        }
        None => println!(
            "bundle:    NONE ({}) — {}",
            s["bundle_problem"].as_str().unwrap_or("unknown"),
            if s["mode"] == "warn" {
                "warn mode: pulls and container starts go through unchecked and are audited as would-be denials"
            } else {
                "pulls and container starts are refused"
            }
        ),
    }
    println!(
        "upstream:  {} ({})",
        s["upstream"]["socket"].as_str().unwrap_or("?"),
        if s["upstream"]["connected"].as_bool() == Some(true) {
            "connected"
        } else {
            "not connected"
        }
    );
    let d = &s["decisions"];
    println!(
        "decisions: allow {}  deny {}  warn {}",
        d["allow"].as_u64().unwrap_or(0),
        d["deny"].as_u64().unwrap_or(0),
        d["warn"].as_u64().unwrap_or(0)
    );
    if let Some(p) = s["sandbox_image_problem"].as_str() {
        println!("sandbox:   PROBLEM: {p}");
    }
    let w = &s["lockdown"]["watcher"];
    if w.is_object() {
        let i = &w["images"];
        println!(
            "watcher:   {}; images approved {}  out-of-band {}  unapproved {}; {} event gap(s)",
            if w["connected"] == true {
                "subscribed to containerd's events"
            } else {
                "NOT subscribed"
            },
            i["approved"].as_u64().unwrap_or(0),
            i["out_of_band"].as_u64().unwrap_or(0),
            i["unapproved"].as_u64().unwrap_or(0),
            w["event_gaps"].as_u64().unwrap_or(0)
        );
    }
    if let Some(n) = s["lockdown"]["check"]["findings"].as_u64() {
        println!(
            "lockdown:  {n} finding(s) at {} (pullgate node check shows them)",
            s["lockdown"]["check"]["checked_at"].as_str().unwrap_or("?")
        );
    }
    print_lifecycle_status(&s);
    println!("audit log: {}", s["audit_log"].as_str().unwrap_or("?"));
    ExitCode::SUCCESS
}

/// The exceptions and lifecycle starts of `pullgate status`.
fn print_lifecycle_status(s: &serde_json::Value) {
    let list = |v: &serde_json::Value| v.as_array().cloned().unwrap_or_default();
    let active = list(&s["exceptions"]["active"]);
    let soon = list(&s["exceptions"]["expiring_soon"]);
    if !active.is_empty() {
        println!(
            "exceptions: {} active, {} expiring within {} days",
            active.len(),
            soon.len(),
            s["exceptions"]["expiring_soon_days"]
        );
        for e in &active {
            let expiring = soon.iter().any(|x| x == e);
            println!(
                "  {}{}@{} for {} until {} (ticket {}, approved by {})",
                if expiring { "EXPIRING SOON: " } else { "" },
                e["source"].as_str().unwrap_or("?"),
                e["digest"].as_str().unwrap_or("?"),
                e["scope"].as_str().unwrap_or("?"),
                e["expires_at"].as_str().unwrap_or("?"),
                e["ticket"].as_str().unwrap_or("?"),
                e["approved_by"].as_str().unwrap_or("?"),
            );
        }
    }
    let starts = list(&s["lifecycle_starts"]);
    if !starts.is_empty() {
        println!("started in the last 24h, deprecated, with a sunset ahead, or by exception:");
        for x in &starts {
            let mut notes = Vec::new();
            if let Some(t) = x["sunset_at"].as_str() {
                notes.push(format!("sunset {t}"));
            }
            if let Some(r) = x["replacement"].as_str() {
                notes.push(format!("replacement {r}"));
            }
            if let Some(t) = x["exception_ticket"].as_str() {
                notes.push(format!(
                    "exception {t} until {}",
                    x["exception_expires_at"].as_str().unwrap_or("?")
                ));
            }
            println!(
                "  {} [{}] in {}: {} start(s), last {}; {}",
                x["image"].as_str().unwrap_or("?"),
                x["reason"].as_str().unwrap_or("?"),
                x["scope"].as_str().unwrap_or("?"),
                x["starts"],
                x["last_start"].as_str().unwrap_or("?"),
                notes.join(", ")
            );
        }
    }
}

/// `pullgate bundle install FILE`: verify, install atomically, tell the daemon, confirm.
pub fn install_command(config_path: &Path, bundle: &Path, signatures: Option<&Path>) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pullgate: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let fail = |msg: String| {
        eprintln!("pullgate bundle install: {msg}");
        ExitCode::from(EXIT_FAILURE)
    };
    let trust = match load::read_trust(&config.policy.trust) {
        Ok(t) => t,
        Err(e) => return fail(e.to_string()),
    };
    let bytes = match load::read_bundle(bundle, config.policy.max_bundle_size) {
        Ok(b) => b,
        Err(e) => return fail(format!("rejected, nothing changed: {e}")),
    };
    let sig_path = signatures
        .map(Path::to_path_buf)
        .unwrap_or_else(|| load::signature_path(bundle));
    let sigs = match load::read("signature file", &sig_path) {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    let store = BundleStore::new(&config.policy.state_dir)
        .with_max_bundle_size(config.policy.max_bundle_size);
    let installed = match store.install(
        &bytes,
        &sigs,
        &trust,
        time::OffsetDateTime::now_utc(),
        bundle,
    ) {
        Ok(b) => b,
        Err(e) => return fail(format!("rejected, nothing changed: {e}")),
    };
    println!(
        "installed bundle v{} ({} images, expires {}) into {}",
        installed.version,
        installed.images().len(),
        installed.expires_at_string(),
        store.dir().display()
    );
    // Tell the running daemon, and wait until it reports the new version.
    let pid = std::fs::read_to_string(pid_file(&config))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok());
    let Some(pid) = pid.filter(|p| unsafe { libc::kill(*p, 0) } == 0) else {
        println!(
            "no running daemon found; it will enforce v{} when it starts",
            installed.version
        );
        return ExitCode::SUCCESS;
    };
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(s) = daemon_status(&config) {
            if s["bundle"]["version"].as_u64() == Some(installed.version) {
                println!("the daemon (pid {pid}) now enforces v{}", installed.version);
                return ExitCode::SUCCESS;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    fail(format!(
        "installed, but the daemon (pid {pid}) did not report v{} within 10s; check its log",
        installed.version
    ))
}
