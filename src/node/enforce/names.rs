//! Image names between what users write and what pullgate pulls.
//!
//! pullgate pulls approved public images from their mirror location by digest
//! (`registry.corp/approved/library/busybox@sha256:…`), so that is the name containerd knows them by.
//! Users and kubelet keep using `busybox:1.36`. This module maps both ways from the bundle alone:
//! [`resolve`] turns a user reference into the pinned mirror reference (so `ImageStatus("busybox:1.36")`
//! finds the image pullgate pulled, and misses it as soon as the bundle moves the tag), and
//! [`source_tags`] turns a mirror repo digest back into the source tags bound to it (so `crictl images`
//! and `ImageStatus` show `docker.io/library/busybox:1.36`). Both are pure and ignore scopes: they only
//! name things; the scope check happens where images are pulled and started.

use crate::policy::{Bundle, Digest, Reference};

/// Whether `image` is an image ID (`sha256:<64 hex>` or bare 64 hex) rather than a reference.
pub fn is_image_id(image: &str) -> bool {
    let hex = image.strip_prefix("sha256:").unwrap_or(image);
    hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A user reference resolved through the bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The pinned mirror reference containerd knows the image by.
    pub pull_ref: String,
    /// The user's reference, fully normalised (`docker.io/library/busybox:1.36`).
    pub normalized: String,
}

/// Resolves a public (or mirror-location) reference to its pinned mirror reference, when the bundle
/// approves that tag or digest for some scope. `None` for anything else (first-party images, unknown
/// repositories, unapproved tags): those are left as the user wrote them.
pub fn resolve(image: &str, bundle: &Bundle) -> Option<Resolved> {
    let r = Reference::parse(image).ok()?;
    let (source, target_path) = if r.domain() == bundle.private_registry {
        let (_, source) = bundle.source_of_mirror_path(r.path())?;
        (source, r.path().to_string())
    } else {
        let m = bundle.mirror_for(r.domain(), r.path())?;
        (
            format!("{}/{}", r.domain(), r.path()),
            bundle.mirror_path(m, r.path()),
        )
    };
    let entries = bundle.entries(&source);
    let digest: Digest = match (r.digest(), r.tag()) {
        (Some(d), _) => entries.iter().any(|e| e.has_digest(d)).then(|| d.clone())?,
        (None, Some(tag)) => entries.iter().find_map(|e| e.tag(tag)).cloned()?,
        (None, None) => return None,
    };
    Some(Resolved {
        pull_ref: format!("{}/{target_path}@{digest}", bundle.private_registry),
        normalized: r.to_string(),
    })
}

/// For a repo digest of an image in containerd (`registry.corp/approved/library/busybox@sha256:…`),
/// the source tags the bundle binds to that digest (`docker.io/library/busybox:1.36`).
pub fn source_tags(repo_digest: &str, bundle: &Bundle) -> Vec<String> {
    let Ok(r) = Reference::parse(repo_digest) else {
        return Vec::new();
    };
    let Some(digest) = r.digest() else {
        return Vec::new();
    };
    if r.domain() != bundle.private_registry {
        return Vec::new();
    }
    let Some((_, source)) = bundle.source_of_mirror_path(r.path()) else {
        return Vec::new();
    };
    let mut out: Vec<String> = bundle
        .entries(&source)
        .iter()
        .flat_map(|e| e.tags().iter())
        .filter(|(_, d)| d == digest)
        .map(|(t, _)| format!("{source}:{t}"))
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_ids_are_recognised() {
        let hex = "a".repeat(64);
        assert!(is_image_id(&format!("sha256:{hex}")));
        assert!(is_image_id(&hex));
        assert!(!is_image_id("busybox:1.36"));
        assert!(!is_image_id(&format!("sha256:{}", "A".repeat(64))));
        assert!(!is_image_id(&format!("sha256:{}", "a".repeat(63))));
    }
}
