//! basic-auth, and how its passwords are kept.
//!
//! A password is stored only as a salted PBKDF2-HMAC-SHA256 hash
//! (`$pbkdf2-sha256$i=<iterations>$<salt hex>$<hash hex>`), made by the Admin API node
//! before the write is proposed (the state machine draws no randomness and does no
//! slow work). A value already in that form is kept, so a `GET /config` dump loads
//! back unchanged. The Admin API shows only the hash.
//!
//! Verifying a hash is deliberately slow, so it never runs on a proxy worker: a
//! password not seen before is checked on tokio's blocking pool, at most
//! [`VERIFY_CONCURRENCY_MAX`] at once (past that, 503), and a success is remembered in
//! the node's [`VerifiedCache`] by a SHA-256 digest of the stored hash and the password
//! (the password itself is never kept). Comparisons are constant-time (ring).
//!
//! Two things an attacker could learn or take:
//! - Which usernames exist, from the time an answer takes: an unknown username is
//!   checked against a decoy hash of the same cost, so it is refused no faster.
//! - The verification slots, by flooding wrong passwords: one client address has at
//!   most [`VERIFY_PER_CLIENT_MAX`] check running (more get 429 at once, at no cost),
//!   so one flooding client leaves the other slots to everyone else. Many flooding
//!   addresses can still fill them; that is a denial of service for a rate limit or
//!   firewall in front of the gateway.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};

use http::{HeaderValue, StatusCode};
use ring::{digest, pbkdf2, rand::SecureRandom};
use tokio::sync::Semaphore;
use tollgate_raft_store::plugins::BasicAuthConfig;

use super::auth::{accept, authorization, use_anonymous, Identity};
use super::jwt::base64_decode;
use super::{Ctx, Env, Exit, Flow, Phases, Plugin, RequestView};
use crate::text::{hex, unhex};

/// PBKDF2 rounds for new hashes: about 30 ms of one core per hash here. OWASP asks
/// for more (600 000) for password databases; these credentials are API secrets behind
/// a verified cache, and every first use costs this much.
pub const PBKDF2_ITERATIONS: u32 = 100_000;
const SALT_BYTES: usize = 16;
const HASH_PREFIX: &str = "$pbkdf2-sha256$";
/// Passwords being verified at once per node; past this, 503 (a flood of wrong
/// passwords must not queue unbounded work).
pub const VERIFY_CONCURRENCY_MAX: usize = 4;
/// Passwords of one client address being verified at once; past this, 429.
pub const VERIFY_PER_CLIENT_MAX: usize = 1;
/// Verified (credential, password) digests a node remembers; past this it starts over.
pub const VERIFIED_CACHE_MAX: usize = 100_000;

/// A basic-auth credential as the data path holds it.
pub struct Credential {
    pub identity: Identity,
    pub hash: String,
}

/// Whether `value` is already a stored hash.
pub fn is_hashed(value: &str) -> bool {
    value.starts_with(HASH_PREFIX)
}

/// A new salted hash of `password`.
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; SALT_BYTES];
    ring::rand::SystemRandom::new().fill(&mut salt).map_err(|_| "no randomness for a salt".to_string())?;
    let mut hash = [0u8; digest::SHA256_OUTPUT_LEN];
    let iterations = NonZeroU32::new(PBKDF2_ITERATIONS).expect("non-zero");
    pbkdf2::derive(pbkdf2::PBKDF2_HMAC_SHA256, iterations, &salt, password.as_bytes(), &mut hash);
    Ok(format!("{HASH_PREFIX}i={PBKDF2_ITERATIONS}${}${}", hex(&salt), hex(&hash)))
}

