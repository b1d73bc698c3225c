//! Where kubelet sends its CRI calls: its runtime and image endpoints, from the running kubelet's
//! flags (`/proc/<pid>/cmdline`) and its `KubeletConfiguration` file (`--config`, or the
//! configured default path), where readable. Flags win over the file, as in kubelet; an unset image
//! endpoint is the runtime endpoint; an unset runtime endpoint is containerd's socket (kubelet's
//! default since Kubernetes 1.27).
//!
//! The file is YAML or JSON; only its two top-level scalar keys are read
//! (`containerRuntimeEndpoint`, `imageServiceEndpoint`), so a small reader does without a YAML
//! library: top-level `key: value` lines, the value plain, single- or double-quoted.

use std::path::{Path, PathBuf};

/// kubelet's default runtime endpoint.
pub const DEFAULT_RUNTIME_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";

/// kubelet's endpoints and where they were read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub runtime: String,
    pub image: String,
    /// For messages: `pid 1234 flags`, `/var/lib/kubelet/config.yaml`, `kubelet's default`.
    pub runtime_from: String,
    pub image_from: String,
}

/// The endpoints a kubelet's flags and configuration file set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    pub runtime: Option<String>,
    pub image: Option<String>,
    /// `--config`.
    pub config: Option<PathBuf>,
}

/// The running kubelet: its PID and arguments (argv[0] named `kubelet`), from `proc_root`
/// (`/proc`).
pub fn find_running(proc_root: &Path) -> Option<(u32, Vec<String>)> {
    let mut found: Vec<(u32, Vec<String>)> = std::fs::read_dir(proc_root)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let raw = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let argv0 = Path::new(args.first()?).file_name()?.to_str()?;
            (argv0 == "kubelet").then_some((pid, args))
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

/// The endpoint flags of a kubelet command line (`--flag=value` or `--flag value`).
pub fn flags(args: &[String]) -> Settings {
    let mut s = Settings::default();
    let mut it = args.iter().skip(1).peekable();
    while let Some(a) = it.next() {
        let Some(flag) = a.strip_prefix("--").or_else(|| a.strip_prefix('-')) else {
            continue;
        };
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag, None),
        };
        if !matches!(
            name,
            "container-runtime-endpoint" | "image-service-endpoint" | "config"
        ) {
            continue;
        }
        let value = match value {
            Some(v) => v,
            None => match it.next() {
                Some(v) => v.clone(),
                None => continue,
            },
        };
        match name {
            "container-runtime-endpoint" => s.runtime = Some(value),
            "image-service-endpoint" => s.image = Some(value),
            _ => s.config = Some(PathBuf::from(value)),
        }
    }
    s
}

