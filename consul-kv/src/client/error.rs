//! Client errors. None of them carries a token: requests send it only in a
//! header, and transport errors are stripped of their URL.

use crate::types::TxnOpError;

/// Longest part of an answer body kept in an error.
const MAX_BODY_IN_ERROR: usize = 512;

/// What went wrong talking to Consul. `path` is the request path without
/// its query (key names, never tokens).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid Consul client configuration: {0}")]
    Config(String),

    /// No answer: connection refused or reset, DNS, TLS, timeout.
    #[error("{method} {path}: no answer from Consul: {source}")]
    Transport {
        method: &'static str,
        path: String,
        #[source]
        source: reqwest::Error,
    },

    /// 403: token unknown (`ACL not found`) or lacking rights.
    #[error("{method} {path}: ACL denied: {message}")]
    AclDenied {
        method: &'static str,
        path: String,
        message: String,
    },

    /// 413: value or transaction over the server's limits.
    #[error("{method} {path}: request too large: {message}")]
    TooLarge {
        method: &'static str,
        path: String,
        message: String,
    },

    /// 409 from `/v1/txn`: nothing was written; every failing operation is
    /// listed.
    #[error("transaction refused: {}", describe_failures(.failures))]
    TxnConflict { failures: Vec<TxnOpError> },

    /// Any other unexpected status.
    #[error("{method} {path}: HTTP {status}: {body}")]
    Status {
        method: &'static str,
        path: String,
        status: u16,
        body: String,
    },

    /// An answer that is not what Consul sends.
    #[error("{method} {path}: cannot decode the answer: {reason}")]
    Decode {
        method: &'static str,
        path: String,
        reason: String,
    },
}

fn describe_failures(failures: &[TxnOpError]) -> String {
    failures
        .iter()
        .map(|f| format!("op {}: {}", f.op_index, f.what))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    /// The failing operations of a refused transaction.
    pub fn txn_failures(&self) -> Option<&[TxnOpError]> {
        match self {
            Error::TxnConflict { failures } => Some(failures),
            _ => None,
        }
    }

    /// True when Consul could not be reached at all (worth retrying).
    pub fn is_transport(&self) -> bool {
        matches!(self, Error::Transport { .. })
    }
}

/// The start of an answer body, as text, for an error message.
pub(crate) fn body_excerpt(body: &[u8]) -> String {
    let cut = body.len().min(MAX_BODY_IN_ERROR);
    let mut text = String::from_utf8_lossy(&body[..cut]).trim().to_owned();
    if body.len() > cut {
        text.push_str(" …");
    }
    text
}
