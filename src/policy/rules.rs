//! Scan and licence rules of the governance levels (format 2 bundles): parsing, inheritance with the
//! only-tighten check, and the check of an image's provenance against the rule of a pod's scope.
//!
//! A level (organisation, program, project) may write `rules`; what it does not write it inherits from
//! the level above, and the organisation's defaults are [`DEFAULT_MIN_SCANNERS`] and
//! [`DEFAULT_MAX_SEVERITY`]. A field a level writes replaces the inherited value and must be at least as
//! strict (`min_scanners` ≥, `max_severity` ≤, `allow` ⊆, `deny` ⊇), so reading one level's rule tells
//! the whole story and no level can loosen what is above it. Applications have their project's rules.
//!
//! [`Rules::check`] is pure: provenance and a parsed licence expression in, a [`Violation`] out.

use std::sync::Arc;

use serde::Deserialize;

use super::bundle::{Provenance, Severity};
use super::license::{self, LicenseExpression};

/// `min_scanners` at organisation level when the bundle does not set it.
pub const DEFAULT_MIN_SCANNERS: u32 = 2;
/// `max_severity` at organisation level when the bundle does not set it: a critical finding refuses an
/// image, anything less does not until a level tightens it.
pub const DEFAULT_MAX_SEVERITY: Severity = Severity::High;
/// The largest `min_scanners` accepted (a sanity bound, far above any real fleet's scanners).
pub const MAX_MIN_SCANNERS: u32 = 32;

/// `rules` as written at one level.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRules {
    min_scanners: Option<u32>,
    max_severity: Option<Severity>,
    licenses: Option<RawLicenses>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLicenses {
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
}

/// A value of the effective rule and the level that set it (`corp (default)` for a default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set<T> {
    /// The value.
    pub value: T,
    /// The scope path of the level that wrote it.
    pub from: Arc<str>,
}

/// The effective rule of a scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// Distinct scanners needed.
    pub min_scanners: Set<u32>,
    /// Worst severity a scan may report.
    pub max_severity: Set<Severity>,
    /// Licences allowed (sorted); `None`: every licence not denied.
    pub allow: Option<Set<Box<[String]>>>,
    /// Licences denied (sorted).
    pub deny: Option<Set<Box<[String]>>>,
}

/// Why an image does not meet a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// A scan reports a severity above the maximum.
    Severity {
        scanner: Arc<str>,
        version: Arc<str>,
        severity: Severity,
        max: Severity,
        from: Arc<str>,
    },
    /// Too few distinct scanners.
    Scanners {
        have: Vec<Arc<str>>,
        need: u32,
        from: Arc<str>,
    },
    /// The licence expression cannot be satisfied.
    License {
        expression: Arc<str>,
        /// Licences of the expression that are not permitted, each with the level that refuses it.
        refused: Vec<(String, Arc<str>)>,
    },
}

impl Rules {
    /// The organisation's rule: what it writes, defaults for the rest.
    pub(crate) fn organisation(raw: Option<RawRules>, org: &str) -> Result<Rules, String> {
        let default_from: Arc<str> = format!("{org} (default)").into();
        let base = Rules {
            min_scanners: Set {
                value: DEFAULT_MIN_SCANNERS,
                from: default_from.clone(),
            },
            max_severity: Set {
                value: DEFAULT_MAX_SEVERITY,
                from: default_from,
            },
            allow: None,
            deny: None,
        };
        // The defaults are not a parent: the organisation may set any value.
        base.child(raw, org, false)
    }

