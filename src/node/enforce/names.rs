//! Image names between what users write and what pullgate pulls.
//!
//! pullgate pulls approved public images from their mirror location by digest
//! (`registry.corp/approved/library/busybox@sha256:…`), so that is the name containerd knows them by.
//! Users and kubelet keep using `busybox:1.36`. This module maps both ways from the bundle alone:
//! [`resolve`] turns a user reference into the pinned mirror reference (so `ImageStatus("busybox:1.36")`
//! finds the image pullgate pulled, and misses it as soon as the bundle moves the tag), and
//! [`shown_names`] turns the names containerd reports for an image into the names a CRI client sees.
//! Both are pure and ignore scopes and times: they only name things; scopes and times are checked
//! where images are pulled and started.
//!
//! # The rule for the names an image shows
//!
//! One image shows the same `repo_tags` and `repo_digests` however it is asked for (tag, `repo@digest`,
//! image ID, short or mirror name) and in `ListImages`: for every repo digest `MIRROR@D` that
//! containerd reports, where `MIRROR` is where the bundle's mirrors copy a source repository
//! `SOURCE` and the bundle approves `D` for `SOURCE` (as a digest or through a tag) or names it in an
//! exception,
//!
//! - `MIRROR@D` is shown as `SOURCE@D` (the same manifest: mirrors are copies by digest), and
//! - every tag `T` the bundle binds to `D`, through an approval or an exception, adds `SOURCE:T` to
//!   `repo_tags`.
//!
//! Every other name containerd reports is shown as it is. So an image pulled through pullgate looks
//! as it would had containerd pulled the source names itself, and every name shown resolves back to
//! the same image. Tags follow the bundle, not the history of pulls: all tags bound to the digest are
//! shown, and a tag the bundle has moved to another digest is no longer shown for this one.
//!
//! # Remembered per bundle
//!
//! kubelet asks `ImageStatus` about the same few names again and again, and every `ListImages` shows
//! the same images. Both mappings are pure functions of what they are given and the bundle, so
//! [`Memo`] remembers their results under the bundle in force and forgets them all as soon as it is
//! asked under another bundle: a remembered result is never stale.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::policy::{Bundle, Digest, Exception, ImageEntry, Reference, VerifiedBundle};

/// Most results [`Memo`] remembers of each kind (it starts afresh when full): more than the images
/// and names a node uses.
pub const MEMO_MAX: usize = 1024;
/// Longest input [`Memo`] remembers a result for (longer ones are worked out every time). An image
/// reference is at most 1 KiB and containerd's `Image` messages are a few hundred bytes; with
/// [`MEMO_MAX`] this bounds what is remembered to a few MiB whatever a client asks.
const MEMO_KEY_MAX: usize = 2048;

/// Results of [`resolve`] and of showing an image's names, remembered under one bundle (see the
/// module documentation).
#[derive(Default)]
pub struct Memo(Mutex<MemoInner>);

#[derive(Default)]
struct MemoInner {
    /// The bundle the results are for. Weak, so a replaced bundle is not kept in memory; while it
    /// exists, no other bundle can be allocated at its address, so comparing addresses is exact.
    bundle: Weak<VerifiedBundle>,
    resolved: HashMap<String, Option<Resolved>>,
    shown: HashMap<Vec<u8>, Option<Vec<u8>>>,
}

