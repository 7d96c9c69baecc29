//! Scope names and hierarchical matching.
//!
//! A scope name is one or more segments separated by `:` (`read`,
//! `read:users`, `read:users:email`). A granted scope satisfies a required one
//! when it is `*`, when the two are equal, when the granted one is a whole-segment
//! prefix of the required one (`read` grants `read:users`, never `reader`), or
//! when it ends in `:*` and the required one is below it (`keysmith:*` grants
//! `keysmith:keys:read`).

use crate::error::{Error, Result};

/// Longest accepted scope name.
pub const MAX_SCOPE_LEN: usize = 128;

/// Checks a scope name, naming `field` in the error.
pub fn validate_scope_name(field: &str, name: &str) -> Result<()> {
    let bad = |reason: &str| Err(Error::invalid_input(field, format!("`{name}`: {reason}")));
    if name == "*" {
        return Ok(());
    }
    if name.is_empty() || name.len() > MAX_SCOPE_LEN {
        return bad("must be 1-128 characters");
    }
    let segments: Vec<&str> = name.split(':').collect();
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        if *segment == "*" && last && i > 0 {
            continue;
        }
        if segment.is_empty()
            || !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return bad("segments separated by `:` must be [A-Za-z0-9_.-]+ (`*` only as the last)");
        }
    }
    Ok(())
}

/// The parent of a scope name: everything before its last `:`.
pub fn parent_of(name: &str) -> Option<&str> {
    name.rsplit_once(':').map(|(parent, _)| parent)
}

/// Whether the `granted` scope satisfies the `required` one.
///
/// ```
/// use keysmith::scope::grants;
/// assert!(grants("read", "read:users"));
/// assert!(!grants("read", "reader"));
/// assert!(grants("*", "anything:at:all"));
/// assert!(grants("keysmith:*", "keysmith:keys:write"));
/// ```
pub fn grants(granted: &str, required: &str) -> bool {
    match granted.strip_suffix('*') {
        // `*` grants everything.
        Some("") => true,
        // `a:b:*` grants everything strictly below `a:b`.
        Some(stem) if stem.ends_with(':') => {
            required.len() > stem.len() && required.starts_with(stem)
        }
        // Otherwise equal, or a whole-segment prefix.
        _ => {
            required == granted
                || (required.len() > granted.len()
                    && required.starts_with(granted)
                    && required.as_bytes()[granted.len()] == b':')
        }
    }
}

/// Whether any of the `granted` scopes satisfies `required`.
pub fn any_grants<S: AsRef<str>>(granted: &[S], required: &str) -> bool {
    granted.iter().any(|g| grants(g.as_ref(), required))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_table() {
        // (granted, required, expected)
        let table = [
            ("read", "read", true),
            ("read", "read:users", true),
            ("read", "read:users:email", true),
            ("read:users", "read", false),
            ("read", "reader", false),
            ("read", "readers:all", false),
            ("read:users", "read:users2", false),
            ("*", "read", true),
            ("*", "*", true),
            ("read", "*", false),
            ("read:*", "read:users", true),
            ("read:*", "read", false),
            ("read:*", "reader:x", false),
            ("keysmith:*", "keysmith:keys:read", true),
            ("write", "read", false),
            ("", "read", false),
        ];
        for (granted, required, expected) in table {
            assert_eq!(
                grants(granted, required),
                expected,
                "{granted} vs {required}"
            );
        }
        assert!(any_grants(&["write", "read"], "read:users"));
        assert!(!any_grants::<&str>(&[], "read"));
    }

    #[test]
    fn names_are_checked() {
        for ok in [
            "read",
            "read:users",
            "a.b-c_d:e",
            "*",
            "keysmith:*",
            "Read:Users",
        ] {
            validate_scope_name("scope", ok).unwrap();
        }
        let long = "a".repeat(129);
        for bad in [
            "",
            ":",
            "read:",
            ":read",
            "read::users",
            "re ad",
            "*:read",
            "re*d",
            long.as_str(),
            "read:*:x",
        ] {
            let err = validate_scope_name("scopes[0]", bad).unwrap_err();
            assert!(
                matches!(err, Error::InvalidInput { ref field, .. } if field == "scopes[0]"),
                "{bad}"
            );
        }
    }

    #[test]
    fn parents() {
        assert_eq!(parent_of("read:users:email"), Some("read:users"));
        assert_eq!(parent_of("read"), None);
    }
}
