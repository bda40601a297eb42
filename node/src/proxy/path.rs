//! The upstream path: Kong's `path_handling: v0` joining of the service path and what
//! is left of the request path after the route's match (`strip_path`).
//!
//! Follows Kong's implementation of v0 (its router's `get_upstream_uri_v0`), which
//! differs from Kong's documentation table in one row: service path `/s/`, route
//! `/tv0`, request `/tv0`, `strip_path` → `/s` (the table says `/s/`). Kong's
//! behaviour is what users' upstreams see, so it wins; the unit tests pin every row.

/// Normalises a request path before routing, so that no spelling of a path reaches a
/// route its normalised form would not (RFC 3986 §6.2.2, as Kong and nginx do):
/// percent-encoded unreserved characters are decoded (`%2e` → `.`), other escapes keep
/// their meaning with upper-case hex (`%2f` → `%2F`, never a `/`), runs of `/` become
/// one, and `.` / `..` segments are resolved (never above the root).
///
/// Returns `None` for a path that is not `/`-rooted or has a malformed escape.
pub fn normalize(raw: &str) -> Option<std::borrow::Cow<'_, str>> {
    if !raw.starts_with('/') {
        return None;
    }
    // Most paths need nothing: no escapes, no empty or dot segments.
    let plain = !raw.contains('%') && !raw.contains("//") && !raw.contains("/.");
    if plain {
        return Some(std::borrow::Cow::Borrowed(raw));
    }
    let bytes = raw.as_bytes();
    let mut decoded = String::with_capacity(raw.len());
    let mut position = 0;
    while position < bytes.len() {
        let byte = bytes[position];
        if byte == b'%' {
            let hex = raw.get(position + 1..position + 3)?;
            let value = u8::from_str_radix(hex, 16).ok()?;
            if value.is_ascii_alphanumeric() || b"-._~".contains(&value) {
                decoded.push(value as char);
            } else {
                decoded.push('%');
                decoded.push_str(&hex.to_ascii_uppercase());
            }
            position += 3;
            continue;
        }
        decoded.push(byte as char);
        position += 1;
    }
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/').skip(1) {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other),
        }
    }
    let trailing_slash = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut normalized = String::with_capacity(decoded.len());
    for segment in &segments {
        normalized.push('/');
        normalized.push_str(segment);
    }
    if normalized.is_empty() || (trailing_slash && !segments.is_empty()) {
        normalized.push('/');
    }
    Some(std::borrow::Cow::Owned(normalized))
}

/// What follows a route's match in the normalised request path, as Kong's router
/// leaves it (`sanitize_uri_postfix`, kong/router/utils.lua): a leading `.` or `..`
/// segment that the match split off its prefix (route `/route`, request
/// `/route../x` or `/route%2E%2E/x`) is dropped, so the rest cannot climb out of the
/// service's path at an upstream that resolves dot segments.
pub fn postfix(path: &str, matched_len: usize) -> &str {
    let postfix = path.get(matched_len..).unwrap_or("");
    match postfix {
        "." | ".." => "",
        _ => postfix.strip_prefix("./").or_else(|| postfix.strip_prefix("../")).unwrap_or(postfix),
    }
}