impl Memo {
    /// The results remembered under `bundle` (none, the first time it is asked about).
    fn under(&self, bundle: &Arc<VerifiedBundle>) -> MutexGuard<'_, MemoInner> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !std::ptr::eq(m.bundle.as_ptr(), Arc::as_ptr(bundle)) {
            *m = MemoInner {
                bundle: Arc::downgrade(bundle),
                ..MemoInner::default()
            };
        }
        m
    }

    /// [`resolve`], remembered.
    pub fn resolve(&self, image: &str, bundle: &Arc<VerifiedBundle>) -> Option<Resolved> {
        self.remembered(
            bundle,
            |m| &mut m.resolved,
            image,
            || resolve(image, bundle),
        )
    }

    /// How the `Image` message `image` is shown (`None`: unchanged), as `show` works it out from
    /// `image` and `bundle` alone; remembered.
    pub fn shown(
        &self,
        image: &[u8],
        bundle: &Arc<VerifiedBundle>,
        show: impl FnOnce() -> Option<Vec<u8>>,
    ) -> Option<Vec<u8>> {
        self.remembered(bundle, |m| &mut m.shown, image, show)
    }

    /// What `work` gives for `key` under `bundle`: remembered in `map`, or worked out (without the
    /// lock held) and remembered when `key` is short enough.
    fn remembered<K, Q, V>(
        &self,
        bundle: &Arc<VerifiedBundle>,
        map: fn(&mut MemoInner) -> &mut HashMap<K, V>,
        key: &Q,
        work: impl FnOnce() -> V,
    ) -> V
    where
        K: Borrow<Q> + Hash + Eq,
        Q: ?Sized + Hash + Eq + AsRef<[u8]> + ToOwned<Owned = K>,
        V: Clone,
    {
        if let Some(v) = map(&mut self.under(bundle)).get(key) {
            return v.clone();
        }
        let v = work();
        if key.as_ref().len() <= MEMO_KEY_MAX {
            let mut m = self.under(bundle);
            let map = map(&mut m);
            if map.len() >= MEMO_MAX {
                map.clear();
            }
            map.insert(key.to_owned(), v.clone());
        }
        v
    }
}

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
/// approves that tag or digest for some scope or names it in an exception. `None` for anything else
/// (first-party images, unknown repositories, unapproved tags): those are left as the user wrote them.
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
    let named = Named::of(&source, bundle);
    let digest: Digest = match (r.digest(), r.tag()) {
        (Some(d), _) => named.has_digest(d).then(|| d.clone())?,
        (None, Some(tag)) => named.tag(tag)?.clone(),
        (None, None) => return None,
    };
    Some(Resolved {
        pull_ref: format!("{}/{target_path}@{digest}", bundle.private_registry),
        normalized: r.to_string(),
    })
}

/// The source names of a repo digest of an image in containerd
/// (`registry.corp/approved/library/busybox@sha256:…`): the source repo digest
/// (`docker.io/library/busybox@sha256:…`) and the source tags bound to that digest
/// (`docker.io/library/busybox:1.36`), sorted. `None` unless it is where the bundle copies its
/// source to and the bundle approves this digest for that source or names it in an exception.
fn source_names(repo_digest: &str, bundle: &Bundle) -> Option<(String, Vec<String>)> {
    let r = Reference::parse(repo_digest).ok()?;
    let digest = r.digest()?;
    if r.domain() != bundle.private_registry {
        return None;
    }
    let (mirror, source) = bundle.source_of_mirror_path(r.path())?;
    // Only the location the bundle copies `source` to: a shorter mirror source's target can hold the
    // same path too (an image pulled before the bundle added a longer mirror source), and `source`'s
    // names resolve to the other location.
    let (domain, path) = source.split_once('/')?;
    let named = Named::of(&source, bundle);
    if bundle.mirror_for(domain, path) != Some(mirror) || !named.has_digest(digest) {
        return None;
    }
    let entry_tags = named
        .entries
        .iter()
        .flat_map(|e| e.tags().iter())
        .filter(|(_, d)| d == digest)
        .map(|(t, _)| &**t);
    let exception_tags = named
        .exceptions
        .iter()
        .filter(|x| &x.digest == digest)
        .filter_map(|x| x.tag.as_deref());
    let mut tags: Vec<String> = entry_tags
        .chain(exception_tags)
        .map(|t| format!("{source}:{t}"))
        .collect();
    tags.sort();
    tags.dedup();
    Some((format!("{source}@{digest}"), tags))
}

/// What the bundle says of one source repository, in any scope and at any time (names ignore both):
/// its approvals and its exceptions, each looked up once.
struct Named<'b> {
    entries: &'b [ImageEntry],
    exceptions: &'b [Exception],
}

impl<'b> Named<'b> {
    fn of(source: &str, bundle: &'b Bundle) -> Named<'b> {
        Named {
            entries: bundle.entries(source),
            exceptions: bundle.exceptions_for(source),
        }
    }

    /// Whether an approval (as a digest or through a tag) or an exception names `digest`.
    fn has_digest(&self, digest: &Digest) -> bool {
        self.entries.iter().any(|e| e.has_digest(digest))
            || self.exceptions.iter().any(|x| &x.digest == digest)
    }

    /// The digest `tag` is bound to, through an approval or an exception (a verified bundle binds a
    /// tag to one digest across both).
    fn tag(&self, tag: &str) -> Option<&'b Digest> {
        self.entries.iter().find_map(|e| e.tag(tag)).or_else(|| {
            self.exceptions
                .iter()
                .find(|x| x.tag.as_deref() == Some(tag))
                .map(|x| &x.digest)
        })
    }
}

