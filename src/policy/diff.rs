//! Comparing two bundles for review (`pullgate bundle diff OLD NEW`).
//!
//! This module owns [`diff`], which lists what changed between two parsed bundles: metadata, mirrors,
//! first-party prefixes, governance (scopes, namespace bindings, modes) and images — added, removed and
//! changed entries, tags, digests, scopes and provenance — and, in format 2, lifecycles, the effective
//! rules of every scope, exceptions and rollout steps. Lines start with `+` (added), `-` (removed) or
//! `~` (changed), so a reviewer can read the policy change without reading JSON.

use std::collections::BTreeMap;

use super::bundle::{Bundle, ImageEntry, Provenance, format_unix, rfc3339};

fn provenance_summary(p: &Provenance) -> String {
    let scans: Vec<String> = p
        .scans
        .iter()
        .map(|s| {
            format!(
                "{} {} (worst {}, report {})",
                s.scanner, s.version, s.worst_severity, s.report
            )
        })
        .collect();
    format!(
        "licence {}, scans [{}], approved by {} at {}",
        p.license,
        scans.join("; "),
        p.approved_by,
        format_unix(p.approved_at)
    )
}

fn tag_map(e: &ImageEntry) -> BTreeMap<&str, String> {
    e.tags()
        .iter()
        .map(|(t, d)| (&**t, d.to_string()))
        .collect()
}

