//! Authentication plugins: they identify the consumer and tell the upstream who it is
//! (`X-Consumer-ID`, `X-Consumer-Username`, `X-Consumer-Custom-ID`,
//! `X-Credential-Identifier`, and `X-Anonymous-Consumer` for the anonymous consumer).
//! Those headers are always set or cleared, so a client cannot send its own.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tollgate_raft_store::plugins::KeyAuthConfig;

use super::transform::{self, body_kind, BodyKind};
use super::{Consumer, Ctx, Env, Exit, Flow, Phases, Plugin, RequestView};

const X_CONSUMER_ID: HeaderName = HeaderName::from_static("x-consumer-id");
const X_CONSUMER_USERNAME: HeaderName = HeaderName::from_static("x-consumer-username");
const X_CONSUMER_CUSTOM_ID: HeaderName = HeaderName::from_static("x-consumer-custom-id");
const X_CREDENTIAL_IDENTIFIER: HeaderName = HeaderName::from_static("x-credential-identifier");
const X_ANONYMOUS_CONSUMER: HeaderName = HeaderName::from_static("x-anonymous-consumer");

/// What a credential of any authentication plugin identifies: its consumer, its own
/// id, and its `X-Credential-Identifier` value (made once per snapshot).
pub struct Identity {
    pub consumer: uuid::Uuid,
    pub id: uuid::Uuid,
    pub header: HeaderValue,
}

impl Identity {
    /// The identity of a stored credential entity; `None` without a consumer.
    /// `X-Credential-Identifier` is the value of `identifier_field` when given, as
    /// Kong's plugins send it (basic-auth and hmac-auth the username, jwt the key:
    /// spec/03-plugins/10-basic-auth/03-access_spec.lua:282,
    /// 16-jwt/03-access_spec.lua:491), else the credential's id (key-auth:
    /// 09-key-auth/02-access_spec.lua:600).
    pub fn of(credential: &tollgate_raft_store::schema::Object, identifier_field: Option<&str>) -> Option<Identity> {
        let consumer = tollgate_raft_store::state::foreign_id(credential, "consumer")?;
        let id = tollgate_raft_store::state::entity_id(credential);
        let named = identifier_field
            .and_then(|field| credential.get(field))
            .and_then(serde_json::Value::as_str)
            .and_then(|text| HeaderValue::from_str(text).ok());
        Some(Identity { consumer, id, header: named.unwrap_or_else(|| super::id_header(id)) })
    }
}

/// Records the consumer in `ctx` and in the headers the upstream receives.
pub fn set_consumer(
    ctx: &mut Ctx,
    headers: &mut HeaderMap,
    consumer: &Arc<Consumer>,
    credential: Option<&Identity>,
    anonymous: bool,
) {
    let mut set = |name: HeaderName, value: Option<&HeaderValue>| match value {
        Some(value) => {
            headers.insert(name, value.clone());
        }
        None => {
            headers.remove(name);
        }
    };
    set(X_CONSUMER_ID, Some(&consumer.id_header));
    set(X_CONSUMER_USERNAME, consumer.username_header.as_ref());
    set(X_CONSUMER_CUSTOM_ID, consumer.custom_id_header.as_ref());
    set(X_CREDENTIAL_IDENTIFIER, credential.map(|identity| &identity.header));
    const TRUE: HeaderValue = HeaderValue::from_static("true");
    set(X_ANONYMOUS_CONSUMER, anonymous.then_some(&TRUE));
    ctx.consumer = Some(consumer.clone());
    ctx.credential = credential.map(|identity| identity.id);
    ctx.anonymous = anonymous;
}

/// The `Authorization` (or `Proxy-Authorization`) header: its name and value.
pub fn authorization(headers: &HeaderMap) -> Option<(HeaderName, String)> {
    [http::header::AUTHORIZATION, http::header::PROXY_AUTHORIZATION]
        .into_iter()
        .find_map(|name| headers.get(&name).and_then(|v| v.to_str().ok()).map(|v| (name, v.to_string())))
}

/// Accepts a verified credential: the consumer it belongs to becomes the request's,
/// and with `hide` the header that carried it is removed. `false` when the consumer
/// no longer exists.
pub fn accept(
    ctx: &mut Ctx,
    request: &mut RequestView<'_>,
    env: &Env<'_>,
    credential: &Identity,
    hide: Option<HeaderName>,
) -> bool {
    let Some(consumer) = env.data.consumers.get(&credential.consumer) else { return false };
    set_consumer(ctx, request.headers, consumer, Some(credential), false);
    if let Some(header) = hide {
        request.headers.remove(header);
    }
    true
}

/// Lets a request without valid credentials through as the configured anonymous
/// consumer (id or username); 500 when that consumer does not exist, as in Kong.
pub fn use_anonymous(ctx: &mut Ctx, request: &mut RequestView<'_>, env: &Env<'_>, anonymous: &str) -> Flow {
    match env.data.consumer(anonymous) {
        Some(consumer) => {
            set_consumer(ctx, request.headers, consumer, None, true);
            Flow::Continue
        }
        None => Flow::Exit(Exit::message(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("anonymous consumer {anonymous} is configured but doesn't exist"),
        )),
    }
}

