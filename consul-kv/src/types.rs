//! Types shared by client and server, with Consul's JSON shapes.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One KV entry, as Consul returns it (`GET /v1/kv/...` and txn results).
///
/// Wire form: `{"LockIndex","Key","Flags","Value","Session"?,"CreateIndex",
/// "ModifyIndex"}`; `Value` is standard base64, `null` when empty.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct KvPair {
    #[serde(default)]
    pub lock_index: u64,
    pub key: String,
    #[serde(default)]
    pub flags: u64,
    #[serde(default, with = "base64_value")]
    pub value: Vec<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default)]
    pub create_index: u64,
    #[serde(default)]
    pub modify_index: u64,
}

/// `Value` as Consul writes it: base64 text, or `null` for an empty value.
pub mod base64_value {
    use super::*;

    pub fn serialize<S: Serializer>(value: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        if value.is_empty() {
            serializer.serialize_none()
        } else {
            serializer.serialize_str(&BASE64.encode(value))
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text: Option<String> = Option::deserialize(deserializer)?;
        match text {
            None => Ok(Vec::new()),
            Some(text) => BASE64
                .decode(text.as_bytes())
                .map_err(|e| serde::de::Error::custom(format!("Value is not base64: {e}"))),
        }
    }
}

/// One operation of `PUT /v1/txn` (the KV verbs this project uses).
///
/// Session verbs (`lock`, `unlock`, `check-session`) are left out: the
/// bundled server has no sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// Unconditional write.
    Set {
        key: String,
        value: Vec<u8>,
        flags: u64,
    },
    /// Write only if the key's `ModifyIndex` is `index`; 0 means create-only.
    Cas {
        key: String,
        value: Vec<u8>,
        flags: u64,
        index: u64,
    },
    /// Read a key; fails the transaction when it does not exist.
    Get { key: String },
    /// Read a key; a missing key yields an entry with an empty value.
    GetOrEmpty { key: String },
    /// Read every key under a prefix (one result per key).
    GetTree { prefix: String },
    /// Fails unless the key exists with this `ModifyIndex`.
    CheckIndex { key: String, index: u64 },
    /// Fails if the key exists.
    CheckNotExists { key: String },
    /// Delete a key (a missing key is not an error).
    Delete { key: String },
    /// Delete every key under a prefix.
    DeleteTree { prefix: String },
    /// Delete only if the key's `ModifyIndex` is `index`.
    DeleteCas { key: String, index: u64 },
}

impl TxnOp {
    /// Consul's verb name.
    pub fn verb(&self) -> &'static str {
        match self {
            TxnOp::Set { .. } => "set",
            TxnOp::Cas { .. } => "cas",
            TxnOp::Get { .. } => "get",
            TxnOp::GetOrEmpty { .. } => "get-or-empty",
            TxnOp::GetTree { .. } => "get-tree",
            TxnOp::CheckIndex { .. } => "check-index",
            TxnOp::CheckNotExists { .. } => "check-not-exists",
            TxnOp::Delete { .. } => "delete",
            TxnOp::DeleteTree { .. } => "delete-tree",
            TxnOp::DeleteCas { .. } => "delete-cas",
        }
    }

    /// The key or prefix the operation names.
    pub fn key(&self) -> &str {
        match self {
            TxnOp::Set { key, .. }
            | TxnOp::Cas { key, .. }
            | TxnOp::Get { key }
            | TxnOp::GetOrEmpty { key }
            | TxnOp::CheckIndex { key, .. }
            | TxnOp::CheckNotExists { key }
            | TxnOp::Delete { key }
            | TxnOp::DeleteCas { key, .. } => key,
            TxnOp::GetTree { prefix } | TxnOp::DeleteTree { prefix } => prefix,
        }
    }

    /// The wire form: `{"KV":{"Verb","Key","Value","Flags","Index"}}`.
    pub fn to_wire(&self) -> serde_json::Value {
        let (value, flags, index) = match self {
            TxnOp::Set { value, flags, .. } => (Some(value.as_slice()), *flags, 0),
            TxnOp::Cas {
                value,
                flags,
                index,
                ..
            } => (Some(value.as_slice()), *flags, *index),
            TxnOp::CheckIndex { index, .. } | TxnOp::DeleteCas { index, .. } => (None, 0, *index),
            _ => (None, 0, 0),
        };
        let value = match value {
            Some(bytes) if !bytes.is_empty() => serde_json::Value::String(BASE64.encode(bytes)),
            _ => serde_json::Value::Null,
        };
        serde_json::json!({
            "KV": {
                "Verb": self.verb(),
                "Key": self.key(),
                "Value": value,
                "Flags": flags,
                "Index": index,
            }
        })
    }
}

/// One result of a successful transaction (`{"KV": {...}}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResult {
    #[serde(rename = "KV")]
    pub kv: KvPair,
}

/// One failing operation of a refused transaction (HTTP 409).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnOpError {
    /// Position of the operation in the request, from 0.
    #[serde(rename = "OpIndex")]
    pub op_index: usize,
    /// Consul's reason, e.g. `failed to set key "a", index is stale`.
    #[serde(rename = "What")]
    pub what: String,
}

/// Body of `PUT /v1/txn` answers, 200 and 409 alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TxnResponseBody {
    pub results: Option<Vec<TxnResult>>,
    pub errors: Option<Vec<TxnOpError>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_wire_form_matches_consul() {
        let pair = KvPair {
            key: "vol/1".into(),
            value: vec![0xff, 0x00, b'a'],
            flags: 7,
            create_index: 3,
            modify_index: 9,
            ..KvPair::default()
        };
        let text = serde_json::to_string(&pair).unwrap();
        assert_eq!(
            text,
            r#"{"LockIndex":0,"Key":"vol/1","Flags":7,"Value":"/wBh","CreateIndex":3,"ModifyIndex":9}"#
        );
        assert_eq!(serde_json::from_str::<KvPair>(&text).unwrap(), pair);
    }

    #[test]
    fn null_value_is_empty() {
        let pair: KvPair = serde_json::from_str(
            r#"{"LockIndex":0,"Key":"k","Flags":0,"Value":null,"CreateIndex":1,"ModifyIndex":1,"Namespace":"default"}"#,
        )
        .unwrap();
        assert!(pair.value.is_empty());
        let text = serde_json::to_string(&pair).unwrap();
        assert!(text.contains(r#""Value":null"#), "{text}");
    }

    #[test]
    fn txn_op_wire_form() {
        let op = TxnOp::Cas {
            key: "a".into(),
            value: b"hi".to_vec(),
            flags: 1,
            index: 5,
        };
        assert_eq!(
            op.to_wire(),
            serde_json::json!({"KV":{"Verb":"cas","Key":"a","Value":"aGk=","Flags":1,"Index":5}})
        );
    }
}
