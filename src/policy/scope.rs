//! Governance: organisation → program → project → application, namespace bindings, and modes.
//!
//! This module owns the scope tree of a bundle ([`Scopes`]), the resolution of a pod to its scope
//! ([`Scopes::pod_scope`]) and the enforcement [`Mode`] of each scope.
//!
//! Scopes are written as paths: `corp`, `corp/payments`, `corp/payments/checkout`,
//! `corp/payments/checkout/web`. A pod's scope comes from its namespace, which the bundle binds to a
//! project; the pod's application label (named by the bundle) can only narrow that to one of the
//! project's declared applications. Labels are never consulted for program or project, so a pod cannot
//! claim a wider scope than its namespace gives it. A namespace bound to no project (or no namespace at
//! all) is at organisation level. An image approved at a scope is available to that scope and every
//! scope below it.
//!
//! Modes (`enforce` or `warn`) are set on the organisation, programs and projects and inherited
//! downwards; applications always have their project's mode, so a pod label cannot relax enforcement.
//!
//! Format 2 bundles also give every level its effective scan and licence rule ([`Rules`], built and
//! checked for tightening by [`super::rules`]), inherited the same way; format 1 bundles have none.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

use super::rules::{RawRules, Rules};

/// Enforcement mode of a scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Denials are enforced.
    Enforce,
    /// Denials are reported but the image is allowed.
    Warn,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::Warn => "warn",
        })
    }
}

/// Index of a scope in [`Scopes`].
pub type ScopeId = u32;

/// The organisation scope's id.
pub const ORG: ScopeId = 0;

