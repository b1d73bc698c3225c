//! The pure policy core (issue 3): image references, the signed bundle, governance scopes, decisions.