    /// The rule of a level below `self` that writes `raw`. With `tighten_only`, a field that loosens
    /// the inherited one is an error naming both levels.
    pub(crate) fn child(
        &self,
        raw: Option<RawRules>,
        level: &str,
        tighten_only: bool,
    ) -> Result<Rules, String> {
        let Some(raw) = raw else {
            return Ok(self.clone());
        };
        let from: Arc<str> = level.into();
        let loosens = |parent: &Arc<str>, what: String| {
            format!(
                "governance rule of {level} loosens the rule of {parent}: {what}; a lower level may only tighten"
            )
        };
        let mut out = self.clone();
        if let Some(n) = raw.min_scanners {
            if n == 0 || n > MAX_MIN_SCANNERS {
                return Err(format!(
                    "governance rule of {level}: min_scanners is {n}; it must be 1..={MAX_MIN_SCANNERS}"
                ));
            }
            if tighten_only && n < self.min_scanners.value {
                return Err(loosens(
                    &self.min_scanners.from,
                    format!("min_scanners {n} is below {}", self.min_scanners.value),
                ));
            }
            out.min_scanners = Set {
                value: n,
                from: from.clone(),
            };
        }
        if let Some(s) = raw.max_severity {
            if tighten_only && s > self.max_severity.value {
                return Err(loosens(
                    &self.max_severity.from,
                    format!("max_severity {s} is above {}", self.max_severity.value),
                ));
            }
            out.max_severity = Set {
                value: s,
                from: from.clone(),
            };
        }
        let licences = raw.licenses.unwrap_or_default();
        if let Some(list) = licences.allow {
            let list = identifiers(list, level, "allow")?;
            if let Some(parent) = self.allow.as_ref().filter(|_| tighten_only) {
                if let Some(extra) = list.iter().find(|l| !parent.value.contains(l)) {
                    return Err(loosens(
                        &parent.from,
                        format!("licenses.allow adds {extra}, which that level does not allow"),
                    ));
                }
            }
            out.allow = Some(Set {
                value: list,
                from: from.clone(),
            });
        }
        if let Some(list) = licences.deny {
            let list = identifiers(list, level, "deny")?;
            if let Some(parent) = self.deny.as_ref().filter(|_| tighten_only) {
                if let Some(dropped) = parent.value.iter().find(|l| !list.contains(l)) {
                    return Err(loosens(
                        &parent.from,
                        format!("licenses.deny drops {dropped}, which that level denies"),
                    ));
                }
            }
            out.deny = Some(Set {
                value: list,
                from: from.clone(),
            });
        }
        // A level that writes both lists must not contradict itself (a deny below an inherited allow
        // is a tightening, not a contradiction).
        fn own<'s>(
            s: &'s Option<Set<Box<[String]>>>,
            from: &str,
        ) -> Option<&'s Set<Box<[String]>>> {
            s.as_ref().filter(|s| &*s.from == from)
        }
        if let (Some(a), Some(d)) = (own(&out.allow, &from), own(&out.deny, &from)) {
            if let Some(both) = a.value.iter().find(|l| d.value.contains(l)) {
                return Err(format!(
                    "governance rule of {level}: licence {both} is both allowed (by {}) and denied (by {}); decide which",
                    a.from, d.from
                ));
            }
        }
        Ok(out)
    }

    /// Whether licence `l` (as [`LicenseExpression::licences`] names it) is permitted; if not, the
    /// level that refuses it.
    fn refused_by(&self, l: &str) -> Option<&Arc<str>> {
        if let Some(d) = self
            .deny
            .as_ref()
            .filter(|d| d.value.iter().any(|x| x == l))
        {
            return Some(&d.from);
        }
        match &self.allow {
            Some(a) if !a.value.iter().any(|x| x == l) => Some(&a.from),
            _ => None,
        }
    }

    /// Checks an image's provenance: severity first (any scan above the maximum), then the number of
    /// distinct scanners, then the licence.
    pub fn check(
        &self,
        provenance: &Provenance,
        license: Option<&LicenseExpression>,
    ) -> Result<(), Violation> {
        let max = self.max_severity.value;
        if let Some(s) = provenance
            .scans
            .iter()
            .filter(|s| s.worst_severity > max)
            .max_by_key(|s| s.worst_severity)
        {
            return Err(Violation::Severity {
                scanner: s.scanner.clone(),
                version: s.version.clone(),
                severity: s.worst_severity,
                max,
                from: self.max_severity.from.clone(),
            });
        }
        let mut have: Vec<Arc<str>> = Vec::with_capacity(provenance.scans.len());
        for s in provenance.scans.iter() {
            if !have.contains(&s.scanner) {
                have.push(s.scanner.clone());
            }
        }
        if (have.len() as u32) < self.min_scanners.value {
            return Err(Violation::Scanners {
                have,
                need: self.min_scanners.value,
                from: self.min_scanners.from.clone(),
            });
        }
        if let Some(expr) = license {
            if (self.allow.is_some() || self.deny.is_some())
                && !expr.satisfied_by(|l| self.refused_by(l).is_none())
            {
                let refused = expr
                    .licences()
                    .into_iter()
                    .filter_map(|l| self.refused_by(&l).cloned().map(|from| (l, from)))
                    .collect();
                return Err(Violation::License {
                    expression: provenance.license.clone(),
                    refused,
                });
            }
        }
        Ok(())
    }

    /// One line for `bundle inspect` and `bundle diff`.
    pub fn summary(&self) -> String {
        let list = |s: &Option<Set<Box<[String]>>>| match s {
            Some(s) => format!("[{}] (from {})", s.value.join(", "), s.from),
            None => "-".to_owned(),
        };
        format!(
            "min_scanners {} (from {}), max_severity {} (from {}), licences allow {}, deny {}",
            self.min_scanners.value,
            self.min_scanners.from,
            self.max_severity.value,
            self.max_severity.from,
            list(&self.allow),
            list(&self.deny)
        )
    }
}