/// The path sent upstream.
///
/// - `service_path`: the service's `path`, `/` when it has none;
/// - `request_path`: the request's path (no query);
/// - `postfix`: what follows the route's matched prefix (or regex match);
/// - `strip_path`: the route's `strip_path`.
pub fn upstream_path_v0(service_path: &str, request_path: &str, postfix: &str, strip_path: bool) -> String {
    debug_assert!(service_path.starts_with('/'));
    if let Some(service_path_unslashed) = service_path.strip_suffix('/') {
        if !strip_path {
            // Keep the request path, under the service path, without doubling the slash.
            return format!("{service_path}{}", request_path.strip_prefix('/').unwrap_or(request_path));
        }
        if postfix.is_empty() {
            if service_path == "/" {
                return "/".to_string();
            }
            if request_path.ends_with('/') {
                return service_path.to_string();
            }
            return service_path_unslashed.to_string();
        }
        if let Some(rest) = postfix.strip_prefix('/') {
            return format!("{service_path}{rest}");
        }
        return format!("{service_path}{postfix}");
    }
    if strip_path {
        if postfix.is_empty() {
            if request_path.len() > 1 && request_path.ends_with('/') {
                return format!("{service_path}/");
            }
            return service_path.to_string();
        }
        if postfix.starts_with('/') {
            return format!("{service_path}{postfix}");
        }
        return format!("{service_path}/{postfix}");
    }
    if request_path == "/" {
        return service_path.to_string();
    }
    format!("{service_path}{request_path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (service path, route path, request suffix, strip_path, expected), as Kong does it;
    /// the request path is the route path followed by the suffix.
    const KONG_V0: &[(&str, &str, &str, bool, &str)] = &[
        ("/s", "/fv0", "req", false, "/s/fv0req"),
        ("/s", "/fv0", "", false, "/s/fv0"),
        ("/s", "/fv1/", "req", false, "/s/fv1/req"),
        ("/s", "/fv1/", "", false, "/s/fv1/"),
        ("/s", "/tv0", "req", true, "/s/req"),
        ("/s", "/tv0", "", true, "/s"),
        ("/s", "/tv1/", "req", true, "/s/req"),
        ("/s", "/tv1/", "", true, "/s/"),
        ("/s/", "/fv0", "req", false, "/s/fv0req"),
        ("/s/", "/fv0", "", false, "/s/fv0"),
        ("/s/", "/fv1/", "req", false, "/s/fv1/req"),
        ("/s/", "/fv1/", "", false, "/s/fv1/"),
        ("/s/", "/tv0", "req", true, "/s/req"),
        ("/s/", "/tv0", "", true, "/s"),
        ("/s/", "/tv1/", "req", true, "/s/req"),
        ("/s/", "/tv1/", "", true, "/s/"),
    ];

    #[test]
    fn kong_v0_table() {
        for (service, route, suffix, strip, expected) in KONG_V0 {
            let request = format!("{route}{suffix}");
            let postfix = if *strip { &request[route.len()..] } else { request.as_str() };
            let got = upstream_path_v0(service, &request, postfix, *strip);
            assert_eq!(&got, expected, "service {service} route {route} request {request} strip {strip}");
        }
    }

    #[test]
    fn a_dot_segment_split_off_by_the_match_is_dropped_as_kong_does() {
        // Route `/route`: the request `/route../req` (or `/route%2E%2E/req`, decoded by
        // `normalize`) leaves `../req`, which Kong's router turns into `req`.
        let request = normalize("/route%2E%2E/req").unwrap();
        assert_eq!(postfix(&request, "/route".len()), "req");
        assert_eq!(upstream_path_v0("/service", &request, postfix(&request, 6), true), "/service/req");
        assert_eq!(postfix("/route./req", 6), "req");
        assert_eq!(postfix("/route..", 6), "");
        assert_eq!(postfix("/route/x", 6), "/x");
        assert_eq!(postfix("/route", 60), "");
    }

    #[test]
    fn normalisation() {
        assert_eq!(normalize("/a/../admin").as_deref(), Some("/admin"));
        assert_eq!(normalize("/a/%2e%2e/admin").as_deref(), Some("/admin"));
        assert_eq!(normalize("/a/%2E%2E/%2e/admin/").as_deref(), Some("/admin/"));
        assert_eq!(normalize("//admin").as_deref(), Some("/admin"));
        assert_eq!(normalize("/../../etc").as_deref(), Some("/etc"));
        assert_eq!(normalize("/admin%2fx").as_deref(), Some("/admin%2Fx"));
        assert_eq!(normalize("/admin;jsessionid=1").as_deref(), Some("/admin;jsessionid=1"));
        assert_eq!(normalize("/%41pi").as_deref(), Some("/Api"));
        assert_eq!(normalize("/").as_deref(), Some("/"));
        assert_eq!(normalize("/a/..").as_deref(), Some("/"));
        assert_eq!(normalize("/bad%zz"), None);
        assert_eq!(normalize("/bad%4"), None);
        assert_eq!(normalize("*"), None);
    }

    #[test]
    fn no_service_path() {
        assert_eq!(upstream_path_v0("/", "/api/users", "/users", true), "/users");
        assert_eq!(upstream_path_v0("/", "/api", "", true), "/");
        assert_eq!(upstream_path_v0("/", "/api/users", "/api/users", false), "/api/users");
    }
}
