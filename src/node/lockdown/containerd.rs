//! containerd's own configuration, read the way containerd reads it, for the node check: its
//! `config.toml` (sockets, the CRI plugin's registry section) and the `hosts.toml` file containerd
//! would use for a registry name.
//!
//! What matters for the lockdown (verified on containerd 1.6.20 with `ctr images pull --hosts-dir`,
//! which uses the same resolver as the CRI plugin): a `hosts.toml` lists mirrors as
//! `[host."URL"]` tables and the registry itself as `server`; containerd tries the hosts in order
//! and then `server` — and when `server` is omitted it falls back to the upstream registry of the
//! name being pulled (containerd#9206). A file without any `[host]` table is rejected (`invalid
//! host tree`) and containerd then pulls from the upstream registry directly, as it does for a
//! registry name with no hosts directory and no `_default`.

use std::path::{Path, PathBuf};

/// The CRI plugin's registry section, by configuration version (2, 3, 1).
const REGISTRY_SECTIONS: &[&[&str]] = &[
    &["plugins", "io.containerd.grpc.v1.cri", "registry"],
    &["plugins", "io.containerd.cri.v1.images", "registry"],
    &["plugins", "cri", "registry"],
];

/// Why containerd's configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdConfigError {
    #[error("cannot read containerd's configuration {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("containerd's configuration {} is not valid TOML: {message}", path.display())]
    Parse { path: PathBuf, message: String },
}

/// What the node check needs from containerd's `config.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerdConfig {
    pub path: PathBuf,
    /// The gRPC socket (native API and CRI), its owner and group.
    pub grpc_address: PathBuf,
    pub grpc_uid: u32,
    pub grpc_gid: u32,
    /// The ttrpc socket (shims).
    pub ttrpc_address: PathBuf,
    /// The debug (pprof) socket, when configured.
    pub debug_address: Option<PathBuf>,
    /// `config_path` of the CRI registry section, split on `:` (empty: not set).
    pub config_path: Vec<PathBuf>,
    /// The registry section's name as written, for messages; `None`: no registry section.
    pub registry_section: Option<String>,
    /// Legacy registry sub-sections present (`mirrors`, `configs`).
    pub legacy: Vec<&'static str>,
}

fn get<'a>(v: &'a toml::Value, path: &[&str]) -> Option<&'a toml::Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

impl ContainerdConfig {
    /// Reads `path` and the files its `imports` name (later files override earlier ones, as in
    /// containerd).
    pub fn load(path: &Path) -> Result<ContainerdConfig, ContainerdConfigError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| ContainerdConfigError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        let text = read(path)?;
        let mut cfg = ContainerdConfig::parse(path, &text)?;
        let main = parse_toml(path, &text)?;
        for import in imports(&main, path) {
            let t = read(&import)?;
            let v = parse_toml(&import, &t)?;
            cfg.apply(&v);
        }
        Ok(cfg)
    }

    /// Parses one configuration file's text (`path` only names it in messages).
    pub fn parse(path: &Path, text: &str) -> Result<ContainerdConfig, ContainerdConfigError> {
        let v = parse_toml(path, text)?;
        let mut cfg = ContainerdConfig {
            path: path.to_path_buf(),
            grpc_address: PathBuf::from(crate::node::config::DEFAULT_UPSTREAM),
            grpc_uid: 0,
            grpc_gid: 0,
            ttrpc_address: PathBuf::from(format!(
                "{}.ttrpc",
                crate::node::config::DEFAULT_UPSTREAM
            )),
            debug_address: None,
            config_path: Vec::new(),
            registry_section: None,
            legacy: Vec::new(),
        };
        cfg.apply(&v);
        Ok(cfg)
    }

    /// Takes every setting `v` has over the ones already read.
    fn apply(&mut self, v: &toml::Value) {
        let string = |p: &[&str]| get(v, p).and_then(|s| s.as_str()).map(str::to_string);
        let int = |p: &[&str]| {
            get(v, p)
                .and_then(|s| s.as_integer())
                .and_then(|n| u32::try_from(n).ok())
        };
        if let Some(a) = string(&["grpc", "address"]).filter(|a| !a.is_empty()) {
            self.grpc_address = PathBuf::from(a);
        }
        if let Some(n) = int(&["grpc", "uid"]) {
            self.grpc_uid = n;
        }
        if let Some(n) = int(&["grpc", "gid"]) {
            self.grpc_gid = n;
        }
        if let Some(a) = string(&["ttrpc", "address"]).filter(|a| !a.is_empty()) {
            self.ttrpc_address = PathBuf::from(a);
        }
        if let Some(a) = string(&["debug", "address"]) {
            self.debug_address = Some(PathBuf::from(a)).filter(|p| !p.as_os_str().is_empty());
        }
        for section in REGISTRY_SECTIONS {
            let Some(reg) = get(v, section) else {
                continue;
            };
            self.registry_section = Some(
                section
                    .iter()
                    .map(|s| {
                        if s.contains('.') {
                            format!("\"{s}\"")
                        } else {
                            s.to_string()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("."),
            );
            if let Some(p) = reg.get("config_path").and_then(|p| p.as_str()) {
                self.config_path = p
                    .split(':')
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
                    .collect();
            }
            for legacy in ["mirrors", "configs"] {
                let present = reg
                    .get(legacy)
                    .and_then(|t| t.as_table())
                    .is_some_and(|t| !t.is_empty());
                if present && !self.legacy.contains(&legacy) {
                    self.legacy.push(legacy);
                }
            }
        }
    }

    /// The directory whose `hosts.toml` containerd uses for registry `host` (`_default` for a
    /// name without one of its own), as containerd looks it up: in each `config_path` root in
    /// order, `host_port_` (for a host with a port), `host`, then `_default`. `None`: no directory,
    /// so containerd pulls from the upstream registry directly.
    pub fn hosts_dir(&self, host: &str) -> Option<PathBuf> {
        self.config_path.iter().find_map(|root| {
            let mut names = Vec::new();
            if let Some((h, port)) = host.rsplit_once(':').filter(|(h, _)| !h.is_empty()) {
                names.push(format!("{h}_{port}_"));
            }
            names.push(host.to_string());
            names.push("_default".to_string());
            names.into_iter().map(|n| root.join(n)).find(|p| p.is_dir())
        })
    }
}

fn parse_toml(path: &Path, text: &str) -> Result<toml::Value, ContainerdConfigError> {
    text.parse::<toml::Table>()
        .map(toml::Value::Table)
        .map_err(|e| ContainerdConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })
}

/// The files `imports` names, relative ones against the file's directory; a `*` in the last
/// component matches any run of characters, in sorted order.
fn imports(v: &toml::Value, path: &Path) -> Vec<PathBuf> {
    let base = path.parent().unwrap_or(Path::new("/"));
    let mut out = Vec::new();
    let Some(list) = v.get("imports").and_then(|i| i.as_array()) else {
        return out;
    };
    for pattern in list.iter().filter_map(|p| p.as_str()) {
        let p = base.join(pattern);
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !name.contains('*') {
            out.push(p);
            continue;
        }
        let dir = p.parent().unwrap_or(Path::new("/"));
        let (prefix, suffix) = name.split_once('*').unwrap_or((name, ""));
        let mut matched: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|f| {
                f.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with(prefix)
                        && n.ends_with(suffix)
                        && n.len() >= prefix.len() + suffix.len()
                })
            })
            .collect();
        matched.sort();
        out.extend(matched);
    }
    out
}

