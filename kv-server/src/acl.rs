//! ACL: tokens and their rules on keys, the subset of Consul's ACL rules
//! this project needs, in Consul's own policy syntax:
//!
//! ```hcl
//! key_prefix "volumes/v1/hosts/h1/" { policy = "write" }
//! key_prefix "volumes/v1/"          { policy = "read" }
//! key        "volumes/v1/frozen"    { policy = "deny" }
//! ```
//!
//! As in Consul: an exact `key` rule beats every prefix rule; otherwise the
//! longest matching `key_prefix` wins; no match is a denial. `write`
//! includes `read`. Deleting a tree needs `write` on the prefix and on
//! every more specific rule below it (Consul's `KeyWritePrefix`).
//!
//! The file (`--acl-file`) is TOML: one `[[token]]` table per token with a
//! `name` (for the operator; never the secret), the secret as `secret` or
//! `secret_file`, and the `rules` text.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use consul_kv::SecretToken;
use serde::Deserialize;

/// What a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Policy {
    Deny,
    Read,
    Write,
}

impl Policy {
    fn parse(text: &str) -> Result<Policy, String> {
        match text {
            "deny" => Ok(Policy::Deny),
            "read" => Ok(Policy::Read),
            "write" => Ok(Policy::Write),
            "list" => Err("policy \"list\" is not supported here; use \"read\"".into()),
            other => Err(format!(
                "unknown policy {other:?} (expected \"read\", \"write\" or \"deny\")"
            )),
        }
    }
}

/// One token's rules on keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    exact: BTreeMap<String, Policy>,
    prefixes: BTreeMap<String, Policy>,
}

impl Rules {
    /// Everything allowed: what a token of `--acl-token-file` gets.
    pub fn write_all() -> Rules {
        let mut rules = Rules::default();
        rules.prefixes.insert(String::new(), Policy::Write);
        rules
    }

    /// Parses Consul policy text holding only `key` and `key_prefix` rules.
    pub fn parse(text: &str) -> Result<Rules, String> {
        let body = hcl::parse(text).map_err(|e| format!("rules are not valid HCL: {e}"))?;
        let mut rules = Rules::default();
        for structure in body.iter() {
            let block = match structure {
                hcl::Structure::Block(block) => block,
                hcl::Structure::Attribute(attribute) => {
                    return Err(format!(
                        "unexpected attribute {:?} at the top level of the rules",
                        attribute.key()
                    ))
                }
            };
            let kind = block.identifier();
            let table = match kind {
                "key" => &mut rules.exact,
                "key_prefix" => &mut rules.prefixes,
                other => {
                    return Err(format!(
                        "rule {other:?} is not supported: only \"key\" and \"key_prefix\" rules are"
                    ))
                }
            };
            let [label] = block.labels() else {
                return Err(format!("a {kind} rule needs exactly one quoted key"));
            };
            let key = label.as_str().to_owned();
            let mut policy = None;
            for inner in block.body().iter() {
                match inner {
                    hcl::Structure::Attribute(attribute) if attribute.key() == "policy" => {
                        let hcl::Expression::String(text) = attribute.expr() else {
                            return Err(format!("{kind} {key:?}: policy must be a string"));
                        };
                        policy =
                            Some(Policy::parse(text).map_err(|e| format!("{kind} {key:?}: {e}"))?);
                    }
                    _ => {
                        return Err(format!(
                            "{kind} {key:?}: only a policy attribute is supported"
                        ))
                    }
                }
            }
            let Some(policy) = policy else {
                return Err(format!("{kind} {key:?} has no policy"));
            };
            if table.insert(key.clone(), policy).is_some() {
                return Err(format!("{kind} {key:?} appears twice"));
            }
        }
        Ok(rules)
    }

