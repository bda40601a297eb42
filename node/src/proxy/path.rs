//! The upstream path: Kong's `path_handling: v0` joining of the service path and what
//! is left of the request path after the route's match (`strip_path`).
//!
//! Follows Kong's implementation of v0 (its router's `get_upstream_uri_v0`), which
//! differs from Kong's documentation table in one row: service path `/s/`, route
//! `/tv0`, request `/tv0`, `strip_path` → `/s` (the table says `/s/`). Kong's
//! behaviour is what users' upstreams see, so it wins; the unit tests pin every row.

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
    fn no_service_path() {
        assert_eq!(upstream_path_v0("/", "/api/users", "/users", true), "/users");
        assert_eq!(upstream_path_v0("/", "/api", "", true), "/");
        assert_eq!(upstream_path_v0("/", "/api/users", "/api/users", false), "/api/users");
    }
}
