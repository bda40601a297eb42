//! A JSON value that travels through postcard.
//!
//! postcard is not self-describing, so it cannot carry `serde_json::Value` directly.
//! [`JsonValue`] is written as the JSON value itself in human-readable formats (JSON,
//! YAML) and as its JSON text in binary ones (postcard). [`JsonText`] is a document
//! that stays text until it is applied.

use std::sync::Arc;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct JsonValue(pub Value);

impl Serialize for JsonValue {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            self.0.serialize(serializer)
        } else {
            serializer.serialize_str(&self.0.to_string())
        }
    }
}

impl<'de> Deserialize<'de> for JsonValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            Value::deserialize(deserializer).map(JsonValue)
        } else {
            let text = String::deserialize(deserializer)?;
            serde_json::from_str(&text).map(JsonValue).map_err(D::Error::custom)
        }
    }
}

impl From<Value> for JsonValue {
    fn from(value: Value) -> Self {
        JsonValue(value)
    }
}

/// A JSON document kept as its text, parsed only where it is used.
///
/// A declarative config (`POST /config`) travels in one Raft entry, and openraft 0.9
/// gives each AppendEntries the heartbeat interval (50 ms by default) to be read from
/// the leader's log, sent, stored by the follower and answered. As a [`JsonValue`] the
/// entry was printed and parsed four times per attempt (read from the log, sent,
/// received, stored); a 20 000-route document took longer than the deadline on a
/// loaded host, and every retry sent it again (CI: `tests/tests/restart.rs` timed out
/// writing one). Kept as text it is copied, not parsed, until the state machine
/// applies it.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonText(Arc<str>);

impl JsonText {
    /// The document's JSON text, for parsing where it is applied.
    pub fn text(&self) -> &str {
        &self.0
    }

    /// The document, parsed.
    pub fn parse(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_str(&self.0)
    }
}

impl From<&Value> for JsonText {
    fn from(value: &Value) -> Self {
        JsonText(value.to_string().into())
    }
}

impl From<Value> for JsonText {
    fn from(value: Value) -> Self {
        JsonText::from(&value)
    }
}

impl Serialize for JsonText {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            self.parse().map_err(serde::ser::Error::custom)?.serialize(serializer)
        } else {
            serializer.serialize_str(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            Value::deserialize(deserializer).map(JsonText::from)
        } else {
            String::deserialize(deserializer).map(|text| JsonText(text.into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[cfg(feature = "storage")]
    #[test]
    fn json_text_round_trips_through_postcard_without_parsing() {
        let document = json!({"services": [{"name": "a", "url": "http://a:80"}]});
        let text = JsonText::from(&document);
        let bytes = postcard::to_allocvec(&text).expect("encodes");
        let back: JsonText = postcard::from_bytes(&bytes).expect("decodes");
        assert_eq!(back.parse().expect("parses"), document);
        // Binary formats carry the text as it was: not JSON that failed to parse.
        let broken = postcard::to_allocvec("{not json").expect("encodes");
        let kept: JsonText = postcard::from_bytes(&broken).expect("decodes as text");
        assert_eq!(kept.text(), "{not json");
        assert!(kept.parse().is_err());
    }

    #[test]
    fn json_text_is_the_document_itself_in_json() {
        let document = json!({"_format_version": "3.0", "consumers": [{"username": "alice"}]});
        let written = serde_json::to_value(JsonText::from(&document)).expect("encodes");
        assert_eq!(written, document);
        let read: JsonText = serde_json::from_value(document.clone()).expect("decodes");
        assert_eq!(read.parse().expect("parses"), document);
    }
}