/// The `repo_tags` and `repo_digests` a CRI client sees for an image containerd reports with these
/// names (see the module documentation for the rule). Order is kept; duplicates are dropped.
pub fn shown_names<'a>(
    repo_tags: impl IntoIterator<Item = &'a str>,
    repo_digests: impl IntoIterator<Item = &'a str>,
    bundle: &Bundle,
) -> (Vec<String>, Vec<String>) {
    fn push(list: &mut Vec<String>, name: String) {
        if !list.contains(&name) {
            list.push(name);
        }
    }
    let mut tags = Vec::new();
    for t in repo_tags {
        push(&mut tags, t.to_string());
    }
    let mut digests = Vec::new();
    let mut source_tags = Vec::new();
    for rd in repo_digests {
        match source_names(rd, bundle) {
            Some((source, bound)) => {
                push(&mut digests, source);
                source_tags.extend(bound);
            }
            None => push(&mut digests, rd.to_string()),
        }
    }
    for t in source_tags {
        push(&mut tags, t);
    }
    (tags, digests)
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

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    #[test]
    fn mirror_digests_show_as_their_source_with_the_bound_tags() {
        let b = crate::policy::testutil::example_bundle();
        let mirror = |repo: &str, n: u8| format!("registry.corp/approved/library/{repo}@{}", d(n));
        // nginx@01 is bound to 1.25 by two entries (scopes differ; names ignore scopes).
        let (tags, digests) = shown_names([], [mirror("nginx", 1).as_str()], &b);
        assert_eq!(tags, ["docker.io/library/nginx:1.25"]);
        assert_eq!(digests, [format!("docker.io/library/nginx@{}", d(1))]);
        // A bare approved digest: a source repo digest, no tag. Containerd's own tags stay first.
        let (tags, digests) = shown_names(
            ["registry.corp/apps/shared/x:1"],
            [mirror("busybox", 8).as_str(), mirror("busybox", 8).as_str()],
            &b,
        );
        assert_eq!(tags, ["registry.corp/apps/shared/x:1"]);
        assert_eq!(digests, [format!("docker.io/library/busybox@{}", d(8))]);
        // Not approved for its source (a tag moved away, or never approved), not a mirror path, not
        // the private registry: shown as containerd reports it.
        for other in [
            mirror("nginx", 9),
            format!("registry.corp/apps/shared/x@{}", d(1)),
            format!("docker.io/library/nginx@{}", d(1)),
            "not a reference".to_string(),
        ] {
            let (tags, digests) = shown_names([], [other.as_str()], &b);
            assert!(tags.is_empty(), "{other}: {tags:?}");
            assert_eq!(digests, std::slice::from_ref(&other));
        }
    }

    #[test]
    fn tags_and_digests_of_exceptions_are_named_like_approvals() {
        use crate::policy::testutil::v2_bundle_with;
        let mirror = |n: u8| format!("registry.corp/approved/library/redis@{}", d(n));
        // The format 2 example: redis:7.4 (digest 09) is allowed only through an exception.
        let b = v2_bundle_with(|_| {});
        for name in ["redis:7.4", &format!("docker.io/library/redis@{}", d(9))] {
            assert_eq!(
                resolve(name, &b).map(|r| r.pull_ref),
                Some(mirror(9)),
                "{name}"
            );
        }
        let (tags, digests) = shown_names([], [mirror(9).as_str()], &b);
        assert_eq!(tags, ["docker.io/library/redis:7.4"]);
        assert_eq!(digests, [format!("docker.io/library/redis@{}", d(9))]);
        for name in tags.iter().chain(&digests) {
            assert_eq!(
                resolve(name, &b).map(|r| r.pull_ref),
                Some(mirror(9)),
                "{name}"
            );
        }

        // A repository the bundle has no approval for at all, only an exception.
        let b = v2_bundle_with(|v| {
            let mut x = v["exceptions"][0].clone();
            x["source"] = "docker.io/library/memcached".into();
            x["digest"] = d(10).into();
            x["tag"] = "1.6".into();
            v["exceptions"].as_array_mut().unwrap().push(x);
        });
        let pinned = format!("registry.corp/approved/library/memcached@{}", d(10));
        assert_eq!(
            resolve("memcached:1.6", &b).map(|r| r.pull_ref),
            Some(pinned.clone())
        );
        assert_eq!(resolve("memcached:1.5", &b), None);
        let (tags, _) = shown_names([], [pinned.as_str()], &b);
        assert_eq!(tags, ["docker.io/library/memcached:1.6"]);
    }

    #[test]
    fn a_mirror_path_its_source_is_no_longer_copied_to_is_shown_as_it_is() {
        // docker.io/library/nginx is copied under `approved/` until a longer mirror source moves it.
        let b = crate::policy::testutil::v2_bundle_with(|v| {
            let moved = serde_json::json!({"source": "docker.io/library", "target": "library"});
            v["mirrors"].as_array_mut().unwrap().push(moved);
        });
        let held = format!("registry.corp/approved/library/nginx@{}", d(1));
        let (tags, digests) = shown_names([], [held.as_str()], &b);
        assert!(tags.is_empty(), "{tags:?}");
        assert_eq!(digests, std::slice::from_ref(&held));
        // Where the bundle copies it now, it shows its source names, and they resolve back to it.
        let now = format!("registry.corp/library/nginx@{}", d(1));
        let (tags, digests) = shown_names([], [now.as_str()], &b);
        assert_eq!(tags, ["docker.io/library/nginx:1.25"]);
        for name in tags.iter().chain(&digests) {
            assert_eq!(resolve(name, &b).map(|r| r.pull_ref), Some(now.clone()));
        }
    }

    #[test]
    fn every_shown_name_resolves_back_to_the_mirror_name() {
        let b = crate::policy::testutil::example_bundle();
        let pinned = format!("registry.corp/approved/library/nginx@{}", d(1));
        let (tags, digests) = shown_names([], [pinned.as_str()], &b);
        for name in tags.iter().chain(&digests) {
            assert_eq!(
                resolve(name, &b).map(|r| r.pull_ref),
                Some(pinned.clone()),
                "{name}"
            );
        }
    }

    #[test]
    fn the_memo_answers_as_worked_out_and_forgets_with_the_bundle() {
        use crate::policy::testutil::{EXAMPLE, example_bundle, example_now, sign, trust_2_of_3};
        use std::cell::Cell;
        let old = Arc::new(example_bundle());
        // The same bundle but for nginx's tag 1.25, now called 1.27.
        let moved = EXAMPLE.replace("\"1.25\":", "\"1.27\":");
        let new = Arc::new(
            crate::policy::verify_bundle(
                moved.as_bytes(),
                &sign(moved.as_bytes(), &[1, 2]),
                &trust_2_of_3(),
                None,
                example_now(),
            )
            .unwrap(),
        );
        let memo = Memo::default();
        for _ in 0..2 {
            let r = memo.resolve("nginx:1.25", &old);
            assert!(r.is_some());
            assert_eq!(r, resolve("nginx:1.25", &old));
        }
        assert_eq!(memo.resolve("nginx:1.25", &new), None, "1.25 is gone");
        assert!(memo.resolve("nginx:1.27", &new).is_some());
        assert!(memo.resolve("nginx:1.25", &old).is_some(), "back again");

        let works = &Cell::new(0);
        let show = |out: &'static [u8]| {
            move || {
                works.set(works.get() + 1);
                Some(out.to_vec())
            }
        };
        assert_eq!(memo.shown(b"image", &new, show(b"a")), Some(b"a".to_vec()));
        assert_eq!(memo.shown(b"image", &new, show(b"b")), Some(b"a".to_vec()));
        assert_eq!(works.get(), 1, "remembered");
        assert_eq!(memo.shown(b"image", &old, show(b"c")), Some(b"c".to_vec()));
        assert_eq!(works.get(), 2, "worked out again under another bundle");
        // Bounded.
        for i in 0..MEMO_MAX + 1 {
            memo.shown(format!("image {i}").as_bytes(), &old, || None);
        }
        assert!(memo.0.lock().unwrap().shown.len() <= MEMO_MAX);
        let long = vec![b'x'; MEMO_KEY_MAX + 1];
        memo.shown(&long, &old, show(b"d"));
        memo.shown(&long, &old, show(b"d"));
        assert_eq!(works.get(), 4, "too long to remember");
    }
}