fn identifiers(list: Vec<String>, level: &str, which: &str) -> Result<Box<[String]>, String> {
    let mut out = Vec::with_capacity(list.len());
    for l in list {
        let id = license::parse_identifier(&l).map_err(|e| {
            format!(
                "governance rule of {level}: licenses.{which} entry \"{}\": {e}",
                l.chars().take(80).collect::<String>()
            )
        })?;
        if out.contains(&id) {
            return Err(format!(
                "governance rule of {level}: licenses.{which} lists {id} twice"
            ));
        }
        out.push(id);
    }
    out.sort();
    Ok(out.into_boxed_slice())
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::Severity {
                scanner,
                version,
                severity,
                max,
                from,
            } => write!(
                f,
                "scanner {scanner} {version} reports worst severity {severity}, above the maximum {max} set by {from}"
            ),
            Violation::Scanners { have, need, from } => {
                let names: Vec<&str> = have.iter().map(|s| &**s).collect();
                write!(
                    f,
                    "it has passing results from {} distinct scanner(s) ({}) but {from} requires {need}",
                    have.len(),
                    names.join(", ")
                )
            }
            Violation::License {
                expression,
                refused,
            } => {
                let parts: Vec<String> = refused
                    .iter()
                    .map(|(l, from)| format!("{l} is not allowed by {from}"))
                    .collect();
                write!(
                    f,
                    "its licence \"{expression}\" cannot be satisfied: {}",
                    parts.join(", ")
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::bundle::Scan;
    use crate::policy::testutil::digest;

    fn raw(json: &str) -> Option<RawRules> {
        Some(serde_json::from_str(json).unwrap())
    }

    fn prov(license: &str, scans: &[(&str, Severity)]) -> Provenance {
        Provenance {
            license: license.into(),
            scans: scans
                .iter()
                .map(|(n, s)| Scan {
                    scanner: (*n).into(),
                    version: "1".into(),
                    report: digest(1),
                    worst_severity: *s,
                })
                .collect(),
            approved_by: "a".into(),
            approved_at: 0,
        }
    }

    fn check(r: &Rules, p: &Provenance) -> Result<(), Violation> {
        let e = LicenseExpression::parse(&p.license).unwrap();
        r.check(p, Some(&e))
    }

    #[test]
    fn defaults_and_inheritance() {
        let org = Rules::organisation(None, "corp").unwrap();
        assert_eq!(org.min_scanners.value, 2);
        assert_eq!(org.max_severity.value, Severity::High);
        assert_eq!(&*org.min_scanners.from, "corp (default)");
        let prog = org
            .child(raw(r#"{"max_severity": "medium"}"#), "corp/p", true)
            .unwrap();
        let proj = prog.child(None, "corp/p/x", true).unwrap();
        assert_eq!(proj.max_severity.value, Severity::Medium);
        assert_eq!(&*proj.max_severity.from, "corp/p");
        assert_eq!(proj.min_scanners.value, 2);
        // The organisation may go below the defaults (the trust file's floor is checked elsewhere).
        let low = Rules::organisation(
            raw(r#"{"min_scanners": 1, "max_severity": "critical"}"#),
            "corp",
        )
        .unwrap();
        assert_eq!(low.min_scanners.value, 1);
    }

    #[test]
    fn a_lower_level_may_only_tighten() {
        let org = Rules::organisation(
            raw(r#"{"min_scanners": 2, "max_severity": "high",
                "licenses": {"allow": ["MIT", "Apache-2.0"], "deny": ["AGPL-3.0-only"]}}"#),
            "corp",
        )
        .unwrap();
        let cases = [
            (r#"{"min_scanners": 1}"#, "min_scanners 1 is below 2"),
            (
                r#"{"max_severity": "critical"}"#,
                "max_severity critical is above high",
            ),
            (r#"{"licenses": {"allow": ["MIT", "Zlib"]}}"#, "adds Zlib"),
            (
                r#"{"licenses": {"deny": ["GPL-3.0-only"]}}"#,
                "drops AGPL-3.0-only",
            ),
        ];
        for (json, want) in cases {
            let e = org.child(raw(json), "corp/payments", true).unwrap_err();
            assert!(e.contains(want), "{e}");
            assert!(
                e.contains("corp/payments") && e.contains("loosens the rule of corp"),
                "{e}"
            );
        }
        let tight = org
            .child(
                raw(r#"{"min_scanners": 3, "max_severity": "low",
                    "licenses": {"allow": ["MIT"], "deny": ["AGPL-3.0-only", "GPL-3.0-only"]}}"#),
                "corp/payments",
                true,
            )
            .unwrap();
        assert_eq!(tight.min_scanners.value, 3);
        // Without a parent allow list, a level may introduce one.
        let open = Rules::organisation(None, "corp").unwrap();
        assert!(
            open.child(raw(r#"{"licenses": {"allow": ["Zlib"]}}"#), "corp/x", true)
                .is_ok()
        );
        let e = open
            .child(
                raw(r#"{"licenses": {"allow": ["MIT"], "deny": ["MIT"]}}"#),
                "corp/x",
                true,
            )
            .unwrap_err();
        assert!(e.contains("both allowed"), "{e}");
        let e = open
            .child(
                raw(r#"{"licenses": {"allow": ["GPL-2.0"]}}"#),
                "corp/x",
                true,
            )
            .unwrap_err();
        assert!(e.contains("GPL-2.0") && e.contains("corp/x"), "{e}");
        let e = open
            .child(raw(r#"{"min_scanners": 0}"#), "corp/x", true)
            .unwrap_err();
        assert!(e.contains("1..=32"), "{e}");
    }

    #[test]
    fn checks_severity_then_scanners_then_licence() {
        use Severity::{Critical, High, Low};
        let org = Rules::organisation(
            raw(r#"{"licenses": {"allow": ["MIT", "Apache-2.0", "LicenseRef-acme"], "deny": ["AGPL-3.0-only"]}}"#),
            "corp",
        )
        .unwrap();
        assert!(check(&org, &prov("MIT", &[("trivy", Low), ("grype", High)])).is_ok());
        match check(&org, &prov("MIT", &[("trivy", Low), ("grype", Critical)])) {
            Err(Violation::Severity {
                scanner,
                severity: Critical,
                max: High,
                ..
            }) => {
                assert_eq!(&*scanner, "grype")
            }
            other => panic!("{other:?}"),
        }
        // Two results of one scanner count once.
        match check(
            &org,
            &prov("MIT", &[("trivy", Low), ("trivy", Severity::None)]),
        ) {
            Err(Violation::Scanners {
                have,
                need: 2,
                from,
            }) => {
                assert_eq!(have.len(), 1);
                assert_eq!(&*from, "corp (default)");
            }
            other => panic!("{other:?}"),
        }
        let two = [("trivy", Low), ("grype", Low)];
        assert!(check(&org, &prov("MIT OR AGPL-3.0-only", &two)).is_ok());
        assert!(check(&org, &prov("LicenseRef-acme", &two)).is_ok());
        let e = check(&org, &prov("MIT AND AGPL-3.0-only", &two)).unwrap_err();
        assert!(
            e.to_string()
                .contains("AGPL-3.0-only is not allowed by corp"),
            "{e}"
        );
        let e = check(&org, &prov("Zlib", &two)).unwrap_err();
        assert!(
            matches!(&e, Violation::License { refused, .. } if refused[0].0 == "Zlib"),
            "{e}"
        );
        let proj = org
            .child(
                raw(r#"{"licenses": {"deny": ["AGPL-3.0-only", "Apache-2.0"]}}"#),
                "corp/p/x",
                true,
            )
            .unwrap();
        assert!(check(&proj, &prov("MIT OR Apache-2.0", &two)).is_ok());
        let e = check(&proj, &prov("Apache-2.0", &two)).unwrap_err();
        assert!(
            e.to_string()
                .contains("Apache-2.0 is not allowed by corp/p/x"),
            "{e}"
        );
        // No licence rule at all: anything goes, LicenseRef included.
        let open = Rules::organisation(None, "corp").unwrap();
        assert!(check(&open, &prov("LicenseRef-x AND GPL-3.0-only", &two)).is_ok());
    }
}
