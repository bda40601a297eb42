//! jwt (Kong priority 1450): a signed token in a query argument, cookie or header,
//! verified with the credential named by its key claim (`iss` by default).
//!
//! The algorithm is the credential's, never the token's: a token whose header names
//! another algorithm (including `none`) is refused before any signature check, so an
//! RSA public key can never be used as an HMAC secret (algorithm confusion).
//! Signatures are checked by ring (HMAC comparisons are constant-time).

use std::collections::HashMap;

use http::{HeaderName, HeaderValue, StatusCode};
use ring::{hmac, signature};
use rustls::pki_types::pem::PemObject;
use serde_json::Value;
use tollgate_raft_store::plugins::JwtConfig;

use super::auth::{accept, percent_decode, use_anonymous, Identity};
use super::{Ctx, Env, Exit, Flow, Phases, Plugin, RequestView};

/// Longest token accepted, in bytes.
pub const TOKEN_BYTES_MAX: usize = 8 * 1024;

/// How a credential checks signatures, made when the snapshot compiles.
pub enum Verifier {
    Hmac(hmac::Key),
    Public(&'static dyn signature::VerificationAlgorithm, Vec<u8>),
}

/// A jwt credential as the data path holds it.
pub struct JwtCredential {
    pub identity: Identity,
    pub algorithm: String,
    pub verifier: Verifier,
}

impl JwtCredential {
    /// Builds the verifier; `Err` when the key material does not fit the algorithm.
    pub fn verifier(algorithm: &str, secret: &str, public_key: Option<&str>, base64: bool) -> Result<Verifier, String> {
        let hmac_key = |algorithm| -> Result<Verifier, String> {
            let secret = if base64 {
                base64_decode(secret, false).ok_or("secret is not base64")?
            } else {
                secret.as_bytes().to_vec()
            };
            Ok(Verifier::Hmac(hmac::Key::new(algorithm, &secret)))
        };
        let public = |algorithm: &'static dyn signature::VerificationAlgorithm| -> Result<Verifier, String> {
            let pem = public_key.ok_or("rsa_public_key is required for this algorithm")?;
            let spki = rustls::pki_types::SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes())
                .map_err(|error| format!("rsa_public_key: {error}"))?;
            let key = spki_public_key(spki.as_ref()).ok_or("rsa_public_key: not a SubjectPublicKeyInfo")?;
            Ok(Verifier::Public(algorithm, key.to_vec()))
        };
        match algorithm {
            "HS256" => hmac_key(hmac::HMAC_SHA256),
            "HS384" => hmac_key(hmac::HMAC_SHA384),
            "HS512" => hmac_key(hmac::HMAC_SHA512),
            "RS256" => public(&signature::RSA_PKCS1_2048_8192_SHA256),
            "RS384" => public(&signature::RSA_PKCS1_2048_8192_SHA384),
            "RS512" => public(&signature::RSA_PKCS1_2048_8192_SHA512),
            "PS256" => public(&signature::RSA_PSS_2048_8192_SHA256),
            "PS384" => public(&signature::RSA_PSS_2048_8192_SHA384),
            "PS512" => public(&signature::RSA_PSS_2048_8192_SHA512),
            "ES256" => public(&signature::ECDSA_P256_SHA256_FIXED),
            "ES384" => public(&signature::ECDSA_P384_SHA384_FIXED),
            "EdDSA" => public(&signature::ED25519),
            other => Err(format!("algorithm {other} is not supported")),
        }
    }
}

/// The subjectPublicKey bits of a DER SubjectPublicKeyInfo (what ring takes: an
/// RSAPublicKey, an uncompressed EC point, or an Ed25519 key).
fn spki_public_key(der: &[u8]) -> Option<&[u8]> {
    fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (length, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 3 || rest.len() < count {
                return None;
            }
            let length = rest[..count].iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (length, &rest[count..])
        };
        (rest.len() >= length).then(|| (tag, &rest[..length], &rest[length..]))
    }
    let (tag, spki, _) = element(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, _algorithm, rest) = element(spki)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, bits, _) = element(rest)?;
    if tag != 0x03 || bits.first() != Some(&0) {
        return None;
    }
    Some(&bits[1..])
}

/// base64url (no padding), or standard base64 when `url` is false; padding is
/// optional either way.
pub fn base64_decode(text: &str, url: bool) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' if url => 62,
            b'_' if url => 63,
            b'+' if !url => 62,
            b'/' if !url => 63,
            _ => return None,
        }))
    };
    let bytes = text.trim_end_matches('=').as_bytes();
    if bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut group = 0u32;
        for &c in chunk {
            group = (group << 6) | value(c)?;
        }
        group <<= 6 * (4 - chunk.len() as u32);
        let decoded = [(group >> 16) as u8, (group >> 8) as u8, group as u8];
        out.extend_from_slice(&decoded[..chunk.len() - 1]);
    }
    Some(out)
}