/// Checks `password` against a stored hash, in constant time.
pub fn verify_password(stored: &str, password: &str) -> bool {
    let Some(rest) = stored.strip_prefix(HASH_PREFIX) else { return false };
    let mut parts = rest.split('$');
    let (Some(iterations), Some(salt), Some(hash), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let Some(iterations) = iterations.strip_prefix("i=").and_then(|i| i.parse().ok()).and_then(NonZeroU32::new) else {
        return false;
    };
    let (Some(salt), Some(hash)) = (unhex(salt), unhex(hash)) else { return false };
    pbkdf2::verify(pbkdf2::PBKDF2_HMAC_SHA256, iterations, &salt, password.as_bytes(), &hash).is_ok()
}

/// A hash of a random password, made once: what an unknown username's password is
/// checked against, so that refusing it takes as long as refusing a wrong one.
fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| {
        let mut password = [0u8; 32];
        let _ = ring::rand::SystemRandom::new().fill(&mut password);
        hash_password(&hex(&password)).unwrap_or_else(|_| format!("{HASH_PREFIX}i={PBKDF2_ITERATIONS}$00$00"))
    })
}

/// Successful verifications a node remembers, and the limits on verifications running.
pub struct VerifiedCache {
    digests: RwLock<HashSet<[u8; 32]>>,
    running: Arc<Semaphore>,
    /// Client addresses with a verification running (at most
    /// [`VERIFY_CONCURRENCY_MAX`] of them, one permit each).
    clients: Arc<RwLock<HashSet<std::net::IpAddr>>>,
}

impl Default for VerifiedCache {
    fn default() -> Self {
        VerifiedCache {
            digests: RwLock::default(),
            running: Arc::new(Semaphore::new(VERIFY_CONCURRENCY_MAX)),
            clients: Arc::default(),
        }
    }
}

/// One running verification: a node-wide permit and the client's place, both given
/// back when dropped.
struct VerifySlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    client: std::net::IpAddr,
    clients: Arc<RwLock<HashSet<std::net::IpAddr>>>,
}

impl Drop for VerifySlot {
    fn drop(&mut self) {
        if let Ok(mut clients) = self.clients.write() {
            clients.remove(&self.client);
        }
    }
}

/// Why no verification could start.
enum Busy {
    /// This client already has one running.
    Client,
    /// Every slot of the node is taken.
    Node,
}

impl VerifiedCache {
    fn key(stored: &str, password: &str) -> [u8; 32] {
        let mut context = digest::Context::new(&digest::SHA256);
        context.update(stored.as_bytes());
        context.update(&[0]);
        context.update(password.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(context.finish().as_ref());
        key
    }

    fn contains(&self, key: &[u8; 32]) -> bool {
        self.digests.read().is_ok_and(|digests| digests.contains(key))
    }

    /// A slot for `client`'s verification.
    fn slot(&self, client: std::net::IpAddr) -> Result<VerifySlot, Busy> {
        const { assert!(VERIFY_PER_CLIENT_MAX == 1, "the client set counts one each") };
        let Ok(mut clients) = self.clients.write() else { return Err(Busy::Node) };
        if clients.contains(&client) {
            return Err(Busy::Client);
        }
        let permit = self.running.clone().try_acquire_owned().map_err(|_| Busy::Node)?;
        clients.insert(client);
        Ok(VerifySlot { _permit: permit, client, clients: self.clients.clone() })
    }

    fn remember(&self, key: [u8; 32]) {
        if let Ok(mut digests) = self.digests.write() {
            if digests.len() >= VERIFIED_CACHE_MAX {
                digests.clear();
            }
            digests.insert(key);
        }
    }
}

/// basic-auth (Kong priority 1100).
pub struct BasicAuth {
    config: BasicAuthConfig,
    challenge: HeaderValue,
}

impl BasicAuth {
    pub fn new(config: BasicAuthConfig) -> Result<BasicAuth, String> {
        let challenge =
            HeaderValue::from_str(&format!("Basic realm=\"{}\"", config.realm)).map_err(|e| e.to_string())?;
        Ok(BasicAuth { config, challenge })
    }

    fn unauthorized(&self, message: &str) -> Flow {
        let mut exit = Exit::message(StatusCode::UNAUTHORIZED, message);
        exit.headers.push((http::header::WWW_AUTHENTICATE, self.challenge.clone()));
        Flow::Exit(exit)
    }