/// The changes from `old` to `new`, one line each; empty when the policies are identical.
pub fn diff(old: &Bundle, new: &Bundle) -> Vec<String> {
    let mut out = Vec::new();
    if old.format != new.format {
        out.push(format!("~ format {} -> {}", old.format, new.format));
    }
    if old.version != new.version {
        out.push(format!("~ version {} -> {}", old.version, new.version));
    }
    for (what, a, b) in [
        ("issuer", old.issuer.clone(), new.issuer.clone()),
        ("issued_at", old.issued_at_string(), new.issued_at_string()),
        (
            "expires_at",
            old.expires_at_string(),
            new.expires_at_string(),
        ),
        (
            "private_registry",
            old.private_registry.clone(),
            new.private_registry.clone(),
        ),
    ] {
        if a != b {
            out.push(format!("~ {what} {a} -> {b}"));
        }
    }
    let mirrors = |b: &Bundle| -> BTreeMap<String, String> {
        b.mirrors()
            .iter()
            .map(|m| (m.source(), m.target_path.clone()))
            .collect()
    };
    diff_maps(&mut out, "mirror", &mirrors(old), &mirrors(new));
    let fps = |b: &Bundle| -> BTreeMap<String, String> {
        b.first_party()
            .iter()
            .map(|f| {
                (
                    format!("{}/{} for {}", b.private_registry, f.path, f.scope_path),
                    if f.require_digest {
                        "digest required".to_owned()
                    } else {
                        "tags allowed".to_owned()
                    },
                )
            })
            .collect()
    };
    diff_maps(&mut out, "first-party", &fps(old), &fps(new));
    let scopes = |b: &Bundle| -> BTreeMap<String, String> {
        b.scopes()
            .nodes()
            .iter()
            .map(|n| (n.path.to_string(), format!("mode {}", n.mode)))
            .collect()
    };
    diff_maps(&mut out, "scope", &scopes(old), &scopes(new));
    let ns = |b: &Bundle| -> BTreeMap<String, String> {
        b.scopes()
            .namespace_bindings()
            .into_iter()
            .map(|(n, s)| (n.to_owned(), s.to_owned()))
            .collect()
    };
    diff_maps(&mut out, "namespace", &ns(old), &ns(new));
    let rules = |b: &Bundle| -> BTreeMap<String, String> {
        b.scopes()
            .nodes()
            .iter()
            .filter_map(|n| Some((n.path.to_string(), n.rules.as_ref()?.summary())))
            .collect()
    };
    diff_maps(&mut out, "rules of", &rules(old), &rules(new));
    let exceptions = |b: &Bundle| -> BTreeMap<String, String> {
        b.exceptions()
            .iter()
            .map(|e| {
                (
                    format!("{}@{} for {}", e.source, e.digest, e.scope_path),
                    format!(
                        "{}until {}, ticket {}, approved by {}: {}",
                        e.tag
                            .as_deref()
                            .map(|t| format!("tag {t}, "))
                            .unwrap_or_default(),
                        rfc3339(e.expires_at),
                        e.ticket,
                        e.approved_by,
                        e.reason
                    ),
                )
            })
            .collect()
    };
    diff_maps(&mut out, "exception", &exceptions(old), &exceptions(new));
    let rollout = |b: &Bundle| -> BTreeMap<String, String> {
        b.rollout()
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, s)| {
                (
                    format!("step {i}"),
                    format!(
                        "after {} {}%",
                        humantime::format_duration(s.after),
                        s.percent
                    ),
                )
            })
            .collect()
    };
    diff_maps(&mut out, "rollout", &rollout(old), &rollout(new));
    if old.scopes().application_label() != new.scopes().application_label() {
        out.push(format!(
            "~ application label {} -> {}",
            old.scopes().application_label(),
            new.scopes().application_label()
        ));
    }

    // Keyed by repository and scope; in format 2 one key may have several entries (one per
    // provenance), compared as one set of tags and digests with a provenance per tag or digest.
    let images = |b: &Bundle| -> BTreeMap<(String, String), Vec<ImageEntry>> {
        let mut m: BTreeMap<(String, String), Vec<ImageEntry>> = BTreeMap::new();
        for e in b.images() {
            m.entry((e.source().to_owned(), e.scope_path().to_string()))
                .or_default()
                .push(e.clone());
        }
        m
    };
    let (oi, ni) = (images(old), images(new));
    for (key, es) in &oi {
        if !ni.contains_key(key) {
            for e in es {
                out.push(format!(
                    "- image {} for {} (tags: {})",
                    key.0,
                    key.1,
                    tag_list(e)
                ));
            }
        }
    }
    for (key, es) in &ni {
        let Some(os) = oi.get(key) else {
            for e in es {
                out.push(format!(
                    "+ image {} for {} (tags: {}; {})",
                    key.0,
                    key.1,
                    tag_list(e),
                    provenance_summary(e.provenance())
                ));
            }
            continue;
        };
        let at = format!("{} for {}", key.0, key.1);
        let mut tags = BTreeMap::new();
        for (k, v) in os.iter().flat_map(tag_map) {
            tags.insert(k.to_owned(), (Some(v), None));
        }
        for (k, v) in es.iter().flat_map(tag_map) {
            tags.entry(k.to_owned()).or_insert((None, None)).1 = Some(v);
        }
        for (tag, (a, b)) in tags {
            match (a, b) {
                (Some(a), None) => out.push(format!("- tag {at}: {tag} ({a})")),
                (None, Some(b)) => out.push(format!("+ tag {at}: {tag} ({b})")),
                (Some(a), Some(b)) if a != b => out.push(format!("~ tag {at}: {tag} {a} -> {b}")),
                _ => {}
            }
        }
        let digests = |x: &[ImageEntry]| -> Vec<String> {
            let mut v: Vec<String> = x
                .iter()
                .flat_map(|e| e.digests().iter().map(ToString::to_string))
                .collect();
            v.sort();
            v.dedup();
            v
        };
        let (od, nd) = (digests(os), digests(es));
        for d in od.iter().filter(|d| !nd.contains(d)) {
            out.push(format!("- digest {at}: {d}"));
        }
        for d in nd.iter().filter(|d| !od.contains(d)) {
            out.push(format!("+ digest {at}: {d}"));
        }
        let lifecycles = |x: &[ImageEntry]| -> BTreeMap<String, String> {
            x.iter()
                .flat_map(|e| {
                    e.lifecycles().map(|(t, d, l)| {
                        let key = match t {
                            Some(t) => format!("tag {t}"),
                            None => format!("digest {d}"),
                        };
                        (key, l.summary())
                    })
                })
                .collect()
        };
        diff_maps(
            &mut out,
            &format!("lifecycle {at}:"),
            &lifecycles(os),
            &lifecycles(es),
        );
        match (&os[..], &es[..]) {
            ([o], [e]) => {
                if o.provenance() != e.provenance() {
                    out.push(format!(
                        "~ provenance {at}: {} -> {}",
                        provenance_summary(o.provenance()),
                        provenance_summary(e.provenance())
                    ));
                }
            }
            _ => {
                let provenances = |x: &[ImageEntry]| -> BTreeMap<String, String> {
                    x.iter()
                        .flat_map(|e| {
                            let p = provenance_summary(e.provenance());
                            let tags = e.tags().iter().map(|(t, _)| format!("tag {t}"));
                            let bare = e.digests().iter().map(|d| format!("digest {d}"));
                            tags.chain(bare).map(move |k| (k, p.clone()))
                        })
                        .collect()
                };
                diff_maps(
                    &mut out,
                    &format!("provenance {at}:"),
                    &provenances(os),
                    &provenances(es),
                );
            }
        }
    }
    out
}

fn tag_list(e: &ImageEntry) -> String {
    let mut parts: Vec<String> = e.tags().iter().map(|(t, _)| t.to_string()).collect();
    if !e.digests().is_empty() {
        parts.push(format!("{} pinned digest(s)", e.digests().len()));
    }
    parts.join(", ")
}