/// key-auth: an API key in a header or the query string.
pub struct KeyAuth {
    config: KeyAuthConfig,
    /// Each of `key_names` as a header, and for a name with `_` the same with `-`,
    /// looked for when the first is absent: nginx finds `api_key` sent as `api-key`
    /// (spec/03-plugins/09-key-auth/02-access_spec.lua:534), not the other way round.
    names: Vec<(HeaderName, Option<HeaderName>)>,
    challenge: HeaderValue,
}

/// Kong's key-auth answer to a key it does not know (kong/plugins/key-auth/handler.lua
/// `ERR_INVALID_AUTH_CRED`).
const INVALID_KEY: &str = "Unauthorized";

impl KeyAuth {
    pub fn new(config: KeyAuthConfig) -> Result<KeyAuth, String> {
        let names = config
            .key_names
            .iter()
            .map(|name| {
                let header = HeaderName::from_bytes(name.as_bytes()).map_err(|error| format!("key_names: {error}"))?;
                let dashed = name.contains('_').then(|| HeaderName::from_bytes(name.replace('_', "-").as_bytes()));
                Ok((header, dashed.and_then(Result::ok)))
            })
            .collect::<Result<_, String>>()?;
        // Kong's: `Key`, or with a configured realm `Key realm="…"`.
        let challenge = match config.realm.as_deref() {
            Some(realm) => format!("Key realm=\"{realm}\""),
            None => "Key".to_string(),
        };
        let challenge = HeaderValue::from_str(&challenge).map_err(|error| error.to_string())?;
        Ok(KeyAuth { config, names, challenge })
    }

    fn unauthorized(&self, message: &str) -> Flow {
        let mut exit = Exit::message(StatusCode::UNAUTHORIZED, message);
        exit.headers.push((http::header::WWW_AUTHENTICATE, self.challenge.clone()));
        Flow::Exit(exit)
    }

    /// The key sent, and where, looking for each of `key_names` in turn in the
    /// headers, the query string and (`key_in_body`) the body, Kong's order. The body
    /// is asked for only when a name is not in the headers or the query string.
    /// Found keys are looked up at once, so the key itself is never copied. A name
    /// given twice in one place (two header lines, two query arguments, a JSON array,
    /// two form fields) is a duplicate, whatever the values: Kong refuses it rather
    /// than pick one.
    fn find_key<'e>(&self, ctx: &Ctx, request: &RequestView<'_>, env: &Env<'e>) -> Lookup<'e> {
        let keys = &env.data.keys;
        for (index, (name, dashed)) in self.names.iter().enumerate() {
            if self.config.key_in_header {
                let name = match dashed {
                    Some(dashed) if !request.headers.contains_key(name) => dashed,
                    _ => name,
                };
                let mut values = request.headers.get_all(name).iter();
                if let Some(value) = values.next() {
                    if values.next().is_some() {
                        return Lookup::Duplicate;
                    }
                    // An empty key is no key (Kong: `if not key or key == ""`).
                    if let Ok(value) = value.to_str().map(str::trim) {
                        if !value.is_empty() {
                            return Lookup::Found(keys.get(value), Found::Header(name.clone()));
                        }
                    }
                }
            }
            let text_name = &self.config.key_names[index];
            if self.config.key_in_query {
                if let Some(query) = request.query {
                    let mut values = query_params(query, text_name);
                    if let Some(value) = values.next() {
                        if values.next().is_some() {
                            return Lookup::Duplicate;
                        }
                        return Lookup::Found(keys.get(&value), Found::Query(text_name.clone()));
                    }
                }
            }
            if self.config.key_in_body {
                let Some(kind) = body_kind(request.headers) else { continue };
                let Some(body) = &ctx.request_body else { return Lookup::NeedBody };
                match body_field(kind, body, text_name) {
                    BodyField::One(value) => {
                        return Lookup::Found(keys.get(&value), Found::Body(kind, text_name.clone()));
                    }
                    BodyField::Many => return Lookup::Duplicate,
                    BodyField::Missing => {}
                }
            }
        }
        Lookup::Missing
    }
}

/// Where a key was, and the credential it names (`None` for an unknown key).
enum Lookup<'e> {
    Found(Option<&'e Identity>, Found),
    /// One key name given twice (Kong: "Duplicate API key found").
    Duplicate,
    NeedBody,
    Missing,
}

/// A key field of a body.
enum BodyField {
    One(String),
    Many,
    Missing,
}

enum Found {
    Header(HeaderName),
    Query(String),
    Body(BodyKind, String),
}