/// `host[:port]` of a URL as containerd reads it (no scheme: `https://`), default ports dropped.
pub fn url_host(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let default = if scheme == "http" { ":80" } else { ":443" };
    host.strip_suffix(default)
        .unwrap_or(host)
        .to_ascii_lowercase()
}

/// The registry host as the bundle names it, default port dropped.
fn same_host(url: &str, private_registry: &str) -> bool {
    let p = private_registry.to_ascii_lowercase();
    let h = url_host(url);
    h == p || h == p.strip_suffix(":443").unwrap_or(&p)
}

/// What is wrong with a `hosts.toml` (its text) for the lockdown: every place containerd could
/// pull from must be the private registry. Empty: nothing upstream.
pub fn hosts_problems(text: &str, private_registry: &str) -> Vec<String> {
    let v = match text.parse::<toml::Table>() {
        Ok(v) => v,
        Err(e) => {
            return vec![format!(
                "containerd cannot parse it ({}) and falls back to the upstream registry",
                e.message().trim()
            )];
        }
    };
    let mut problems = Vec::new();
    let hosts = v.get("host").and_then(|h| h.as_table());
    if hosts.is_none_or(|h| h.is_empty()) {
        problems.push(
            "it has no [host.\"…\"] table: containerd 1.6 rejects such a file (\"invalid `host` tree\") and pulls from the upstream registry"
                .to_string(),
        );
    }
    match v.get("server").and_then(|s| s.as_str()) {
        None => problems.push(
            "it sets no `server`: when its hosts fail, containerd falls back to the upstream registry (containerd#9206)"
                .to_string(),
        ),
        Some(s) if !same_host(s, private_registry) => problems.push(format!(
            "`server = \"{s}\"` is not the private registry {private_registry}: containerd falls back to it when its hosts fail"
        )),
        Some(_) => {}
    }
    for (url, cfg) in hosts.into_iter().flatten() {
        let pulls = match cfg.get("capabilities").and_then(|c| c.as_array()) {
            None => true,
            Some(caps) => caps
                .iter()
                .any(|c| matches!(c.as_str(), Some("pull" | "resolve"))),
        };
        if pulls && !same_host(url, private_registry) {
            problems.push(format!(
                "[host.\"{url}\"] pulls from {}, not the private registry {private_registry}",
                url_host(url)
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "registry.corp";

    #[test]
    fn registry_sections_of_every_version() {
        let v2 = r#"
            version = 2
            [grpc]
              address = "/run/c/c.sock"
              gid = 998
            [debug]
              address = "/run/c/debug.sock"
            [plugins."io.containerd.grpc.v1.cri".registry]
              config_path = "/etc/containerd/certs.d:/etc/docker/certs.d"
            [plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
              endpoint = ["https://registry-1.docker.io"]
        "#;
        let c = ContainerdConfig::parse(Path::new("/etc/containerd/config.toml"), v2).unwrap();
        assert_eq!(c.grpc_address, Path::new("/run/c/c.sock"));
        assert_eq!((c.grpc_uid, c.grpc_gid), (0, 998));
        assert_eq!(
            c.debug_address.as_deref(),
            Some(Path::new("/run/c/debug.sock"))
        );
        assert_eq!(
            c.config_path,
            vec![
                PathBuf::from("/etc/containerd/certs.d"),
                PathBuf::from("/etc/docker/certs.d")
            ]
        );
        assert_eq!(c.legacy, vec!["mirrors"]);
        assert_eq!(
            c.registry_section.as_deref(),
            Some("plugins.\"io.containerd.grpc.v1.cri\".registry")
        );
        let v1 = "[plugins.cri.registry.configs.\"r\".auth]\nusername = \"u\"\n";
        let c = ContainerdConfig::parse(Path::new("/x"), v1).unwrap();
        assert!(c.config_path.is_empty());
        assert_eq!(c.legacy, vec!["configs"]);
        assert_eq!(c.grpc_address, Path::new("/run/containerd/containerd.sock"));
        let none = ContainerdConfig::parse(Path::new("/x"), "version = 2\n").unwrap();
        assert!(none.registry_section.is_none());
        let e = ContainerdConfig::parse(Path::new("/x/config.toml"), "[grpc\n").unwrap_err();
        assert!(e.to_string().contains("/x/config.toml"), "{e}");
    }

    #[test]
    fn imports_override_the_main_file() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("config.toml");
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        std::fs::write(
            &main,
            "version = 2\nimports = [\"conf.d/*.toml\"]\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/a\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("conf.d/10-registry.toml"),
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/b\"\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("conf.d/ignored.txt"), "garbage [").unwrap();
        let c = ContainerdConfig::load(&main).unwrap();
        assert_eq!(c.config_path, vec![PathBuf::from("/b")]);
    }

    #[test]
    fn hosts_dirs_are_found_like_containerd_finds_them() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut c = ContainerdConfig::parse(Path::new("/x"), "").unwrap();
        assert_eq!(c.hosts_dir("docker.io"), None, "no config_path");
        c.config_path = vec![root.join("missing"), root.to_path_buf()];
        assert_eq!(c.hosts_dir("docker.io"), None);
        std::fs::create_dir_all(root.join("_default")).unwrap();
        assert_eq!(c.hosts_dir("docker.io"), Some(root.join("_default")));
        std::fs::create_dir_all(root.join("docker.io")).unwrap();
        assert_eq!(c.hosts_dir("docker.io"), Some(root.join("docker.io")));
        std::fs::create_dir_all(root.join("reg_5000_")).unwrap();
        assert_eq!(c.hosts_dir("reg:5000"), Some(root.join("reg_5000_")));
    }

    #[test]
    fn hosts_files_that_reach_upstream_are_found() {
        let locked = "server = \"https://registry.corp/v2/approved\"\noverride_path = true\n\
                      [host.\"https://registry.corp/v2/approved\"]\ncapabilities = [\"pull\", \"resolve\"]\noverride_path = true\n";
        assert_eq!(hosts_problems(locked, P), Vec::<String>::new());
        assert!(hosts_problems(locked, "registry.corp:443").is_empty());
        // The classic mirror set-up: the upstream stays as `server`, the fallback.
        let fallback = "server = \"https://registry-1.docker.io\"\n\
                        [host.\"https://registry.corp\"]\ncapabilities = [\"pull\", \"resolve\"]\n";
        let p = hosts_problems(fallback, P);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("registry-1.docker.io"), "{p:?}");
        // No server: containerd falls back to the name's own registry.
        let p = hosts_problems("[host.\"https://registry.corp\"]\n", P);
        assert!(p.iter().any(|p| p.contains("no `server`")), "{p:?}");
        // Only a server: containerd 1.6 ignores the whole file.
        let p = hosts_problems("server = \"https://registry.corp\"\n", P);
        assert!(p.iter().any(|p| p.contains("invalid `host` tree")), "{p:?}");
        // A second mirror elsewhere.
        let p = hosts_problems(
            "server = \"https://registry.corp\"\n[host.\"https://registry.corp\"]\n[host.\"http://mirror.example:5000\"]\ncapabilities = [\"resolve\"]\n",
            P,
        );
        assert!(p.iter().any(|p| p.contains("mirror.example:5000")), "{p:?}");
        // A push-only host does not pull.
        assert!(
            hosts_problems(
                "server = \"https://registry.corp\"\n[host.\"https://registry.corp\"]\n[host.\"https://push.example\"]\ncapabilities = [\"push\"]\n",
                P
            )
            .is_empty()
        );
        let p = hosts_problems("server = [", P);
        assert!(p[0].contains("cannot parse"), "{p:?}");
        assert_eq!(url_host("registry.corp:443"), "registry.corp");
        assert_eq!(url_host("http://127.0.0.1:5000/v2/x"), "127.0.0.1:5000");
    }
}
