//! A JSON value that travels through postcard.
//!
//! postcard is not self-describing, so it cannot carry `serde_json::Value` directly.
//! [`JsonValue`] is written as the JSON value itself in human-readable formats (JSON,
//! YAML) and as its JSON text in binary ones (postcard).

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
