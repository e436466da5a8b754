//! ACL tokens: wiped from memory on drop, never shown by `Debug`.

use zeroize::Zeroizing;

/// An ACL token. `Debug` prints `<redacted>`; there is no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretToken(Zeroizing<String>);

impl SecretToken {
    pub fn new(token: impl Into<String>) -> Self {
        SecretToken(Zeroizing::new(token.into()))
    }

    /// The token text, for the one place that sends or compares it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Comparison whose time does not depend on where the texts differ.
    pub fn matches(&self, candidate: &str) -> bool {
        use subtle::ConstantTimeEq as _;
        // Unequal lengths answer at once: the length is no secret worth
        // hiding, the content is.
        self.0.as_bytes().ct_eq(candidate.as_bytes()).into()
    }
}

impl std::fmt::Debug for SecretToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretToken(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_token() {
        let token = SecretToken::new("s3cr3t-token");
        assert!(!format!("{token:?}").contains("s3cr3t"));
        assert!(token.matches("s3cr3t-token"));
        assert!(!token.matches("s3cr3t-tokeX"));
        assert!(!token.matches("s3cr3t"));
    }
}
