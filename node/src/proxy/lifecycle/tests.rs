use super::*;

/// RFC 9110 §7.6.1's hop-by-hop fields, as names.
const HOP_BY_HOP: [HeaderName; 7] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

#[test]
fn every_hop_by_hop_field_is_dropped_both_ways() {
    for name in HOP_BY_HOP {
        assert!(is_hop_by_hop(name.as_str()), "{name}");
        assert_eq!(request_rule(name.as_str()), RequestRule::Drop, "{name}");
        assert_eq!(response_rule(&name.as_str().to_ascii_uppercase()), ResponseRule::Drop, "{name}");
    }
    assert_eq!(request_rule("X-Forwarded-Prefix"), RequestRule::Forwarded(Forwarded::Prefix));
    assert_eq!(request_rule("Proxy"), RequestRule::Drop);
    assert_eq!(request_rule("content-length"), RequestRule::Length);
    assert_eq!(request_rule("x-custom"), RequestRule::Keep);
    assert_eq!(response_rule("X-Tollgate-Proxy-Latency"), ResponseRule::Drop);
    assert_eq!(response_rule("X-Tollgate-Upstream-Latency"), ResponseRule::Drop);
    assert_eq!(response_rule("content-type"), ResponseRule::Keep);
}

#[test]
fn a_map_loses_its_hop_by_hop_fields_and_those_connection_names() {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("connection", "X-Secret , keep-alive"),
        ("connection", "x-other"),
        ("x-secret", "1"),
        ("x-other", "2"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("upgrade", "websocket"),
        ("transfer-encoding", "chunked"),
        ("x-kept", "3"),
        ("content-type", "text/plain"),
    ] {
        headers.append(HeaderName::from_static(name), HeaderValue::from_static(value));
    }
    remove_hop_by_hop(&mut headers);
    let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
    left.sort_unstable();
    assert_eq!(left, ["content-type", "x-kept"]);
    // Nothing hop-by-hop: the map is left as it was.
    let before = headers.clone();
    remove_hop_by_hop(&mut headers);
    assert_eq!(headers, before);
    // `close` names no field; an upstream's `Connection: keep-alive` goes with it.
    headers.insert(CONNECTION, HeaderValue::from_static("Keep-Alive"));
    headers.insert(HeaderName::from_static("keep-alive"), HeaderValue::from_static("timeout=5"));
    remove_hop_by_hop(&mut headers);
    assert_eq!(headers, before);
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    remove_hop_by_hop(&mut headers);
    assert_eq!(headers, before);
}

#[test]
fn forwarding_on_a_map_keeps_a_trusted_peers_headers_only() {
    let forwarding = |trusted| Forwarding {
        peer_trusted: trusted,
        forwarded_for: Some("1.1.1.1"),
        peer_ip: b"10.0.0.1",
        real_ip: Cow::Borrowed(b"1.1.1.1"),
        tls: false,
        host: Some("example.com"),
        port: b"8000",
        path: "/a",
        prefix: None,
        request_id: "1-2",
        upstream_host: Some(b"upstream"),
    };
    let sent = || {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        headers.insert("x-forwarded-prefix", HeaderValue::from_static("/p"));
        headers.insert("proxy", HeaderValue::from_static("http://evil"));
        headers
    };
    let mut headers = sent();
    forwarding(false).apply(&mut headers);
    assert_eq!(headers["x-forwarded-for"], "1.1.1.1, 10.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert!(!headers.contains_key("x-forwarded-prefix"));
    assert!(!headers.contains_key("proxy"));
    assert_eq!(headers["host"], "upstream");
    assert_eq!(headers["x-real-ip"], "1.1.1.1");
    let mut headers = sent();
    forwarding(true).apply(&mut headers);
    assert_eq!(headers["x-forwarded-proto"], "https");
    assert_eq!(headers["x-forwarded-prefix"], "/p");
}

#[test]
fn forwarding_written_is_forwarding_applied() {
    let forwarding = |trusted, prefix, upstream_host| Forwarding {
        peer_trusted: trusted,
        forwarded_for: trusted.then_some("1.1.1.1"),
        peer_ip: b"10.0.0.1",
        real_ip: Cow::Borrowed(b"1.1.1.1"),
        tls: true,
        host: Some("example.com"),
        port: b"8443",
        path: "/a/b",
        prefix,
        request_id: "1-2",
        upstream_host,
    };
    let maps = [
        vec![("host", "client"), ("accept", "*/*")],
        vec![
            ("host", "client"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "h"),
            ("x-forwarded-port", "1"),
            ("x-forwarded-path", "/p"),
            ("x-forwarded-prefix", "/pre"),
            ("x-forwarded-for", "9.9.9.9"),
            ("x-real-ip", "9.9.9.9"),
            ("via", "1.0 other"),
            ("proxy", "http://evil"),
            ("content-length", "3"),
            ("x-tollgate-request-id", "forged"),
            ("x-custom", "one"),
            ("x-custom", "two"),
        ],
    ];
    for fields in &maps {
        let mut headers = HeaderMap::new();
        for (name, value) in fields {
            headers.append(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        for trusted in [false, true] {
            for prefix in [None, Some("/route")] {
                for upstream_host in [None, Some(&b"upstream"[..])] {
                    let forwarding = forwarding(trusted, prefix, upstream_host);
                    let mut applied = headers.clone();
                    forwarding.apply(&mut applied);
                    applied.remove("content-length");
                    let mut expected: Vec<String> = applied
                        .iter()
                        .map(|(name, value)| format!("{name}: {}", value.to_str().unwrap_or_default()))
                        .collect();
                    let mut written = Vec::new();
                    forwarding.write(&headers, |name, pieces| {
                        written.push(format!("{name}: {}", String::from_utf8_lossy(&pieces.concat())));
                    });
                    // Fields of one name keep their order; names may come in any.
                    let order = |lines: &[String]| {
                        let mut by_name: Vec<(String, Vec<String>)> = Vec::new();
                        for line in lines {
                            let name = line.split(':').next().unwrap_or_default().to_string();
                            match by_name.iter_mut().find(|(seen, _)| *seen == name) {
                                Some((_, values)) => values.push(line.clone()),
                                None => by_name.push((name, vec![line.clone()])),
                            }
                        }
                        by_name.sort();
                        by_name
                    };
                    let context = format!("trusted {trusted}, prefix {prefix:?}, host {upstream_host:?}");
                    assert_eq!(order(&written), order(&expected), "{context}");
                    expected.clear();
                }
            }
        }
    }
}