/// A string field of a JSON object or form body: an array (JSON) or a repeated field
/// (form) is several.
fn body_field(kind: BodyKind, body: &[u8], name: &str) -> BodyField {
    match kind {
        BodyKind::Json => match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(serde_json::Value::Object(mut object)) => match object.remove(name) {
                Some(serde_json::Value::String(text)) => BodyField::One(text),
                Some(serde_json::Value::Array(_)) => BodyField::Many,
                _ => BodyField::Missing,
            },
            _ => BodyField::Missing,
        },
        BodyKind::Form => {
            let Ok(text) = std::str::from_utf8(body) else { return BodyField::Missing };
            let mut values = transform::form_fields(text).filter(|(field, _)| field == name).map(|(_, value)| value);
            match (values.next(), values.next()) {
                (Some(value), None) => BodyField::One(value),
                (Some(_), Some(_)) => BodyField::Many,
                (None, _) => BodyField::Missing,
            }
        }
    }
}

/// The body without field `name` (`hide_credentials`); `None` when it cannot be
/// re-encoded (it was read as having the field, so this does not happen in practice).
fn without_body_field(kind: BodyKind, body: &[u8], name: &str) -> Option<Vec<u8>> {
    match kind {
        BodyKind::Json => {
            let serde_json::Value::Object(mut object) = serde_json::from_slice(body).ok()? else { return None };
            object.remove(name);
            serde_json::to_vec(&object).ok()
        }
        BodyKind::Form => Some(without_param(std::str::from_utf8(body).ok()?, name).into_bytes()),
    }
}

impl Plugin for KeyAuth {
    fn phases(&self) -> Phases {
        Phases::NONE
    }

    fn access(&self, ctx: &mut Ctx, request: &mut RequestView<'_>, env: &Env<'_>) -> Flow {
        if !self.config.run_on_preflight && request.method == http::Method::OPTIONS {
            return Flow::Continue;
        }
        // Kong's "logical OR": with `anonymous` set, a consumer another plugin already
        // authenticated is kept.
        if self.config.anonymous.is_some() && ctx.consumer.is_some() && !ctx.anonymous {
            return Flow::Continue;
        }
        let (found, matched) = match self.find_key(ctx, request, env) {
            Lookup::NeedBody => return Flow::ReadBody,
            Lookup::Found(identity, place) => (Some(place), identity),
            Lookup::Duplicate => {
                if let Some(anonymous) = &self.config.anonymous {
                    return use_anonymous(ctx, request, env, anonymous);
                }
                return self.unauthorized("Duplicate API key found");
            }
            Lookup::Missing => (None, None),
        };
        match (found, matched) {
            (Some(place), Some(identity)) => {
                let hide = self.config.hide_credentials;
                let hide_header = match &place {
                    Found::Header(name) if hide => Some(name.clone()),
                    _ => None,
                };
                if !accept(ctx, request, env, identity, hide_header) {
                    return self.unauthorized(INVALID_KEY);
                }
                match place {
                    Found::Query(name) if hide => {
                        ctx.upstream_query = Some(without_param(request.query.unwrap_or_default(), &name));
                    }
                    Found::Body(kind, name) if hide => {
                        let body = ctx.request_body.as_deref().unwrap_or_default();
                        if let Some(kept) = without_body_field(kind, body, &name) {
                            ctx.request_body = Some(bytes::Bytes::from(kept));
                        }
                    }
                    _ => {}
                }
                Flow::Continue
            }
            (found, _) => {
                if let Some(anonymous) = &self.config.anonymous {
                    return use_anonymous(ctx, request, env, anonymous);
                }
                if found.is_some() {
                    self.unauthorized(INVALID_KEY)
                } else {
                    self.unauthorized("No API key found in request")
                }
            }
        }
    }
}

/// The first value of query argument `name`, percent-decoded.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query_params(query, name).next()
}

/// Every value of query argument `name`, percent-decoded, in order.
pub fn query_params<'q>(query: &'q str, name: &'q str) -> impl Iterator<Item = String> + 'q {
    query.split('&').filter_map(move |pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key) == name).then(|| percent_decode(value))
    })
}

/// The query string without argument `name`.
pub fn without_param(query: &str, name: &str) -> String {
    query
        .split('&')
        .filter(|pair| {
            let key = pair.split_once('=').map_or(*pair, |(key, _)| key);
            percent_decode(key) != name
        })
        .collect::<Vec<_>>()
        .join("&")
}

pub(super) fn percent_decode(text: &str) -> String {
    crate::text::percent_decode(text, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_arguments_decode_and_can_be_removed() {
        assert_eq!(query_param("a=1&apikey=s%20e+cret&b=2", "apikey").as_deref(), Some("s e cret"));
        assert_eq!(query_param("apikey", "apikey").as_deref(), Some(""));
        assert_eq!(query_param("a=1", "apikey"), None);
        assert_eq!(query_param("k=%zz%4", "k").as_deref(), Some("%zz%4"));
        assert_eq!(without_param("a=1&apikey=x&b=2", "apikey"), "a=1&b=2");
    }
}