/// The `governance` object of a bundle, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGovernance {
    organization: String,
    application_label: String,
    #[serde(default)]
    mode: Option<Mode>,
    #[serde(default)]
    rules: Option<RawRules>,
    #[serde(default)]
    programs: Vec<RawProgram>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProgram {
    name: String,
    #[serde(default)]
    mode: Option<Mode>,
    #[serde(default)]
    rules: Option<RawRules>,
    #[serde(default)]
    projects: Vec<RawProject>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProject {
    name: String,
    #[serde(default)]
    mode: Option<Mode>,
    #[serde(default)]
    rules: Option<RawRules>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    applications: Vec<String>,
}

/// One node of the scope tree.
#[derive(Debug, Clone, PartialEq)]
pub struct ScopeNode {
    /// The full scope path, e.g. `corp/payments/checkout`.
    pub path: Arc<str>,
    /// The parent scope (none for the organisation).
    pub parent: Option<ScopeId>,
    /// The effective mode (after inheritance).
    pub mode: Mode,
    /// The effective scan and licence rule (format 2; `None` in format 1 bundles, which have none).
    pub rules: Option<Arc<Rules>>,
    /// Applications of a project, sorted by name.
    apps: Box<[(Box<str>, ScopeId)]>,
}

impl ScopeNode {
    /// A node as the compiled bundle stores it.
    pub(crate) fn new(
        path: Arc<str>,
        parent: Option<ScopeId>,
        mode: Mode,
        rules: Option<Arc<Rules>>,
        apps: Box<[(Box<str>, ScopeId)]>,
    ) -> ScopeNode {
        ScopeNode {
            path,
            parent,
            mode,
            rules,
            apps,
        }
    }

    /// Applications of a project (ids), sorted by name.
    pub(crate) fn apps(&self) -> &[(Box<str>, ScopeId)] {
        &self.apps
    }
}

/// The scope tree of a bundle, with namespace bindings.
#[derive(Debug, Clone, PartialEq)]
pub struct Scopes {
    nodes: Vec<ScopeNode>,
    by_path: HashMap<Arc<str>, ScopeId>,
    namespaces: HashMap<Box<str>, ScopeId>,
    application_label: String,
}

/// A problem in the governance section (message only; the bundle module adds context).
pub(crate) type GovernanceProblem = (&'static str, String);

fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn valid_label_key(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let nb = name.as_bytes();
    let name_ok = !nb.is_empty()
        && nb.len() <= 63
        && nb
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && nb[0].is_ascii_alphanumeric()
        && nb[nb.len() - 1].is_ascii_alphanumeric();
    let prefix_ok =
        prefix.is_none_or(|p| !p.is_empty() && p.len() <= 253 && p.split('.').all(valid_name));
    name_ok && prefix_ok
}

impl Scopes {
    /// Builds and validates the scope tree. `with_rules`: the bundle's format has rules (format 2);
    /// otherwise a `rules` field anywhere is rejected.
    pub(crate) fn build(raw: RawGovernance, with_rules: bool) -> Result<Scopes, GovernanceProblem> {
        let invalid = |what: String| ("invalid", what);
        let has_rules = raw.rules.is_some()
            || raw
                .programs
                .iter()
                .any(|p| p.rules.is_some() || p.projects.iter().any(|x| x.rules.is_some()));
        if has_rules && !with_rules {
            return Err((
                "malformed",
                "governance `rules` is a format 2 field, and this bundle says format 1; publish it as format 2".into(),
            ));
        }
        if !valid_name(&raw.organization) {
            return Err(invalid(format!(
                "governance.organization \"{}\" must be a lowercase DNS label (a-z, 0-9, '-', at most 63 characters)",
                raw.organization
            )));
        }
        if !valid_label_key(&raw.application_label) {
            return Err(invalid(format!(
                "governance.application_label \"{}\" is not a valid Kubernetes label key",
                raw.application_label
            )));
        }
        let mut s = Scopes {
            nodes: Vec::new(),
            by_path: HashMap::new(),
            namespaces: HashMap::new(),
            application_label: raw.application_label,
        };
        let org_mode = raw.mode.unwrap_or(Mode::Enforce);
        let org_rules = if with_rules {
            Some(Arc::new(
                Rules::organisation(raw.rules, &raw.organization).map_err(invalid)?,
            ))
        } else {
            None
        };
        let narrow =
            |parent: &Option<Arc<Rules>>, raw: Option<RawRules>, level: &str| match (parent, raw) {
                (Some(p), Some(r)) => p.child(Some(r), level, true).map(|r| Some(Arc::new(r))),
                (p, _) => Ok(p.clone()),
            };
        s.add(raw.organization.clone(), None, org_mode, org_rules.clone())?;
        for prog in raw.programs {
            if !valid_name(&prog.name) {
                return Err(invalid(format!(
                    "program name \"{}\" must be a lowercase DNS label",
                    prog.name
                )));
            }
            let prog_mode = prog.mode.unwrap_or(org_mode);
            let prog_path = format!("{}/{}", raw.organization, prog.name);
            let prog_rules = narrow(&org_rules, prog.rules, &prog_path).map_err(invalid)?;
            let prog_id = s.add(prog_path.clone(), Some(ORG), prog_mode, prog_rules.clone())?;
            for proj in prog.projects {
                if !valid_name(&proj.name) {
                    return Err(invalid(format!(
                        "project name \"{}\" in {prog_path} must be a lowercase DNS label",
                        proj.name
                    )));
                }
                let mode = proj.mode.unwrap_or(prog_mode);
                let proj_path = format!("{prog_path}/{}", proj.name);
                let rules = narrow(&prog_rules, proj.rules, &proj_path).map_err(invalid)?;
                let proj_id = s.add(proj_path.clone(), Some(prog_id), mode, rules.clone())?;
                let mut apps = Vec::new();
                for app in proj.applications {
                    if !valid_name(&app) {
                        return Err(invalid(format!(
                            "application name \"{app}\" in {proj_path} must be a lowercase DNS label"
                        )));
                    }
                    let id = s.add(
                        format!("{proj_path}/{app}"),
                        Some(proj_id),
                        mode,
                        rules.clone(),
                    )?;
                    apps.push((app.into_boxed_str(), id));
                }
                apps.sort();
                s.nodes[proj_id as usize].apps = apps.into_boxed_slice();
                for ns in proj.namespaces {
                    if !valid_name(&ns) {
                        return Err(invalid(format!(
                            "namespace \"{ns}\" bound to {proj_path} is not a valid Kubernetes namespace name"
                        )));
                    }
                    if let Some(&owner) = s.namespaces.get(ns.as_str()) {
                        let kind = if owner == proj_id {
                            "duplicate"
                        } else {
                            "conflict"
                        };
                        return Err((
                            kind,
                            format!(
                                "namespace \"{ns}\" is bound to {} and again to {proj_path}; a namespace belongs to exactly one project",
                                s.path(owner)
                            ),
                        ));
                    }
                    s.namespaces.insert(ns.into_boxed_str(), proj_id);
                }
            }
        }
        Ok(s)
    }

    fn add(
        &mut self,
        path: String,
        parent: Option<ScopeId>,
        mode: Mode,
        rules: Option<Arc<Rules>>,
    ) -> Result<ScopeId, GovernanceProblem> {
        let path: Arc<str> = path.into();
        let id = self.nodes.len() as ScopeId;
        if self.by_path.insert(path.clone(), id).is_some() {
            return Err((
                "duplicate",
                format!("scope {path} is declared twice in governance"),
            ));
        }
        self.nodes.push(ScopeNode {
            path,
            parent,
            mode,
            rules,
            apps: Box::new([]),
        });
        Ok(id)
    }

    /// What the compiled bundle stores: the nodes (in id order), the namespace bindings and the
    /// application label.
    pub(crate) fn parts(&self) -> (&[ScopeNode], &HashMap<Box<str>, ScopeId>, &str) {
        (&self.nodes, &self.namespaces, &self.application_label)
    }

    /// The tree from [`Scopes::parts`] again; `None` if two nodes have the same path.
    pub(crate) fn from_parts(
        nodes: Vec<ScopeNode>,
        namespaces: HashMap<Box<str>, ScopeId>,
        application_label: String,
    ) -> Option<Scopes> {
        let mut by_path = HashMap::with_capacity(nodes.len());
        for (id, n) in nodes.iter().enumerate() {
            if by_path.insert(n.path.clone(), id as ScopeId).is_some() {
                return None;
            }
        }
        Some(Scopes {
            nodes,
            by_path,
            namespaces,
            application_label,
        })
    }

    /// Looks up a scope by its path (`corp/payments`).
    pub fn lookup(&self, path: &str) -> Option<ScopeId> {
        self.by_path.get(path).copied()
    }

    /// The node for `id`.
    pub fn node(&self, id: ScopeId) -> &ScopeNode {
        &self.nodes[id as usize]
    }

    /// The path of scope `id`.
    pub fn path(&self, id: ScopeId) -> &Arc<str> {
        &self.nodes[id as usize].path
    }

    /// The organisation name.
    pub fn organization(&self) -> &str {
        &self.nodes[ORG as usize].path
    }

    /// The pod label naming the application.
    pub fn application_label(&self) -> &str {
        &self.application_label
    }

    /// Namespace bindings, sorted by namespace.
    pub fn namespace_bindings(&self) -> Vec<(&str, &str)> {
        let mut v: Vec<_> = self
            .namespaces
            .iter()
            .map(|(ns, id)| (&**ns, &*self.nodes[*id as usize].path))
            .collect();
        v.sort();
        v
    }

    /// All scopes, in declaration order.
    pub fn nodes(&self) -> &[ScopeNode] {
        &self.nodes
    }

    /// The scope of a pod: its namespace's project, narrowed to an application if the pod carries the
    /// application label with a value declared for that project; organisation level otherwise.
    pub fn pod_scope<'l>(
        &self,
        namespace: Option<&str>,
        mut label: impl FnMut(&str) -> Option<&'l str>,
    ) -> ScopeId {
        let Some(project) = namespace.and_then(|ns| self.namespaces.get(ns)).copied() else {
            return ORG;
        };
        let apps = &self.nodes[project as usize].apps;
        if apps.is_empty() {
            return project;
        }
        match label(&self.application_label) {
            Some(app) => match apps.binary_search_by(|(name, _)| (**name).cmp(app)) {
                Ok(i) => apps[i].1,
                Err(_) => project,
            },
            None => project,
        }
    }

    /// True when `ancestor` is `scope` or one of its ancestors (images approved at `ancestor` are
    /// available at `scope`).
    pub fn contains(&self, ancestor: ScopeId, scope: ScopeId) -> bool {
        let mut cur = Some(scope);
        while let Some(id) = cur {
            if id == ancestor {
                return true;
            }
            cur = self.nodes[id as usize].parent;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gov(json: &str) -> Result<Scopes, GovernanceProblem> {
        Scopes::build(serde_json::from_str(json).unwrap(), true)
    }

    const G: &str = r#"{"organization": "corp", "application_label": "corp.example/application",
        "programs": [
          {"name": "payments", "mode": "warn", "projects": [
            {"name": "checkout", "namespaces": ["checkout", "checkout-dev"], "applications": ["web", "worker"]},
            {"name": "ledger", "mode": "enforce", "namespaces": ["ledger"]}]},
          {"name": "search", "projects": [{"name": "index", "namespaces": ["search"]}]}]}"#;

    #[test]
    fn pod_scope_resolution_and_narrowing() {
        let s = gov(G).unwrap();
        let labels = |v: Option<&'static str>| {
            move |k: &str| {
                if k == "corp.example/application" {
                    v
                } else {
                    None
                }
            }
        };
        let scope = |ns: Option<&str>, app| s.path(s.pod_scope(ns, labels(app))).to_string();
        assert_eq!(scope(Some("checkout"), None), "corp/payments/checkout");
        assert_eq!(
            scope(Some("checkout"), Some("web")),
            "corp/payments/checkout/web"
        );
        assert_eq!(
            scope(Some("checkout"), Some("undeclared")),
            "corp/payments/checkout"
        );
        assert_eq!(scope(Some("ledger"), Some("web")), "corp/payments/ledger");
        assert_eq!(scope(Some("unbound"), Some("web")), "corp");
        assert_eq!(scope(None, None), "corp");
        let web = s.lookup("corp/payments/checkout/web").unwrap();
        assert!(s.contains(s.lookup("corp/payments").unwrap(), web));
        assert!(s.contains(ORG, web));
        assert!(!s.contains(s.lookup("corp/search").unwrap(), web));
        assert!(!s.contains(web, s.lookup("corp/payments/checkout").unwrap()));
    }

    #[test]
    fn modes_inherit_and_applications_follow_their_project() {
        let s = gov(G).unwrap();
        let mode = |p: &str| s.node(s.lookup(p).unwrap()).mode;
        assert_eq!(mode("corp"), Mode::Enforce);
        assert_eq!(mode("corp/payments/checkout"), Mode::Warn);
        assert_eq!(mode("corp/payments/checkout/web"), Mode::Warn);
        assert_eq!(mode("corp/payments/ledger"), Mode::Enforce);
        assert_eq!(mode("corp/search/index"), Mode::Enforce);
    }

    #[test]
    fn rules_are_inherited_by_every_level_and_applications() {
        let s = gov(r#"{"organization": "corp", "application_label": "app",
            "rules": {"min_scanners": 2, "licenses": {"deny": ["AGPL-3.0-only"]}},
            "programs": [{"name": "p", "rules": {"max_severity": "medium"}, "projects": [
              {"name": "x", "rules": {"min_scanners": 3}, "applications": ["web"]},
              {"name": "y"}]}]}"#)
        .unwrap();
        let rules = |p: &str| s.node(s.lookup(p).unwrap()).rules.clone().unwrap();
        let web = rules("corp/p/x/web");
        assert_eq!(web.min_scanners.value, 3);
        assert_eq!(&*web.min_scanners.from, "corp/p/x");
        assert_eq!(&*web.max_severity.from, "corp/p");
        assert_eq!(&*web.deny.as_ref().unwrap().from, "corp");
        assert_eq!(rules("corp/p/y").min_scanners.value, 2);
        assert_eq!(
            rules("corp").max_severity.value,
            super::super::bundle::Severity::High
        );
        let e = gov(r#"{"organization": "corp", "application_label": "app",
            "programs": [{"name": "p", "rules": {"max_severity": "low"}, "projects": [
              {"name": "x", "rules": {"max_severity": "medium"}}]}]}"#)
        .unwrap_err();
        assert_eq!(e.0, "invalid");
        assert!(
            e.1.contains("corp/p/x") && e.1.contains("rule of corp/p:"),
            "{}",
            e.1
        );
    }

    #[test]
    fn invalid_governance_is_rejected() {
        let e = gov(
            r#"{"organization": "corp", "application_label": "app", "programs": [
            {"name": "a", "projects": [{"name": "x", "namespaces": ["ns"]}]},
            {"name": "b", "projects": [{"name": "y", "namespaces": ["ns"]}]}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.0, "conflict");
        assert!(e.1.contains("\"ns\""), "{}", e.1);
        let e = gov(r#"{"organization": "corp", "application_label": "app", "programs": [{"name": "a"}, {"name": "a"}]}"#)
            .unwrap_err();
        assert_eq!(e.0, "duplicate");
        assert!(gov(r#"{"organization": "Corp", "application_label": "app"}"#).is_err());
        assert!(gov(r#"{"organization": "corp", "application_label": "bad key!"}"#).is_err());
        assert!(valid_label_key("app.kubernetes.io/name"));
        let e = Scopes::build(
            serde_json::from_str(r#"{"organization": "corp", "application_label": "app", "programs": [{"name": "a", "rules": {}}]}"#).unwrap(),
            false,
        )
        .unwrap_err();
        assert_eq!(e.0, "malformed");
        assert!(e.1.contains("format 2"), "{}", e.1);
        assert!(!valid_label_key("/name"));
    }
}
