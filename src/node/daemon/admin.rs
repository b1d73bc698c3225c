//! Commands that act on an installed node: `pullgate status` and `pullgate bundle install`.
//!
//! Both speak to the running daemon through its admin API (`admin.socket`, [`crate::node::api`]):
//! `status` asks for the status object, `install` hands the bundle over and gets the daemon's own
//! answer (installed version, or the rejection reason). When no daemon listens on the socket (or
//! `admin.socket = "off"`), they fall back to what works without the API: `status` reads the
//! loopback `/status` endpoint, `install` verifies and installs into the state directory itself
//! (the daemon takes it up at start, or at once through SIGHUP if it runs with the API off). A
//! caller the socket refuses gets an error, never the fallback.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::exit::{EXIT_CONFIG, EXIT_FAILURE};
use crate::node::api::{AdminClient, ApiError, pb};
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

/// A minimal HTTP/1.0 GET against the loopback endpoint: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
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

/// A current-thread runtime for one admin API exchange.
pub fn client_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// The daemon's status object: through the admin API, or (no daemon on the socket, or the API off)
/// from the loopback endpoint.
fn daemon_status(config: &Config) -> Result<serde_json::Value, String> {
    if let Some(socket) = &config.admin.socket {
        let asked = client_runtime()?.block_on(async {
            let mut c = AdminClient::connect(socket).await?;
            c.status().await
        });
        match asked {
            Ok(r) => {
                return serde_json::from_str(&r.json)
                    .map_err(|e| format!("the daemon sent an invalid status object: {e}"));
            }
            Err(ApiError::NotRunning { .. }) if config.metrics.listen.is_some() => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    http_status(config)
}

fn http_status(config: &Config) -> Result<serde_json::Value, String> {
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
    print_sync_status(&s["sync"]);
    println!("audit log: {}", s["audit_log"].as_str().unwrap_or("?"));
    ExitCode::SUCCESS
}

/// The registry sync part of `pullgate status`.
fn print_sync_status(y: &serde_json::Value) {
    for line in sync_status_lines(y) {
        println!("{line}");
    }
}

/// The lines of the registry sync part of `pullgate status`, from the `sync` object of `/status`.
fn sync_status_lines(y: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    if !y.is_object() {
        return out;
    }
    let t = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    out.push(format!(
        "sync:      {} from {}; last success {}, next round {}",
        t(&y["state"]).to_uppercase(),
        t(&y["source"]),
        y["last_success_at"].as_str().unwrap_or("never"),
        t(&y["next_round_at"]),
    ));
    if let Some(synced) = y["synced"].as_object() {
        out.push(format!(
            "           in step with {} (v{})",
            t(&synced["digest"]),
            synced["version"]
        ));
    }
    if let Some(p) = y["position"].as_u64() {
        out.push(format!(
            "           this node's rollout position: {p} of 0..99 (waves take nodes below their percent)"
       ));
    }
    if let Some(p) = y["pending"].as_object() {
        let what = if p["downloaded"] == false {
            "announced (not downloaded yet), downloaded"
        } else {
            "verified, taken up"
        };
        out.push(format!(
            "           PENDING v{}: {what} when this node's wave opens at {} (step {}, {}% of nodes; position {})",
            p["version"],
            t(&p["wave_opens_at"]),
            p["wave_step"],
            p["wave_percent"],
            p["position"]
       ));
    }
    if y["stale"] == true {
        out.push(format!(
            "           STALE: no round has succeeded for longer than {}s — this node's bundle is frozen",
            y["max_staleness_seconds"]
       ));
    }
    if let Some(e) = y["last_error"].as_object() {
        out.push(format!(
            "           last error ({}, {} in a row): {}",
            t(&e["reason"]),
            y["consecutive_failures"],
            t(&e["message"])
        ));
    }
    for r in y["rejected"].as_array().into_iter().flatten() {
        out.push(format!(
            "           rejected {} ({}), not downloaded again before {}",
            t(&r["digest"]),
            t(&r["reason"]),
            t(&r["retry_after"])
        ));
    }
    out
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
    if let Some(socket) = &config.admin.socket {
        let runtime = match client_runtime() {
            Ok(r) => r,
            Err(e) => return fail(e),
        };
        let answer = runtime.block_on(async {
            let mut c = AdminClient::connect(socket).await?;
            c.install_bundle(bytes.clone(), sigs.clone()).await
        });
        match answer {
            Ok(r) => return print_install_answer(r, bundle),
            // No daemon: install into the state directory (below); it is read at start.
            Err(ApiError::NotRunning { .. }) => {}
            Err(e) => return fail(e.to_string()),
        }
    }
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

/// What the daemon answered to `InstallBundle`.
fn print_install_answer(r: pb::InstallBundleResponse, bundle: &Path) -> ExitCode {
    match r.result {
        Some(pb::install_bundle_response::Result::Installed(i)) => {
            println!(
                "installed bundle v{} ({} images, expires {}); the daemon now enforces v{}",
                i.version, i.images, i.expires_at, i.version
            );
            ExitCode::SUCCESS
        }
        Some(pb::install_bundle_response::Result::Rejected(r)) => {
            eprintln!(
                "pullgate bundle install: {}: rejected by the daemon ({}), nothing changed: {}",
                bundle.display(),
                r.reason,
                r.message
            );
            ExitCode::from(EXIT_FAILURE)
        }
        None => {
            eprintln!("pullgate bundle install: the daemon sent an empty answer; check its log");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use time::macros::datetime;

    use super::sync_status_lines;
    use crate::node::sync::{PendingView, SyncStatus};

    #[test]
    fn status_shows_the_sync_state_this_nodes_wave_and_when_it_takes_a_pending_bundle() {
        let now = datetime!(2026-05-01 12:00 UTC);
        let mut s = SyncStatus {
            source: "registry.corp/pullgate/bundles:prod".into(),
            interval: Duration::from_secs(60),
            max_staleness: Duration::from_secs(3600),
            started_at: now - time::Duration::minutes(10),
            last_round_at: Some(now - time::Duration::seconds(20)),
            last_result: "pending",
            last_success_at: Some(now - time::Duration::seconds(20)),
            last_error: None,
            consecutive_failures: 0,
            backing_off: false,
            next_round_at: Some(now + time::Duration::seconds(40)),
            channel_digest: Some("sha256:bb".into()),
            synced_digest: Some("sha256:aa".into()),
            synced_version: Some(6),
            pending: Some(PendingView {
                downloaded: true,
                version: 7,
                digest: "sha256:bb".into(),
                issuer: "platform-security".into(),
                wave_opens_at: now + time::Duration::hours(5),
                position: 42,
                step: Some((2, 100)),
            }),
            rejected: Vec::new(),
        };
        let text = sync_status_lines(&s.to_json(now, Some(42))).join("\n");
        assert!(
            text.starts_with(
                "sync:      WAITING_FOR_WAVE from registry.corp/pullgate/bundles:prod"
            ),
            "{text}"
        );
        assert!(text.contains("in step with sha256:aa (v6)"), "{text}");
        assert!(text.contains("rollout position: 42 of 0..99"), "{text}");
        assert!(
            text.contains(
                "PENDING v7: verified, taken up when this node's wave opens at 2026-05-01T17:00:00Z (step 3, 100% of nodes; position 42)"
            ),
            "{text}"
        );
        assert!(!text.contains("STALE"), "{text}");

        // Two hours without a successful round: frozen, said so, with the last error.
        s.pending = None;
        s.last_result = "failed";
        s.backing_off = true;
        s.consecutive_failures = 9;
        s.last_error = Some(("unreachable", "connection refused".into()));
        let later = now + time::Duration::hours(2);
        let text = sync_status_lines(&s.to_json(later, None)).join("\n");
        assert!(text.starts_with("sync:      STALE from"), "{text}");
        assert!(
            text.contains("STALE: no round has succeeded for longer than 3600s"),
            "{text}"
        );
        assert!(
            text.contains("last error (unreachable, 9 in a row): connection refused"),
            "{text}"
        );
        assert!(!text.contains("PENDING"), "{text}");
        assert!(sync_status_lines(&serde_json::Value::Null).is_empty());
    }
}