pub struct Jwt {
    config: JwtConfig,
    headers: Vec<HeaderName>,
    /// `WWW-Authenticate` without a token, and with a refused one (Kong's values).
    challenge: HeaderValue,
    challenge_invalid: HeaderValue,
}

/// The tokens a request carries.
enum Tokens {
    None,
    One(String),
    /// Different tokens in different places: which one counts is not the proxy's to
    /// guess (Kong: "Multiple tokens provided").
    Many,
}

impl Jwt {
    pub fn new(config: JwtConfig) -> Result<Jwt, String> {
        let headers = config
            .header_names
            .iter()
            .map(|name| HeaderName::from_bytes(name.as_bytes()).map_err(|error| error.to_string()))
            .collect::<Result<_, _>>()?;
        let base = match &config.realm {
            Some(realm) => format!("Bearer realm=\"{realm}\""),
            None => "Bearer".to_string(),
        };
        let invalid = match &config.realm {
            Some(_) => format!("{base}, error=\"invalid_token\""),
            None => "Bearer error=\"invalid_token\"".to_string(),
        };
        let challenge = HeaderValue::from_str(&base).map_err(|error| format!("realm: {error}"))?;
        let challenge_invalid = HeaderValue::from_str(&invalid).map_err(|error| format!("realm: {error}"))?;
        Ok(Jwt { config, headers, challenge, challenge_invalid })
    }

    /// The distinct non-empty tokens of every place Kong looks: each query argument of
    /// `uri_param_names` (every occurrence), the first cookie of each of
    /// `cookie_names`, the first line of each of `header_names` (`Bearer` or bare).
    fn tokens(&self, request: &RequestView<'_>) -> Tokens {
        let mut found: Option<String> = None;
        let mut add = |token: &str| -> bool {
            match &found {
                _ if token.is_empty() => true,
                Some(known) => known == token,
                None => {
                    found = Some(token.to_string());
                    true
                }
            }
        };
        if let Some(query) = request.query {
            for pair in query.split('&') {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                let key = percent_decode(key);
                if self.config.uri_param_names.contains(&key) && !add(&percent_decode(value)) {
                    return Tokens::Many;
                }
            }
        }
        for wanted in &self.config.cookie_names {
            let first = request
                .headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|cookies| cookies.split(';'))
                .map(|cookie| cookie.trim().split_once('=').unwrap_or((cookie.trim(), "")))
                .find(|(name, _)| name == wanted);
            if let Some((_, value)) = first {
                if !add(value) {
                    return Tokens::Many;
                }
            }
        }
        for name in &self.headers {
            if let Some(value) = request.headers.get(name).and_then(|v| v.to_str().ok()) {
                let value = value.trim();
                let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).unwrap_or(value);
                if !add(token.trim()) {
                    return Tokens::Many;
                }
            }
        }
        match found {
            Some(token) => Tokens::One(token),
            None => Tokens::None,
        }
    }

    /// Refuses the request (or lets the anonymous consumer in) with Kong's `body`;
    /// `invalid` when a token was there but refused.
    fn refuse(&self, ctx: &mut Ctx, request: &mut RequestView<'_>, env: &Env<'_>, body: Value, invalid: bool) -> Flow {
        if let Some(anonymous) = &self.config.anonymous {
            return use_anonymous(ctx, request, env, anonymous);
        }
        let mut exit = Exit::message(StatusCode::UNAUTHORIZED, "");
        exit.body = bytes::Bytes::from(body.to_string());
        let challenge = if invalid { &self.challenge_invalid } else { &self.challenge };
        exit.headers.push((http::header::WWW_AUTHENTICATE, challenge.clone()));
        Flow::Exit(exit)
    }

    /// Checks the token; `Err(body)` with Kong's error body.
    fn verify<'a>(
        &self,
        token: &str,
        credentials: &'a HashMap<String, JwtCredential>,
    ) -> Result<&'a JwtCredential, Value> {
        let message = |text: &str| serde_json::json!({ "message": text });
        if token.len() > TOKEN_BYTES_MAX {
            return Err(message("Bad token; too long"));
        }
        let mut parts = token.split('.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(message("Bad token; invalid JSON"));
        };
        let decode_json = |part: &str| -> Option<serde_json::Map<String, Value>> {
            serde_json::from_slice::<Value>(&base64_decode(part, true)?).ok()?.as_object().cloned()
        };
        let (Some(header_json), Some(claims_json)) = (decode_json(header), decode_json(claims)) else {
            return Err(message("Bad token; invalid JSON"));
        };
        let key_claim = &self.config.key_claim_name;
        let key = claims_json
            .get(key_claim)
            .or_else(|| header_json.get(key_claim))
            .and_then(Value::as_str)
            .ok_or_else(|| message(&format!("No mandatory '{key_claim}' in claims")))?;
        // spec/03-plugins/16-jwt/03-access_spec.lua:322: an empty one is invalid, not unknown.
        if key.is_empty() {
            return Err(message(&format!("Invalid '{key_claim}' in claims")));
        }
        let credential =
            credentials.get(key).ok_or_else(|| message(&format!("No credentials found for given '{key_claim}'")))?;
        // The credential decides the algorithm: `none`, or HS256 against an RSA key, is refused here.
        if header_json.get("alg").and_then(Value::as_str) != Some(credential.algorithm.as_str()) {
            return Err(message("Invalid algorithm"));
        }
        let signed = &token[..header.len() + 1 + claims.len()];
        let signature = base64_decode(signature, true).ok_or_else(|| message("Invalid signature"))?;
        let valid = match &credential.verifier {
            Verifier::Hmac(key) => hmac::verify(key, signed.as_bytes(), &signature).is_ok(),
            Verifier::Public(algorithm, key) => {
                signature::UnparsedPublicKey::new(*algorithm, key).verify(signed.as_bytes(), &signature).is_ok()
            }
        };
        if !valid {
            return Err(message("Invalid signature"));
        }
        let now = crate::clock::wall().as_secs_f64();
        let mut errors = serde_json::Map::new();
        for claim in &self.config.claims_to_verify {
            let value = claims_json.get(claim);
            let number = value.and_then(Value::as_f64);
            match (claim.as_str(), number) {
                // Kong's jwt_parser says the same of a missing claim as of one that is
                // not a number (spec/03-plugins/16-jwt/03-access_spec.lua:1136).
                (_, None) => {
                    errors.insert(claim.clone(), Value::from("must be a number"));
                }
                ("exp", Some(exp)) if exp <= now => {
                    errors.insert("exp".into(), Value::from("token expired"));
                }
                ("nbf", Some(nbf)) if nbf > now => {
                    errors.insert("nbf".into(), Value::from("token not valid yet"));
                }
                _ => {}
            }
        }
        if !errors.is_empty() {
            return Err(Value::Object(errors));
        }
        // Checked after the claims, and a token without `exp` fails it too, as Kong's
        // check_maximum_expiration (spec/03-plugins/16-jwt/03-access_spec.lua:430).
        if self.config.maximum_expiration > 0 {
            let exp = claims_json.get("exp").and_then(Value::as_f64);
            if exp.is_none_or(|exp| exp - now > self.config.maximum_expiration as f64) {
                errors.insert("exp".into(), Value::from("exceeds maximum allowed expiration"));
                return Err(Value::Object(errors));
            }
        }
        Ok(credential)
    }
}