    /// The anonymous consumer, or `refusal`.
    fn anonymous_or(&self, ctx: &mut Ctx, request: &mut RequestView<'_>, env: &Env<'_>, refusal: &str) -> Flow {
        match &self.config.anonymous {
            Some(anonymous) => use_anonymous(ctx, request, env, anonymous),
            None => self.unauthorized(refusal),
        }
    }
}

impl Plugin for BasicAuth {
    fn phases(&self) -> Phases {
        Phases::NONE
    }

    fn access(&self, ctx: &mut Ctx, request: &mut RequestView<'_>, env: &Env<'_>) -> Flow {
        if self.config.anonymous.is_some() && ctx.consumer.is_some() && !ctx.anonymous {
            return Flow::Continue;
        }
        let Some((header_name, value)) = authorization(request.headers) else {
            return self.anonymous_or(ctx, request, env, "Unauthorized");
        };
        let decoded = value
            .strip_prefix("Basic ")
            .or_else(|| value.strip_prefix("basic "))
            .and_then(|encoded| base64_decode(encoded, false))
            .and_then(|bytes| String::from_utf8(bytes).ok());
        let Some((username, password)) = decoded.as_deref().and_then(|text| text.split_once(':')) else {
            return self.anonymous_or(ctx, request, env, "Invalid authentication credentials");
        };
        // An unknown username is checked too, against the decoy: its refusal takes
        // as long as a wrong password's.
        let credential = env.data.basic.get(username);
        let verified = match ctx.verified.take() {
            Some(answer) => answer,
            None if credential.is_some_and(|c| env.verified.contains(&VerifiedCache::key(&c.hash, password))) => true,
            None => {
                let slot = match env.verified.slot(ctx.client_ip) {
                    Ok(slot) => slot,
                    Err(Busy::Client) => {
                        let mut exit = Exit::message(
                            StatusCode::TOO_MANY_REQUESTS,
                            "a password check of this client is in progress; retry shortly",
                        );
                        exit.headers.push((http::header::RETRY_AFTER, HeaderValue::from_static("1")));
                        return Flow::Exit(exit);
                    }
                    Err(Busy::Node) => {
                        return Flow::Exit(Exit::message(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "too many password checks in progress; retry shortly",
                        ));
                    }
                };
                let stored = credential.map(|c| c.hash.clone());
                let password = password.to_string();
                return Flow::Verify(Box::pin(async move {
                    let checked = crate::env::blocking(move || match &stored {
                        Some(stored) => verify_password(stored, &password),
                        None => {
                            verify_password(decoy_hash(), &password);
                            false
                        }
                    })
                    .await;
                    drop(slot);
                    checked.unwrap_or(false)
                }));
            }
        };
        let Some(credential) = credential.filter(|_| verified) else {
            return self.anonymous_or(ctx, request, env, "Invalid authentication credentials");
        };
        let key = VerifiedCache::key(&credential.hash, password);
        env.verified.remember(key);
        let hide = self.config.hide_credentials.then_some(header_name);
        if !accept(ctx, request, env, &credential.identity, hide) {
            return self.unauthorized("Invalid authentication credentials");
        }
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_differ_by_salt() {
        let first = hash_password("s3cret").unwrap();
        let second = hash_password("s3cret").unwrap();
        assert!(is_hashed(&first));
        assert_ne!(first, second, "salted");
        assert!(!first.contains("s3cret"));
        assert!(verify_password(&first, "s3cret"));
        assert!(!verify_password(&first, "s3creT"));
        assert!(!verify_password("$pbkdf2-sha256$i=0$00$00", "x"));
        assert!(!verify_password("plain", "plain"));
    }

    #[test]
    fn base64_decodes_basic_credentials() {
        assert_eq!(base64_decode("YWxpY2U6czNjcmV0", false).as_deref(), Some(&b"alice:s3cret"[..]));
        assert_eq!(base64_decode("YWI=", false).as_deref(), Some(&b"ab"[..]));
        assert_eq!(base64_decode("Y!==", false), None);
    }
}
