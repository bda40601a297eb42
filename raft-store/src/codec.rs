//! Binary frames: one format version byte, then postcard.
//!
//! Everything Tollgate writes to disk or sends between nodes goes through here, so a
//! node can tell a frame it does not understand from a corrupt one, and a later format
//! can be read alongside this one.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The version byte of frames this build writes.
/// 2: `ca_certificates` became an entity kind, which renumbers the kinds after
/// certificates; version-1 data from pre-release builds is refused, not misread.
/// 3: snapshots carry the quota ledger, and commands may be quota grants.
/// 4: commands carry a write id, snapshots the writes applied lately by id, and
/// forwarded leader requests the term the sender saw the receiver lead in.
pub const FORMAT_VERSION: u8 = 4;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty frame")]
    Empty,
    #[error("frame format version {found} is not supported (this build reads {FORMAT_VERSION})")]
    Version { found: u8 },
    #[error("malformed frame: {0}")]
    Postcard(#[from] postcard::Error),
}

pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut frame = vec![FORMAT_VERSION];
    frame = postcard::to_extend(value, frame)?;
    Ok(frame)
}

pub fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = frame.split_first().ok_or(CodecError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(CodecError::Version { found: version });
    }
    Ok(postcard::from_bytes(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, Op};
    use crate::schema::EntityKind;

    #[test]
    fn commands_round_trip_with_json_bodies() {
        let command = Command {
            now_s: 12,
            write_id: Some(crate::command::WriteId(u128::MAX - 1)),
            op: Op::Create {
                kind: EntityKind::Plugin,
                id: uuid::Uuid::new_v4(),
                parent: None,
                body: serde_json::json!({"name": "cors", "config": {"origins": ["*"], "max_age": 3600}}).into(),
            },
        };
        let frame = encode(&command).unwrap();
        assert_eq!(frame[0], FORMAT_VERSION);
        assert_eq!(decode::<Command>(&frame).unwrap(), command);
    }

    #[test]
    fn unknown_version_and_garbage_are_errors() {
        assert!(matches!(decode::<Command>(&[9, 1, 2]), Err(CodecError::Version { found: 9 })));
        assert!(matches!(decode::<Command>(&[]), Err(CodecError::Empty)));
        assert!(decode::<Command>(&[FORMAT_VERSION, 0xff, 0xff, 0xff]).is_err());
    }
}