fn diff_maps(
    out: &mut Vec<String>,
    what: &str,
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) {
    for (k, v) in old {
        match new.get(k) {
            None => out.push(format!("- {what} {k} ({v})")),
            Some(n) if n != v => out.push(format!("~ {what} {k}: {v} -> {n}")),
            _ => {}
        }
    }
    for (k, v) in new {
        if !old.contains_key(k) {
            out.push(format!("+ {what} {k} ({v})"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_bundle;
    use crate::policy::testutil::*;

    #[test]
    fn reports_added_removed_and_changed() {
        let old = parse_bundle(EXAMPLE.as_bytes()).unwrap();
        assert!(diff(&old, &old).is_empty());
        let mut v: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
        v["version"] = 43.into();
        v["images"][0]["tags"]["1.27"] = digest(30).to_string().into();
        v["images"][0]["tags"]
            .as_object_mut()
            .unwrap()
            .remove("1.26");
        v["images"][2]["provenance"]["license"] = "MIT".into();
        v["images"].as_array_mut().unwrap().remove(5);
        v["governance"]["programs"][1]["projects"][0]["mode"] = "warn".into();
        let new = parse_bundle(serde_json::to_string(&v).unwrap().as_bytes()).unwrap();
        let d = diff(&old, &new).join("\n");
        for want in [
            "~ version 42 -> 43",
            "+ tag docker.io/library/nginx for corp/payments: 1.27",
            "- tag docker.io/library/nginx for corp/payments: 1.26",
            "~ provenance registry.k8s.io/pause for corp: licence Apache-2.0",
            "- image docker.io/library/busybox for corp",
            "~ scope corp/search/index: mode enforce -> mode warn",
        ] {
            assert!(d.contains(want), "diff should contain {want:?}:\n{d}");
        }
    }

    #[test]
    fn reports_lifecycle_rules_exceptions_and_rollout() {
        let old = parse_bundle(EXAMPLE_V2.as_bytes()).unwrap();
        assert!(diff(&old, &old).is_empty());
        let mut v: serde_json::Value = serde_json::from_str(EXAMPLE_V2).unwrap();
        v["images"][0]["tags"]["1.25"]["sunset_at"] = "2026-07-01T00:00:00Z".into();
        v["images"][0]["tags"]["1.26"] = serde_json::json!({"digest": digest(2).to_string(), "deprecated_at": "2026-09-01T00:00:00Z"});
        v["governance"]["programs"][0]["rules"]["min_scanners"] = 3.into();
        v["exceptions"].as_array_mut().unwrap().remove(1);
        v["exceptions"][0]["expires_at"] = "2026-03-25T00:00:00Z".into();
        v["rollout"][1]["percent"] = 20.into();
        let new = parse_bundle(serde_json::to_string(&v).unwrap().as_bytes()).unwrap();
        let d = diff(&old, &new).join("\n");
        for want in [
            "~ lifecycle docker.io/library/nginx for corp: tag 1.25: deprecated 2026-04-01T00:00:00Z, sunset 2026-06-01T00:00:00Z, replacement 1.26 -> deprecated 2026-04-01T00:00:00Z, sunset 2026-07-01T00:00:00Z, replacement 1.26",
            "+ lifecycle docker.io/library/nginx for corp: tag 1.26 (deprecated 2026-09-01T00:00:00Z)",
            "~ rules of corp/payments: min_scanners 2 (from corp),",
            "-> min_scanners 3 (from corp/payments)",
            "- exception ghcr.io/acme/tool@",
            "~ exception docker.io/library/redis@",
            "until 2026-03-21T00:00:00Z",
            "~ rollout step 1: after 1h 10% -> after 1h 20%",
        ] {
            assert!(d.contains(want), "diff should contain {want:?}:\n{d}");
        }
        // A repository with two entries for one scope (one per provenance): tags and provenance per
        // tag, as one set.
        let mut v: serde_json::Value = serde_json::from_str(EXAMPLE_V2).unwrap();
        let mut pause = v["images"][1].clone();
        pause["tags"] = serde_json::json!({"3.10": digest(31).to_string()});
        pause["provenance"]["license"] = "MIT".into();
        v["images"].as_array_mut().unwrap().push(pause);
        let split = parse_bundle(serde_json::to_string(&v).unwrap().as_bytes()).unwrap();
        let d = diff(&old, &split).join("\n");
        for want in [
            "+ tag registry.k8s.io/pause for corp: 3.10",
            "+ provenance registry.k8s.io/pause for corp: tag 3.10 (licence MIT",
        ] {
            assert!(d.contains(want), "diff should contain {want:?}:\n{d}");
        }
        assert!(!d.contains("image registry.k8s.io/pause"), "{d}");
        assert!(diff(&split, &split).is_empty());
        let f1 = parse_bundle(EXAMPLE.as_bytes()).unwrap();
        let d = diff(&f1, &old).join("\n");
        assert!(
            d.contains("~ format 1 -> 2") && d.contains("+ rules of corp ("),
            "{d}"
        );
    }
}