impl Plugin for Jwt {
    fn phases(&self) -> Phases {
        Phases::NONE
    }

    fn access(&self, ctx: &mut Ctx, request: &mut RequestView<'_>, env: &Env<'_>) -> Flow {
        if !self.config.run_on_preflight && request.method == http::Method::OPTIONS {
            return Flow::Continue;
        }
        if self.config.anonymous.is_some() && ctx.consumer.is_some() && !ctx.anonymous {
            return Flow::Continue;
        }
        let token = match self.tokens(request) {
            Tokens::One(token) => token,
            Tokens::None => {
                return self.refuse(ctx, request, env, serde_json::json!({ "message": "Unauthorized" }), false);
            }
            Tokens::Many => {
                let body = serde_json::json!({ "message": "Multiple tokens provided" });
                return self.refuse(ctx, request, env, body, true);
            }
        };
        let credentials = if self.config.secret_is_base64 { &env.data.jwt_base64 } else { &env.data.jwt };
        match self.verify(&token, credentials) {
            Ok(credential) => {
                if !accept(ctx, request, env, &credential.identity, None) {
                    return self.refuse(ctx, request, env, serde_json::json!({ "message": "Unauthorized" }), true);
                }
                Flow::Continue
            }
            Err(body) => self.refuse(ctx, request, env, body, true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_decodes_with_and_without_padding() {
        assert_eq!(base64_decode("eyJhbGciOiJIUzI1NiJ9", true).as_deref(), Some(&br#"{"alg":"HS256"}"#[..]));
        assert_eq!(base64_decode("YQ", true).as_deref(), Some(&b"a"[..]));
        assert_eq!(base64_decode("YQ==", false).as_deref(), Some(&b"a"[..]));
        assert_eq!(base64_decode("-_", true).as_deref(), Some(&[0xfb][..]));
        assert_eq!(base64_decode("a", true), None);
        assert_eq!(base64_decode("+/", true), None);
    }
}
