//! hmac-auth (Kong priority 1030): requests signed with a shared secret.
//!
//! `Authorization: hmac username="u", algorithm="hmac-sha256", headers="date
//! request-line", signature="<base64>"`. The signing string is one line per listed
//! header, `name: value`, with `request-line` standing for `METHOD path HTTP/1.1`,
//! joined by `\n`. `Date` (or `X-Date`) must be present and within `clock_skew` of the
//! node's clock, and signed, so a captured request cannot be replayed later. The
//! signature is compared in constant time (ring).

use http::{HeaderName, HeaderValue, StatusCode};
use ring::hmac;
use tollgate_raft_store::plugins::HmacAuthConfig;

use super::auth::{accept, authorization, use_anonymous, Identity};
use super::jwt::base64_decode;
use super::{Ctx, Env, Exit, Flow, Phases, Plugin, RequestView};

/// An hmac-auth credential as the data path holds it.
pub struct HmacCredential {
    pub identity: Identity,
    pub secret: String,
}

/// The parts of an `hmac` authorization header.
#[derive(Debug, Default, PartialEq)]
struct Signed {
    username: String,
    algorithm: String,
    headers: Vec<String>,
    signature: String,
}

fn parse_authorization(value: &str) -> Option<Signed> {
    let rest = value.strip_prefix("hmac ").or_else(|| value.strip_prefix("HMAC "))?;
    let mut signed = Signed::default();
    for part in rest.split(',') {
        let (name, quoted) = part.trim().split_once('=')?;
        let value = quoted.trim().strip_prefix('"')?.strip_suffix('"')?.to_string();
        match name.trim() {
            "username" => signed.username = value,
            "algorithm" => signed.algorithm = value,
            "headers" => signed.headers = value.split_whitespace().map(str::to_ascii_lowercase).collect(),
            "signature" => signed.signature = value,
            _ => {}
        }
    }
    (!signed.username.is_empty() && !signed.signature.is_empty()).then_some(signed)
}

pub struct HmacAuth {
    config: HmacAuthConfig,
    challenge: HeaderValue,
}

impl HmacAuth {
    pub fn new(config: HmacAuthConfig) -> Result<HmacAuth, String> {
        let realm = config.realm.as_deref().unwrap_or("kong");
        let challenge = HeaderValue::from_str(&format!("hmac realm=\"{realm}\"")).map_err(|e| e.to_string())?;
        Ok(HmacAuth { config, challenge })
    }

    fn refuse(&self, ctx: &mut Ctx, request: &mut RequestView<'_>, env: &Env<'_>, message: &str) -> Flow {
        if let Some(anonymous) = &self.config.anonymous {
            return use_anonymous(ctx, request, env, anonymous);
        }
        let mut exit = Exit::message(StatusCode::UNAUTHORIZED, message);
        exit.headers.push((http::header::WWW_AUTHENTICATE, self.challenge.clone()));
        Flow::Exit(exit)
    }

    /// The date header the request carries, if it is within the allowed skew.
    fn date_ok(&self, request: &RequestView<'_>) -> bool {
        let date = request.headers.get("x-date").or_else(|| request.headers.get(http::header::DATE));
        let Some(date) = date.and_then(|v| v.to_str().ok()).and_then(|v| httpdate::parse_http_date(v).ok()) else {
            return false;
        };
        let now = crate::clock::wall_time();
        let skew = match now.duration_since(date) {
            Ok(behind) => behind,
            Err(ahead) => ahead.duration(),
        };
        skew.as_secs() <= self.config.clock_skew
    }
}

const DIGEST: HeaderName = HeaderName::from_static("digest");

impl Plugin for HmacAuth {
    fn phases(&self) -> Phases {
        Phases::NONE
    }