    /// The policy for one key: exact rule, else longest prefix, else deny.
    pub fn policy(&self, key: &str) -> Policy {
        if let Some(policy) = self.exact.get(key) {
            return *policy;
        }
        self.prefixes
            .iter()
            .filter(|(prefix, _)| key.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map_or(Policy::Deny, |(_, policy)| *policy)
    }

    pub fn can_read(&self, key: &str) -> bool {
        self.policy(key) >= Policy::Read
    }

    pub fn can_write(&self, key: &str) -> bool {
        self.policy(key) == Policy::Write
    }

    /// Write on `prefix` and on every rule below it.
    pub fn can_write_prefix(&self, prefix: &str) -> bool {
        self.policy(prefix) == Policy::Write
            && self
                .exact
                .iter()
                .chain(&self.prefixes)
                .filter(|(key, _)| key.starts_with(prefix))
                .all(|(_, policy)| *policy == Policy::Write)
    }
}

/// A token the server accepts.
#[derive(Debug, Clone)]
pub struct TokenRules {
    /// Shown in logs and errors instead of the secret.
    pub name: String,
    pub secret: SecretToken,
    pub rules: Rules,
}

/// Why the ACL file cannot be used. Never holds a secret.
#[derive(Debug, thiserror::Error)]
pub enum AclFileError {
    #[error("cannot read ACL file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ACL file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToken {
    name: String,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    rules: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AclFile {
    #[serde(default)]
    token: Vec<FileToken>,
}

/// Reads an ACL file (format in the module doc).
pub fn read_acl_file(path: &Path) -> Result<Vec<TokenRules>, AclFileError> {
    let invalid = |reason: String| AclFileError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
        AclFileError::Read {
            path: path.to_owned(),
            source,
        }
    })?);
    let file: AclFile = toml::from_str(&text).map_err(|e| {
        // The parser's message may quote the line, which may hold a secret:
        // report only where and a message without quoted text.
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
        let message = e.message();
        let message = if message.contains('"') || message.contains('\'') {
            "not valid TOML for an ACL file"
        } else {
            message
        };
        match line {
            Some(line) => invalid(format!("line {line}: {message}")),
            None => invalid(message.to_owned()),
        }
    })?;
    if file.token.is_empty() {
        return Err(invalid("it defines no [[token]]".into()));
    }
    let mut tokens: Vec<TokenRules> = Vec::with_capacity(file.token.len());
    for entry in file.token {
        let name = entry.name;
        let secret = match (entry.secret, entry.secret_file) {
            (Some(secret), None) => zeroize::Zeroizing::new(secret),
            (None, Some(secret_path)) => zeroize::Zeroizing::new(
                std::fs::read_to_string(&secret_path)
                    .map_err(|e| {
                        invalid(format!(
                            "token {name:?}: cannot read secret_file {}: {e}",
                            secret_path.display()
                        ))
                    })?
                    .trim()
                    .to_owned(),
            ),
            _ => {
                return Err(invalid(format!(
                    "token {name:?}: give exactly one of secret and secret_file"
                )))
            }
        };
        if secret.trim().is_empty() {
            return Err(invalid(format!("token {name:?}: the secret is empty")));
        }
        let rules =
            Rules::parse(&entry.rules).map_err(|e| invalid(format!("token {name:?}: {e}")))?;
        let secret = SecretToken::new(secret.trim());
        if let Some(other) = tokens.iter().find(|t| t.secret.matches(secret.expose())) {
            return Err(invalid(format!(
                "tokens {:?} and {name:?} share one secret",
                other.name
            )));
        }
        tokens.push(TokenRules {
            name,
            secret,
            rules,
        });
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_beats_prefix_and_longest_prefix_wins() {
        let rules = Rules::parse(
            r#"
            key_prefix "" { policy = "read" }
            key_prefix "v/hosts/h1/" { policy = "write" }
            key_prefix "v/hosts/h1/secret/" { policy = "deny" }
            key "v/hosts/h1/secret/open" { policy = "read" }
            "#,
        )
        .unwrap();
        assert_eq!(rules.policy("anything"), Policy::Read);
        assert_eq!(rules.policy("v/hosts/h1/info"), Policy::Write);
        assert_eq!(rules.policy("v/hosts/h2/info"), Policy::Read);
        assert_eq!(rules.policy("v/hosts/h1/secret/x"), Policy::Deny);
        assert_eq!(rules.policy("v/hosts/h1/secret/open"), Policy::Read);
        assert!(rules.can_write("v/hosts/h1/ledger"));
        assert!(!rules.can_write("v/hosts/h2/ledger"));
        assert!(!rules.can_read("v/hosts/h1/secret/x"));
        // A tree delete needs write on everything below.
        assert!(!rules.can_write_prefix("v/hosts/h1/"));
        assert!(!rules.can_write_prefix("v/"));
        assert!(Rules::write_all().can_write_prefix(""));
    }

    #[test]
    fn no_rule_is_denial() {
        let rules = Rules::parse(r#"key_prefix "a/" { policy = "write" }"#).unwrap();
        assert_eq!(rules.policy("b"), Policy::Deny);
        assert_eq!(Rules::default().policy(""), Policy::Deny);
    }

    #[test]
    fn unsupported_rules_are_refused_by_name() {
        for (text, expected) in [
            (
                r#"session_prefix "" { policy = "write" }"#,
                "session_prefix",
            ),
            (r#"key_prefix "" { policy = "list" }"#, "list"),
            (r#"key_prefix "" { policy = "admin" }"#, "admin"),
            (r#"key_prefix "" { }"#, "no policy"),
            (
                "key_prefix \"\" { policy = \"read\" }\nkey_prefix \"\" { policy = \"write\" }",
                "twice",
            ),
            ("key_prefix {", "HCL"),
        ] {
            let error = Rules::parse(text).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn acl_file_errors_never_show_a_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acl.toml");
        for text in [
            "[[token]]\nname = \"a\"\nsecret = \"sup3r-s3cret\"\nrules = 'key_prefix \"\" { policy = \"nope\" }'\n",
            "[[token]]\nname = \"a\"\nsecret = \"sup3r-s3cret\nrules = ''\n",
            "[[token]]\nname = \"a\"\nsecret = \"sup3r-s3cret\"\nrule = ''\n",
            "[[token]]\nname = \"a\"\nsecret = \"sup3r-s3cret\"\nrules = ''\n[[token]]\nname = \"b\"\nsecret = \"sup3r-s3cret\"\nrules = ''\n",
        ] {
            std::fs::write(&path, text).unwrap();
            let error = read_acl_file(&path).unwrap_err();
            let shown = format!("{error} {error:?}");
            assert!(!shown.contains("sup3r"), "{shown}");
            assert!(shown.contains("acl.toml"), "{shown}");
        }
    }

    #[test]
    fn acl_file_with_secret_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("h1.token"), "h1-secret-value\n").unwrap();
        let path = dir.path().join("acl.toml");
        std::fs::write(
            &path,
            format!(
                "[[token]]\nname = \"volumed-h1\"\nsecret_file = \"{}\"\nrules = '''\nkey_prefix \"v/hosts/h1/\" {{ policy = \"write\" }}\n'''\n",
                dir.path().join("h1.token").display()
            ),
        )
        .unwrap();
        let tokens = read_acl_file(&path).unwrap();
        assert_eq!(tokens.len(), 1);
        assert!(tokens[0].secret.matches("h1-secret-value"));
        assert!(tokens[0].rules.can_write("v/hosts/h1/info"));
        assert!(!format!("{tokens:?}").contains("h1-secret-value"));
    }
}
