//! TLS on `--proxy-tls-listen`: certificates and SNIs from the replicated config,
//! chosen per handshake from the current snapshot, so a certificate written through
//! the Admin API serves new connections without a restart.
//!
//! Lookup: the exact SNI name, then a wildcard `*.rest` for the name's parent domain.
//! A handshake whose name matches no SNI entity is refused (Kong would serve its
//! default self-signed certificate; Tollgate has none to serve).

use std::collections::HashMap;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use serde_json::Value;
use tollgate_raft_store::state::{entity_id, foreign_id, ConfigState};
use tollgate_raft_store::EntityKind;

/// Certificates by SNI name, compiled into each snapshot.
#[derive(Default)]
pub struct Certificates {
    by_name: HashMap<String, Arc<CertifiedKey>>,
}

/// Which half of a certificate and key pair is unusable, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairError {
    Cert(String),
    Key(String),
}

impl std::fmt::Display for PairError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PairError::Cert(why) => write!(f, "cert: {why}"),
            PairError::Key(why) => write!(f, "key: {why}"),
        }
    }
}

/// Parses a certificate chain and key from PEM, as the Admin API stores them.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, PairError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|error| PairError::Cert(error.to_string()))?;
    if chain.is_empty() {
        return Err(PairError::Cert("no certificate in the PEM".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|error| PairError::Key(error.to_string()))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|error| PairError::Key(format!("unsupported key: {error}")))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|error| PairError::Key(format!("does not match the certificate: {error}")))?;
    Ok(certified)
}

impl Certificates {
    pub fn compile(state: &ConfigState) -> Certificates {
        let mut keys = HashMap::new();
        for certificate in state.table(EntityKind::Certificate).values() {
            let cert = certificate.get("cert").and_then(Value::as_str).unwrap_or_default();
            let key = certificate.get("key").and_then(Value::as_str).unwrap_or_default();
            match certified_key(cert, key) {
                Ok(certified) => {
                    keys.insert(entity_id(certificate), Arc::new(certified));
                }
                Err(error) => tracing::warn!(certificate = %entity_id(certificate), %error, "certificate not usable"),
            }
        }
        let mut by_name = HashMap::new();
        for sni in state.table(EntityKind::Sni).values() {
            let (Some(name), Some(certificate)) =
                (sni.get("name").and_then(Value::as_str), foreign_id(sni, "certificate"))
            else {
                continue;
            };
            if let Some(key) = keys.get(&certificate) {
                by_name.insert(name.to_ascii_lowercase(), key.clone());
            }
        }
        Certificates { by_name }
    }

    pub fn find(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        let name = server_name.to_ascii_lowercase();
        if let Some(exact) = self.by_name.get(&name) {
            return Some(exact.clone());
        }
        let (_, parent) = name.split_once('.')?;
        self.by_name.get(&format!("*.{parent}")).cloned()
    }
}