    fn access(&self, ctx: &mut Ctx, request: &mut RequestView<'_>, env: &Env<'_>) -> Flow {
        if self.config.anonymous.is_some() && ctx.consumer.is_some() && !ctx.anonymous {
            return Flow::Continue;
        }
        let Some((header_name, value)) = authorization(request.headers) else {
            return self.refuse(ctx, request, env, "Unauthorized");
        };
        let Some(signed) = parse_authorization(&value) else {
            return self.refuse(ctx, request, env, "Unauthorized");
        };
        if !self.date_ok(request) {
            return self.refuse(
                ctx,
                request,
                env,
                "HMAC signature cannot be verified, a valid date or x-date header is required for HMAC Authentication",
            );
        }
        let signs_date = signed.headers.iter().any(|h| h == "date" || h == "x-date");
        let enforced = self.config.enforce_headers.iter().all(|h| signed.headers.contains(&h.to_ascii_lowercase()));
        if !signs_date || !enforced || !self.config.algorithms.contains(&signed.algorithm) {
            return self.refuse(ctx, request, env, "HMAC signature cannot be verified");
        }
        let Some(credential) = env.data.hmac.get(&signed.username) else {
            return self.refuse(ctx, request, env, "HMAC signature cannot be verified");
        };
        let algorithm = match signed.algorithm.as_str() {
            "hmac-sha1" => hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
            "hmac-sha384" => hmac::HMAC_SHA384,
            "hmac-sha512" => hmac::HMAC_SHA512,
            _ => hmac::HMAC_SHA256,
        };
        let mut lines = Vec::with_capacity(signed.headers.len());
        for name in &signed.headers {
            if name == "request-line" {
                let target = match request.query {
                    Some(query) => format!("{}?{query}", request.path),
                    None => request.path.to_string(),
                };
                lines.push(format!("{} {target} HTTP/1.1", request.method));
                continue;
            }
            let value = HeaderName::from_bytes(name.as_bytes())
                .ok()
                .and_then(|header| request.headers.get(header))
                .and_then(|v| v.to_str().ok());
            let Some(value) = value else {
                return self.refuse(ctx, request, env, "HMAC signature cannot be verified");
            };
            lines.push(format!("{name}: {value}"));
        }
        let key = hmac::Key::new(algorithm, credential.secret.as_bytes());
        let signature = base64_decode(&signed.signature, false).unwrap_or_default();
        if hmac::verify(&key, lines.join("\n").as_bytes(), &signature).is_err() {
            return self.refuse(ctx, request, env, "HMAC signature does not match");
        }
        // validate_request_body: `Digest: SHA-256=<base64>` must be the body's digest;
        // with no Digest header the body must be empty (Kong's rule).
        if self.config.validate_request_body {
            let Some(body) = &ctx.request_body else { return Flow::ReadBody };
            let valid = match request.headers.get(DIGEST).and_then(|v| v.to_str().ok()) {
                None => body.is_empty(),
                Some(received) => received
                    .strip_prefix("SHA-256=")
                    .and_then(|b64| base64_decode(b64, false))
                    .is_some_and(|received| {
                        let computed = ring::digest::digest(&ring::digest::SHA256, body);
                        bool::from(subtle::ConstantTimeEq::ct_eq(computed.as_ref(), received.as_slice()))
                    }),
            };
            if !valid {
                return self.refuse(ctx, request, env, "HMAC signature does not match");
            }
        }
        let hide = self.config.hide_credentials.then_some(header_name);
        if !accept(ctx, request, env, &credential.identity, hide) {
            return self.refuse(ctx, request, env, "HMAC signature cannot be verified");
        }
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_parses_kongs_format() {
        let parsed = parse_authorization(
            r#"hmac username="alice", algorithm="hmac-sha256", headers="date request-line", signature="c2ln""#,
        )
        .unwrap();
        assert_eq!(parsed.username, "alice");
        assert_eq!(parsed.algorithm, "hmac-sha256");
        assert_eq!(parsed.headers, ["date", "request-line"]);
        assert_eq!(parsed.signature, "c2ln");
        assert_eq!(parse_authorization("Basic abc"), None);
        assert_eq!(parse_authorization(r#"hmac username=alice"#), None);
    }
}