/// The endpoints a `KubeletConfiguration` file (YAML or JSON) sets.
pub fn parse_config(text: &str) -> Result<Settings, String> {
    let mut s = Settings::default();
    if text.trim_start().starts_with('{') {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let get = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        s.runtime = get("containerRuntimeEndpoint");
        s.image = get("imageServiceEndpoint");
        return Ok(s);
    }
    for (n, line) in text.lines().enumerate() {
        if line.starts_with(['#', ' ', '\t', '-']) || line.trim().is_empty() || line == "---" {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let target = match key.trim() {
            "containerRuntimeEndpoint" => &mut s.runtime,
            "imageServiceEndpoint" => &mut s.image,
            _ => continue,
        };
        *target = Some(scalar(value).map_err(|e| format!("line {}: {key}: {e}", n + 1))?);
    }
    Ok(s)
}

/// A YAML scalar on one line: plain (a trailing ` #` comment dropped), '…' or "…".
fn scalar(raw: &str) -> Result<String, String> {
    let v = raw.trim();
    for q in ['"', '\''] {
        if let Some(rest) = v.strip_prefix(q) {
            let end = rest.find(q).ok_or("unterminated quoted value")?;
            return Ok(rest[..end].to_string());
        }
    }
    let v = v.split(" #").next().unwrap_or("").trim();
    if v.starts_with(['{', '[', '|', '>', '&', '*', '!']) {
        return Err(format!("expected a plain string, found {v:?}"));
    }
    Ok(v.to_string())
}

/// Combines flags and file: flags win; the image endpoint defaults to the runtime endpoint.
pub fn resolve(flags: &Settings, flags_from: &str, file: Option<(&Settings, &str)>) -> Endpoints {
    let pick = |flag: &Option<String>, in_file: Option<&Option<String>>| {
        if let Some(v) = flag {
            return Some((v.clone(), flags_from.to_string()));
        }
        let from = file.map(|(_, from)| from)?;
        in_file?.clone().map(|v| (v, from.to_string()))
    };
    let (runtime, runtime_from) = pick(&flags.runtime, file.map(|(c, _)| &c.runtime))
        .unwrap_or_else(|| {
            (
                DEFAULT_RUNTIME_ENDPOINT.to_string(),
                "kubelet's default".to_string(),
            )
        });
    let (image, image_from) =
        pick(&flags.image, file.map(|(c, _)| &c.image)).unwrap_or_else(|| {
            (
                runtime.clone(),
                format!("{runtime_from} (the runtime endpoint)"),
            )
        });
    Endpoints {
        runtime,
        image,
        runtime_from,
        image_from,
    }
}

/// The socket path of a `unix://` endpoint (or a bare path); `None` for anything else.
pub fn endpoint_path(ep: &str) -> Option<PathBuf> {
    let p = ep.strip_prefix("unix://").unwrap_or(ep);
    p.starts_with('/').then(|| PathBuf::from(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_kubelet_configuration_is_read() {
        let yaml = "\
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# routed through pullgate
containerRuntimeEndpoint: \"unix:///run/pullgate/pullgate.sock\"
imageServiceEndpoint: unix:///run/pullgate/pullgate.sock # same socket
authentication:
  anonymous:
    enabled: false
cgroupDriver: systemd
";
        let s = parse_config(yaml).unwrap();
        assert_eq!(
            s.runtime.as_deref(),
            Some("unix:///run/pullgate/pullgate.sock")
        );
        assert_eq!(
            s.image.as_deref(),
            Some("unix:///run/pullgate/pullgate.sock")
        );
        let json = r#"{"kind":"KubeletConfiguration","containerRuntimeEndpoint":"unix:///run/containerd/containerd.sock"}"#;
        let s = parse_config(json).unwrap();
        assert_eq!(s.runtime.as_deref(), Some(DEFAULT_RUNTIME_ENDPOINT));
        assert_eq!(s.image, None);
        // Nested keys with the same name are not the top-level setting.
        let nested = "foo:\n  containerRuntimeEndpoint: unix:///x\n";
        assert_eq!(parse_config(nested).unwrap(), Settings::default());
        assert!(parse_config("containerRuntimeEndpoint: \"unix:///x\n").is_err());
        assert!(parse_config("{not json").is_err());
    }

    #[test]
    fn flags_win_and_defaults_apply() {
        let args: Vec<String> = [
            "/usr/bin/kubelet",
            "--config=/var/lib/kubelet/config.yaml",
            "--container-runtime-endpoint",
            "unix:///run/pullgate/pullgate.sock",
            "--v=2",
        ]
        .map(String::from)
        .to_vec();
        let f = flags(&args);
        assert_eq!(
            f.config.as_deref(),
            Some(Path::new("/var/lib/kubelet/config.yaml"))
        );
        let file = Settings {
            runtime: Some("unix:///run/containerd/containerd.sock".into()),
            image: None,
            config: None,
        };
        let e = resolve(&f, "kubelet's flags", Some((&file, "config.yaml")));
        assert_eq!(e.runtime, "unix:///run/pullgate/pullgate.sock");
        assert_eq!(e.runtime_from, "kubelet's flags");
        assert_eq!(
            e.image, e.runtime,
            "image endpoint defaults to the runtime endpoint"
        );
        let e = resolve(&Settings::default(), "flags", None);
        assert_eq!(e.runtime, DEFAULT_RUNTIME_ENDPOINT);
        assert_eq!(
            endpoint_path("unix:///run/pullgate/pullgate.sock"),
            Some(PathBuf::from("/run/pullgate/pullgate.sock"))
        );
        assert_eq!(endpoint_path("tcp://127.0.0.1:1"), None);
    }

    #[test]
    fn the_running_kubelet_is_found_in_proc() {
        let proc = tempfile::tempdir().unwrap();
        let write = |pid: &str, argv: &[&str]| {
            let d = proc.path().join(pid);
            std::fs::create_dir_all(&d).unwrap();
            let mut raw = Vec::new();
            for a in argv {
                raw.extend_from_slice(a.as_bytes());
                raw.push(0);
            }
            std::fs::write(d.join("cmdline"), raw).unwrap();
        };
        write("1", &["/sbin/init"]);
        write("self", &["ignored"]);
        write(
            "4321",
            &[
                "/usr/local/bin/kubelet",
                "--image-service-endpoint=unix:///x.sock",
            ],
        );
        write(
            "77",
            &["/usr/bin/kubelet-wrapper", "--container-runtime-endpoint=y"],
        );
        let (pid, args) = find_running(proc.path()).unwrap();
        assert_eq!(pid, 4321);
        assert_eq!(flags(&args).image.as_deref(), Some("unix:///x.sock"));
        assert!(find_running(&proc.path().join("missing")).is_none());
    }
}
