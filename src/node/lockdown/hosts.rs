//! The `hosts.toml` writer of `pullgate node check --write-hosts DIR`: one file per public source
//! the bundle mirrors, and one for `_default`, each sending every pull to the private registry with
//! no upstream fallback (`server` is the private registry too, and there is a `[host]` table, which
//! containerd 1.6 requires). A source mirrored as a whole (`docker.io` → `approved`) is mapped onto
//! its mirror path (`override_path`), so `ctr pull docker.io/library/busybox@sha256:…` finds the
//! approved copy; a source mirrored in parts, and `_default`, go to the registry's root.
//!
//! Each file is shown as a diff against what is there before it is replaced (atomically).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;

use crate::policy::VerifiedBundle;

/// One file to write: `DIR/<dir_name>/hosts.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostsFile {
    pub dir_name: String,
    pub content: String,
}

/// The files that lock every public source of `bundle` (and every other name) onto the private
/// registry, reached with `scheme` (`https` or `http`).
pub fn lockdown_files(bundle: &VerifiedBundle, scheme: &str) -> Vec<HostsFile> {
    let private = &bundle.private_registry;
    let mut by_domain: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    for m in bundle.mirrors() {
        by_domain
            .entry(m.source_domain.as_str())
            .or_default()
            .push((m.source_path.as_str(), m.target_path.as_str()));
    }
    let mut out: Vec<HostsFile> = by_domain
        .into_iter()
        .filter(|(domain, _)| *domain != private.as_str())
        .map(|(domain, mirrors)| {
            let whole = match mirrors.as_slice() {
                [("", target)] if !target.is_empty() => Some(*target),
                _ => None,
            };
            let content = match whole {
                Some(target) => file(
                    domain,
                    &format!("{scheme}://{private}/v2/{}", target.trim_matches('/')),
                    true,
                    &format!("its approved mirror {private}/{target}"),
                ),
                None => file(
                    domain,
                    &format!("{scheme}://{private}"),
                    false,
                    &format!("the private registry {private}"),
                ),
            };
            HostsFile {
                dir_name: domain.to_string(),
                content,
            }
        })
        .collect();
    out.push(HostsFile {
        dir_name: "_default".into(),
        content: file(
            "every registry name without a directory of its own",
            &format!("{scheme}://{private}"),
            false,
            &format!("the private registry {private}"),
        ),
    });
    out
}

fn file(what: &str, url: &str, override_path: bool, goes_to: &str) -> String {
    let ov = if override_path {
        "override_path = true\n"
    } else {
        ""
    };
    format!(
        "# Written by `pullgate node check --write-hosts`: pulls of {what} go to {goes_to}\n\
         # and nowhere else. `server` is the private registry too, so containerd has no upstream to\n\
         # fall back to when the mirror fails.\n\
         server = \"{url}\"\n{ov}\n\
         [host.\"{url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n{}",
        if override_path {
            "  override_path = true\n"
        } else {
            ""
        }
    )
}

/// Writes `files` under `dir`, printing to `out` a diff of each change first. Returns how many
/// files changed.
pub fn write_files(dir: &Path, files: &[HostsFile], out: &mut impl Write) -> io::Result<usize> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let mut changed = 0;
    for f in files {
        let sub = dir.join(&f.dir_name);
        let path = sub.join("hosts.toml");
        let old = match std::fs::read_to_string(&path) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot read {}: {e}", path.display()),
                ));
            }
        };
        if old.as_deref() == Some(f.content.as_str()) {
            writeln!(out, "unchanged {}", path.display())?;
            continue;
        }
        writeln!(
            out,
            "--- {}{}",
            path.display(),
            if old.is_none() { " (new file)" } else { "" }
        )?;
        writeln!(out, "+++ {}", path.display())?;
        out.write_all(line_diff(old.as_deref().unwrap_or(""), &f.content).as_bytes())?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&sub)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("cannot create {}: {e}", sub.display()))
            })?;
        let tmp = sub.join(".hosts.toml.pullgate-tmp");
        let _ = std::fs::remove_file(&tmp);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .and_then(|mut w| {
                w.write_all(f.content.as_bytes())?;
                w.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io::Error::new(
                e.kind(),
                format!("cannot write {}: {e}", path.display()),
            ));
        }
        changed += 1;
    }
    Ok(changed)
}

/// A line diff (`-` old, `+` new, ` ` both) by longest common subsequence; files here are small.
pub fn line_diff(old: &str, new: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out += &format!(" {}\n", a[i]);
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out += &format!("+{}\n", b[j]);
            j += 1;
        } else {
            out += &format!("-{}\n", a[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::lockdown::containerd::hosts_problems;
    use crate::policy::testutil::example_bundle;

    #[test]
    fn written_files_pass_the_check_and_map_mirrors() {
        let b = example_bundle();
        let files = lockdown_files(&b, "https");
        let names: Vec<&str> = files.iter().map(|f| f.dir_name.as_str()).collect();
        assert!(names.contains(&"docker.io"), "{names:?}");
        assert_eq!(names.last(), Some(&"_default"));
        for f in &files {
            assert_eq!(
                hosts_problems(&f.content, &b.private_registry),
                Vec::<String>::new(),
                "{}:\n{}",
                f.dir_name,
                f.content
            );
        }
        let docker = files.iter().find(|f| f.dir_name == "docker.io").unwrap();
        let m = b
            .mirrors()
            .iter()
            .find(|m| m.source_domain == "docker.io")
            .unwrap();
        assert!(
            docker.content.contains(&format!(
                "server = \"https://{}/v2/{}\"",
                b.private_registry, m.target_path
            )),
            "{}",
            docker.content
        );
        assert!(docker.content.contains("override_path = true"));
    }

    #[test]
    fn writing_shows_a_diff_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let files = vec![HostsFile {
            dir_name: "docker.io".into(),
            content: "server = \"https://r\"\n[host.\"https://r\"]\n".into(),
        }];
        std::fs::create_dir_all(dir.path().join("docker.io")).unwrap();
        std::fs::write(
            dir.path().join("docker.io/hosts.toml"),
            "server = \"https://registry-1.docker.io\"\n[host.\"https://r\"]\n",
        )
        .unwrap();
        let mut out = Vec::new();
        assert_eq!(write_files(dir.path(), &files, &mut out).unwrap(), 1);
        let shown = String::from_utf8(out).unwrap();
        assert!(
            shown.contains("-server = \"https://registry-1.docker.io\"")
                && shown.contains("+server = \"https://r\"")
                && shown.contains(" [host.\"https://r\"]"),
            "{shown}"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("docker.io/hosts.toml")).unwrap(),
            files[0].content
        );
        let mut again = Vec::new();
        assert_eq!(write_files(dir.path(), &files, &mut again).unwrap(), 0);
        assert!(String::from_utf8(again).unwrap().starts_with("unchanged"));
    }
}
