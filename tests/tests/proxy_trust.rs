//! The proxy findings of the trust-boundary audit (issue 13), each replayed on both
//! request paths: node 1 takes HTTP/1.1 on the direct path, node 2 runs with
//! `--proxy-direct off` (every request through hyper). Every test here failed on the
//! code before its fix. Where Kong's behaviour is the reference, its spec is cited.

use serde_json::{json, Value};
use tollgate_tests::{eventually, raw_exchange, EchoServer, ProxyClient, TestCluster, CONVERGE_TIMEOUT};

/// Two nodes that differ only in the request path they use.
async fn both_paths(extra: &[&str]) -> anyhow::Result<TestCluster> {
    let mut hyper_only = extra.to_vec();
    hyper_only.extend(["--proxy-direct", "off"]);
    TestCluster::start_each(&[extra, &hyper_only]).await
}

/// [`both_paths`] with service `app` at `url`; the cluster and an admin client.
async fn app_on_both_paths(url: &str, extra: &[&str]) -> anyhow::Result<(TestCluster, tollgate_client::AdminClient)> {
    let cluster = both_paths(extra).await?;
    let client = cluster.client();
    client.post("/services", &json!({"name": "app", "url": url})).await?;
    Ok((cluster, client))
}

/// Each node's proxy URL, named by its path.
fn paths(cluster: &TestCluster) -> Vec<(&'static str, String)> {
    vec![("direct", cluster.nodes[0].proxy_url()), ("hyper", cluster.nodes[1].proxy_url())]
}

/// Waits until every node serves the config at `version`.
async fn settled(cluster: &TestCluster, version: Option<u64>) -> anyhow::Result<()> {
    cluster.published(version.unwrap_or(0)).await
}

/// The JSON body of a raw HTTP/1.1 answer (the echo's).
fn body_of(text: &str) -> Value {
    text.split_once("\r\n\r\n").and_then(|(_, body)| serde_json::from_str(body).ok()).unwrap_or(Value::Null)
}

/// The values the echo upstream received for header `name`.
fn received<'a>(echoed: &'a Value, name: &str) -> Vec<&'a str> {
    echoed["headers"][name]
        .as_array()
        .map(|values| values.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_strip_identity_headers_a_plugin_set() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let (cluster, client) = app_on_both_paths(&format!("http://{}", echo.address), &[]).await?;
    client.post("/services/app/routes", &json!({"name": "open", "paths": ["/open"]})).await?;
    client.post("/services/app/routes", &json!({"name": "keyed", "paths": ["/keyed"]})).await?;
    client.post("/consumers", &json!({"username": "anonymous-user"})).await?;
    client.post("/consumers", &json!({"username": "alice"})).await?;
    client.post("/consumers/alice/key-auth", &json!({"key": "alice-key"})).await?;
    client
        .post("/routes/open/plugins", &json!({"name": "key-auth", "config": {"anonymous": "anonymous-user"}}))
        .await?;
    let last = client.post("/routes/keyed/plugins", &json!({"name": "key-auth"})).await?;
    settled(&cluster, last.config_version).await?;

    for (path, proxy) in paths(&cluster) {
        // An upstream that trusts "no X-Anonymous-Consumer" as "authenticated" must
        // still see the header the plugin set.
        let request = b"GET /open/x HTTP/1.1\r\nHost: t\r\nConnection: close, X-Anonymous-Consumer\r\n\r\n";
        let (status, text) = raw_exchange(&proxy, request).await?;
        assert_eq!(status, 200, "{path}: {text}");
        assert_eq!(received(&body_of(&text), "x-anonymous-consumer"), ["true"], "{path}: {text}");
        let request = b"GET /keyed/x HTTP/1.1\r\nHost: t\r\napikey: alice-key\r\nConnection: close, x-consumer-id, x-consumer-username, x-credential-identifier\r\n\r\n";
        let (status, text) = raw_exchange(&proxy, request).await?;
        assert_eq!(status, 200, "{path}: {text}");
        let echoed = body_of(&text);
        assert_eq!(received(&echoed, "x-consumer-username"), ["alice"], "{path}: {text}");
        assert_eq!(received(&echoed, "x-consumer-id").len(), 1, "{path}: {text}");
        assert_eq!(received(&echoed, "x-credential-identifier").len(), 1, "{path}: {text}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_x_forwarded_for_line_counts_with_trusted_ips() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let (cluster, client) = app_on_both_paths(
        &format!("http://{}", echo.address),
        &["--trusted-ips", "127.0.0.1", "--real-ip-header", "X-Forwarded-For", "--real-ip-recursive", "on"],
    )
    .await?;
    client.post("/services/app/routes", &json!({"name": "guarded", "paths": ["/guarded"]})).await?;
    let last = client
        .post("/routes/guarded/plugins", &json!({"name": "ip-restriction", "config": {"deny": ["7.7.7.7"]}}))
        .await?;
    settled(&cluster, last.config_version).await?;

    for (path, proxy) in paths(&cluster) {
        // The second line names the client the trusted peer saw: denied.
        let request = b"GET /guarded HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-For: 7.7.7.7\r\nConnection: close\r\n\r\n";
        let (status, text) = raw_exchange(&proxy, request).await?;
        assert_eq!(status, 403, "{path}: {text}");
        // Allowed: the upstream gets every hop, in order, and the trusted peer.
        let request = b"GET /guarded HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-For: 5.6.7.8\r\nConnection: close\r\n\r\n";
        let (status, text) = raw_exchange(&proxy, request).await?;
        assert_eq!(status, 200, "{path}: {text}");
        let echoed = body_of(&text);
        assert_eq!(received(&echoed, "x-forwarded-for"), ["1.2.3.4, 5.6.7.8, 127.0.0.1"], "{path}: {text}");
        assert_eq!(received(&echoed, "x-real-ip"), ["5.6.7.8"], "{path}: {text}");
    }
    Ok(())
}

/// Kong's `sanitize_uri_postfix` (kong/router/utils.lua:36): with `strip_path`, a dot
/// segment the route's prefix split off never climbs out of the service's path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dot_segment_after_a_stripped_prefix_stays_under_the_service_path() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let (cluster, client) = app_on_both_paths(&format!("http://{}/service", echo.address), &[]).await?;
    let last = client.post("/services/app/routes", &json!({"paths": ["/route"], "strip_path": true})).await?;
    settled(&cluster, last.config_version).await?;
    let proxy_client = ProxyClient::new();
    for (path, proxy) in paths(&cluster) {
        for request in ["/route../req", "/route%2E%2E/req", "/route%2e%2e/req", "/route./req"] {
            let reply = proxy_client.request(&proxy, "GET", None, request, &[]).await?;
            assert_eq!(reply.status, 200, "{path} {request}: {}", reply.body);
            assert_eq!(reply.body["path"], "/service/req", "{path} {request}");
        }
    }
    Ok(())
}

/// `Proxy` never reaches the upstream (httpoxy), and `X-Forwarded-Path` and
/// `X-Forwarded-Prefix` are the proxy's own for an untrusted client (Kong:
/// spec/02-integration/05-proxy/03-upstream_headers_spec.lua:429-470, "should be
/// replaced if present in request", "should not be added if path was not stripped").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_and_forwarded_path_headers_from_untrusted_clients_do_not_pass() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let (cluster, client) = app_on_both_paths(&format!("http://{}", echo.address), &[]).await?;
    client.post("/services/app/routes", &json!({"paths": ["/foo"], "strip_path": true})).await?;
    let last = client.post("/services/app/routes", &json!({"paths": ["/kept"], "strip_path": false})).await?;
    settled(&cluster, last.config_version).await?;
    let proxy_client = ProxyClient::new();
    let spoofed = [
        ("proxy", "http://attacker.example:3128"),
        ("x-forwarded-path", "/replaced"),
        ("x-forwarded-prefix", "/replaced"),
    ];
    for (path, proxy) in paths(&cluster) {
        let reply = proxy_client.request(&proxy, "GET", None, "/foo/status/200?q=1", &spoofed).await?;
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        assert!(received(&reply.body, "proxy").is_empty(), "{path}: {}", reply.body);
        assert_eq!(received(&reply.body, "x-forwarded-path"), ["/foo/status/200"], "{path}");
        assert_eq!(received(&reply.body, "x-forwarded-prefix"), ["/foo"], "{path}");
        let reply = proxy_client.request(&proxy, "GET", None, "/kept/status/200", &spoofed).await?;
        assert_eq!(received(&reply.body, "x-forwarded-path"), ["/kept/status/200"], "{path}");
        assert!(received(&reply.body, "x-forwarded-prefix").is_empty(), "{path}: {}", reply.body);
    }
    Ok(())
}

fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let group = chunk.iter().fold(0u32, |group, &byte| (group << 8) | u32::from(byte)) << (8 * (3 - chunk.len()));
        for position in 0..=chunk.len() {
            out.push(ALPHABET[((group >> (18 - 6 * position)) & 63) as usize] as char);
        }
    }
    out
}

fn hs256(secret: &str, claims: &Value) -> String {
    let input = format!(
        "{}.{}",
        b64url(json!({"alg": "HS256", "typ": "JWT"}).to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!("{input}.{}", b64url(ring::hmac::sign(&key, input.as_bytes()).as_ref()))
}

/// key-auth refuses a key name given twice (Kong:
/// spec/03-plugins/09-key-auth/02-access_spec.lua:334-347, "handles duplicated key in
/// querystring"); jwt refuses different tokens in different places
/// (spec/03-plugins/16-jwt/03-access_spec.lua:458-472, "reject if multiple different
/// tokens found").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_keys_or_two_tokens_in_one_request_are_refused() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let (cluster, client) = app_on_both_paths(&format!("http://{}", echo.address), &[]).await?;
    client.post("/services/app/routes", &json!({"name": "keyed", "paths": ["/keyed"]})).await?;
    client.post("/services/app/routes", &json!({"name": "tokens", "paths": ["/tokens"]})).await?;
    client.post("/consumers", &json!({"username": "alice"})).await?;
    client.post("/consumers", &json!({"username": "mallory"})).await?;
    client.post("/consumers/alice/key-auth", &json!({"key": "alice-key"})).await?;
    client.post("/consumers/mallory/key-auth", &json!({"key": "mallory-key"})).await?;
    client.post("/consumers/alice/jwt", &json!({"key": "alice-issuer", "secret": "alice-secret"})).await?;
    client.post("/routes/keyed/plugins", &json!({"name": "key-auth"})).await?;
    let last = client.post("/routes/tokens/plugins", &json!({"name": "jwt"})).await?;
    settled(&cluster, last.config_version).await?;
    let token = hs256("alice-secret", &json!({"iss": "alice-issuer"}));
    let proxy_client = ProxyClient::new();
    for (path, proxy) in paths(&cluster) {
        for query in ["?apikey=kong&apikey=kong", "?apikey=alice-key&apikey=mallory-key"] {
            let reply = proxy_client.request(&proxy, "GET", None, &format!("/keyed/status/200{query}"), &[]).await?;
            assert_eq!(reply.status, 401, "{path} {query}");
            assert_eq!(reply.body["message"], "Duplicate API key found", "{path} {query}");
        }
        let request = b"GET /keyed/x HTTP/1.1\r\nHost: t\r\napikey: alice-key\r\napikey: mallory-key\r\nConnection: close\r\n\r\n";
        let (status, text) = raw_exchange(&proxy, request).await?;
        assert_eq!(status, 401, "{path}: {text}");
        assert!(text.contains("Duplicate API key found"), "{path}: {text}");

        let reply = proxy_client
            .request(
                &proxy,
                "GET",
                None,
                &format!("/tokens/request?jwt={token}"),
                &[("authorization", "Bearer invalid.jwt.token")],
            )
            .await?;
        assert_eq!(reply.status, 401, "{path}");
        assert_eq!(reply.body, json!({"message": "Multiple tokens provided"}), "{path}");
        let challenge = reply.headers.get("www-authenticate").and_then(|v| v.to_str().ok());
        assert_eq!(challenge, Some("Bearer error=\"invalid_token\""), "{path}");
        // The same token twice is one token.
        let bearer = format!("Bearer {token}");
        let reply = proxy_client
            .request(&proxy, "GET", None, &format!("/tokens/request?jwt={token}"), &[("authorization", &bearer)])
            .await?;
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
    }
    Ok(())
}

/// Credentials an authentication plugin reads from a custom header or a query argument
/// are redacted in file-log lines, whatever the name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_redact_every_name_a_credential_is_read_from() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let dir = tempfile::tempdir()?;
    let log_path = dir.path().join("requests.log");
    let (cluster, client) = app_on_both_paths(&format!("http://{}", echo.address), &[]).await?;
    client.post("/services/app/routes", &json!({"name": "keyed", "paths": ["/keyed"]})).await?;
    client.post("/services/app/routes", &json!({"name": "tokens", "paths": ["/tokens"]})).await?;
    client.post("/consumers", &json!({"username": "alice"})).await?;
    client.post("/consumers/alice/key-auth", &json!({"key": "alice-secret-key"})).await?;
    client.post("/consumers/alice/jwt", &json!({"key": "alice-issuer", "secret": "alice-secret"})).await?;
    client.post("/routes/keyed/plugins", &json!({"name": "key-auth", "config": {"key_names": ["x-client"]}})).await?;
    client.post("/routes/tokens/plugins", &json!({"name": "jwt"})).await?;
    let last =
        client.post("/plugins", &json!({"name": "file-log", "config": {"path": log_path.to_string_lossy()}})).await?;
    settled(&cluster, last.config_version).await?;
    let token = hs256("alice-secret", &json!({"iss": "alice-issuer"}));
    let proxy_client = ProxyClient::new();
    for (path, proxy) in paths(&cluster) {
        let reply = proxy_client.request(&proxy, "GET", None, "/keyed/a", &[("x-client", "alice-secret-key")]).await?;
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        let reply = proxy_client.request(&proxy, "GET", None, &format!("/tokens/b?jwt={token}"), &[]).await?;
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
    }
    let lines = eventually("four file-log lines", CONVERGE_TIMEOUT, || async {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        (lines.len() >= 4).then_some(lines)
    })
    .await?;
    for line in &lines {
        assert!(!line.contains("alice-secret-key") && !line.contains(&token), "a credential reached the log: {line}");
    }
    assert!(lines.iter().any(|line| line.contains("\"x-client\":\"REDACTED\"")), "{lines:?}");
    assert!(lines.iter().any(|line| line.contains("\"jwt\":\"REDACTED\"")), "{lines:?}");
    Ok(())
}

/// basic-auth: an unknown username is refused no faster than a wrong password (no
/// username probing by timing), and one client flooding wrong passwords leaves the
/// node's password checks to everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn basic_auth_neither_tells_usernames_apart_by_time_nor_lets_one_client_take_every_check() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let (cluster, client) = app_on_both_paths(
        &format!("http://{}", echo.address),
        &["--trusted-ips", "127.0.0.1", "--real-ip-header", "X-Forwarded-For", "--real-ip-recursive", "on"],
    )
    .await?;
    client.post("/services/app/routes", &json!({"name": "basic", "paths": ["/basic"]})).await?;
    client.post("/consumers", &json!({"username": "alice"})).await?;
    client.post("/consumers/alice/basic-auth", &json!({"username": "alice", "password": "right"})).await?;
    client.post("/consumers", &json!({"username": "bob"})).await?;
    client.post("/consumers/bob/basic-auth", &json!({"username": "bob", "password": "bobs-secret"})).await?;
    let last = client.post("/routes/basic/plugins", &json!({"name": "basic-auth"})).await?;
    settled(&cluster, last.config_version).await?;
    let basic = |user: &str, password: &str| {
        let raw = format!("{user}:{password}");
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in raw.as_bytes().chunks(3) {
            let group =
                chunk.iter().fold(0u32, |group, &byte| (group << 8) | u32::from(byte)) << (8 * (3 - chunk.len()));
            for position in 0..4 {
                out.push(if position <= chunk.len() {
                    ALPHABET[((group >> (18 - 6 * position)) & 63) as usize] as char
                } else {
                    '='
                });
            }
        }
        format!("Basic {out}")
    };
    let proxy_client = ProxyClient::new();
    for (path, proxy) in paths(&cluster) {
        // Time of a refusal, median of 7, for an unknown user and a known one.
        let refusal_ms = |user: &'static str, xff: &'static str| {
            let (proxy, proxy_client) = (proxy.clone(), proxy_client.clone());
            let authorization = basic(user, "wrong");
            async move {
                let mut times = Vec::new();
                for _ in 0..7 {
                    let started = tokio::time::Instant::now();
                    let reply = proxy_client
                        .request(
                            &proxy,
                            "GET",
                            None,
                            "/basic",
                            &[("authorization", &authorization), ("x-forwarded-for", xff)],
                        )
                        .await?;
                    assert_eq!(reply.status, 401, "{}", reply.body);
                    times.push(started.elapsed().as_secs_f64() * 1e3);
                }
                times.sort_by(f64::total_cmp);
                Ok::<f64, anyhow::Error>(times[3])
            }
        };
        let unknown = refusal_ms("nobody", "10.0.0.1").await?;
        let known = refusal_ms("alice", "10.0.0.1").await?;
        println!("{path}: refusal median {unknown:.1} ms for an unknown user, {known:.1} ms for a known one");
        assert!(
            unknown * 4.0 >= known,
            "{path}: an unknown user is refused in {unknown:.1} ms, a known one in {known:.1} ms"
        );

        // A flood of wrong passwords from 10.0.0.66, 32 at a time, while bob logs in
        // for the first time from 10.0.0.2.
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let flooding = std::sync::Arc::new(AtomicBool::new(true));
        let answered = std::sync::Arc::new(AtomicU64::new(0));
        let mut flood = tokio::task::JoinSet::new();
        for attacker in 0..32 {
            let (proxy, proxy_client) = (proxy.clone(), ProxyClient::new());
            let (flooding, answered) = (flooding.clone(), answered.clone());
            let authorization = basic("alice", &format!("guess-{attacker}"));
            flood.spawn(async move {
                while flooding.load(Ordering::Relaxed) {
                    let headers = [("authorization", authorization.as_str()), ("x-forwarded-for", "10.0.0.66")];
                    if proxy_client.request(&proxy, "GET", None, "/basic", &headers).await.is_ok() {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        eventually("the flood under way", CONVERGE_TIMEOUT, || async {
            (answered.load(Ordering::Relaxed) >= 64).then_some(())
        })
        .await?;
        let bob = basic("bob", "bobs-secret");
        let reply = proxy_client
            .request(&proxy, "GET", None, "/basic", &[("authorization", &bob), ("x-forwarded-for", "10.0.0.2")])
            .await?;
        flooding.store(false, Ordering::Relaxed);
        while flood.join_next().await.is_some() {}
        assert_eq!(reply.status, 200, "{path}: bob's first login during the flood: {}", reply.body);
    }
    Ok(())
}

/// The data directory holds every credential of the config: only the node's user may
/// read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_and_database_are_private_to_the_nodes_user() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let cluster = TestCluster::start(1).await?;
    let data_dir = &cluster.nodes[0].data_dir;
    let mode = |path: &std::path::Path| std::fs::metadata(path).map(|m| m.permissions().mode() & 0o777);
    assert_eq!(mode(data_dir)?, 0o700, "{}", data_dir.display());
    assert_eq!(mode(&data_dir.join("tollgate.redb"))?, 0o600);
    Ok(())
}

/// An upstream speaking raw HTTP/1.1 on purpose: `HEAD` is answered with
/// `Content-Length: 50` and no body (as it should be), and 300 ms later the same
/// connection gets a second, unasked response (`POISON`); `GET /big` streams 64 MiB
/// until the connection breaks, and says when it did; other requests get `fresh`.
struct MisbehavingUpstream {
    address: String,
    big_closed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    poisoned: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl MisbehavingUpstream {
    async fn start() -> anyhow::Result<MisbehavingUpstream> {
        use std::sync::atomic::Ordering;
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let big_closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let poisoned = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (closed, sent) = (big_closed.clone(), poisoned.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (closed, sent) = (closed.clone(), sent.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let Some(head) = tollgate_tests::read_request_head(&mut stream, &mut buf).await else {
                            return;
                        };
                        if head.starts_with("HEAD ") {
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n";
                            if stream.write_all(answer).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                            let poison = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nPOISON";
                            let written = stream.write_all(poison).await;
                            // Counted sent or not (the proxy may have closed the connection).
                            sent.fetch_add(1, Ordering::SeqCst);
                            if written.is_err() {
                                return;
                            }
                        } else if head.starts_with("GET /big") {
                            let total: u64 = 64 * 1024 * 1024;
                            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {total}\r\n\r\n");
                            let chunk = vec![b'x'; 64 * 1024];
                            let mut failed = stream.write_all(head.as_bytes()).await.is_err();
                            let mut written = 0;
                            while !failed && written < total {
                                failed = stream.write_all(&chunk).await.is_err();
                                written += chunk.len() as u64;
                            }
                            closed.store(true, Ordering::SeqCst);
                            return;
                        } else if stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfresh").await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        Ok(MisbehavingUpstream { address, big_closed, poisoned })
    }
}

/// An upstream that answers `HEAD` and then sends an unasked response on the same
/// connection never has that response read as another client's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unasked_response_after_head_never_reaches_another_client() -> anyhow::Result<()> {
    use std::sync::atomic::Ordering;
    let upstream = MisbehavingUpstream::start().await?;
    let (cluster, client) = app_on_both_paths(&format!("http://{}", upstream.address), &[]).await?;
    let last = client.post("/services/app/routes", &json!({"paths": ["/"]})).await?;
    settled(&cluster, last.config_version).await?;
    let mut poisoned = Vec::new();
    for (path, proxy) in paths(&cluster) {
        for round in 0..6 {
            let head = ProxyClient::new().request(&proxy, "HEAD", None, "/page", &[]).await?;
            assert_eq!(head.status, 200, "{path}");
            // Another client at once, while the unasked response is on its way.
            let sent = upstream.poisoned.load(Ordering::SeqCst);
            let reply = ProxyClient::new().request(&proxy, "GET", None, "/page", &[]).await?;
            // And again once it has gone out.
            eventually("the unasked response sent", CONVERGE_TIMEOUT, || async {
                (upstream.poisoned.load(Ordering::SeqCst) > sent).then_some(())
            })
            .await?;
            let later = ProxyClient::new().request(&proxy, "GET", None, "/page", &[]).await?;
            for (when, reply) in [("at once", &reply), ("later", &later)] {
                if reply.body != "fresh" {
                    poisoned.push(format!("{path} round {round} {when}: {}", reply.body));
                }
            }
        }
    }
    assert!(poisoned.is_empty(), "other clients got the unasked response: {poisoned:?}");
    Ok(())
}

/// A client that stops reading is given up after `--proxy-send-timeout-ms`, and the
/// upstream connection it held is closed with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_lets_go_of_its_upstream() -> anyhow::Result<()> {
    use std::sync::atomic::Ordering;
    use tokio::io::AsyncWriteExt;
    for direct in [true, false] {
        let upstream = MisbehavingUpstream::start().await?;
        let mode = if direct { "on" } else { "off" };
        let cluster = TestCluster::start_with(1, &["--proxy-send-timeout-ms", "1000", "--proxy-direct", mode]).await?;
        let client = cluster.client();
        client.post("/services", &json!({"name": "app", "url": format!("http://{}", upstream.address)})).await?;
        let last = client.post("/services/app/routes", &json!({"paths": ["/"]})).await?;
        settled(&cluster, last.config_version).await?;
        let address = format!("127.0.0.1:{}", cluster.nodes[0].proxy_port);
        let mut stalled = tokio::net::TcpStream::connect(&address).await?;
        stalled.write_all(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n").await?;
        // The client reads nothing; the upstream's connection must close regardless.
        eventually("the upstream connection closed", CONVERGE_TIMEOUT, || async {
            upstream.big_closed.load(Ordering::SeqCst).then_some(())
        })
        .await
        .map_err(|error| anyhow::anyhow!("--proxy-direct {mode}: {error}"))?;
        drop(stalled);
    }
    Ok(())
}

/// Reads until the peer closes (or sends a 408), at most `bound`; how long it took.
async fn closed_within(mut stream: tokio::net::TcpStream, bound: std::time::Duration) -> Option<std::time::Duration> {
    use tokio::io::AsyncReadExt;
    let started = tokio::time::Instant::now();
    let mut sink = Vec::new();
    tokio::time::timeout(bound, stream.read_to_end(&mut sink)).await.ok()?.ok()?;
    Some(started.elapsed())
}

/// A partial request head on the Admin API, a silent h2c connection on the proxy and
/// a silent socket on the cluster port are each closed by their timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_closes_slow_and_silent_connections() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let cluster = TestCluster::start_with(
        1,
        &[
            "--admin-header-timeout-ms",
            "500",
            "--admin-keepalive-timeout-ms",
            "500",
            "--proxy-keepalive-timeout-ms",
            "500",
        ],
    )
    .await?;
    let node = &cluster.nodes[0];
    let bound = std::time::Duration::from_secs(5);
    // Admin API: a request head that never ends.
    let mut partial = tokio::net::TcpStream::connect(("127.0.0.1", node.admin_port)).await?;
    partial.write_all(b"GET /status HTTP/1.1\r\nHost: t\r\n").await?;
    let took = closed_within(partial, bound).await;
    assert!(took.is_some(), "a partial admin request head stayed open past {bound:?}");
    // Admin API: a connection that sends nothing.
    let silent = tokio::net::TcpStream::connect(("127.0.0.1", node.admin_port)).await?;
    assert!(closed_within(silent, bound).await.is_some(), "a silent admin connection stayed open");
    // Proxy: an h2c connection that opens and then says nothing.
    let mut h2c = tokio::net::TcpStream::connect(("127.0.0.1", node.proxy_port)).await?;
    h2c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await?;
    assert!(closed_within(h2c, bound).await.is_some(), "an idle h2c connection stayed open");
    // Cluster port: a socket that never sends a request head is closed by the header
    // timeout (10 s there).
    let silent = tokio::net::TcpStream::connect(node.cluster_address()).await?;
    let took = closed_within(silent, std::time::Duration::from_secs(20)).await;
    assert!(took.is_some(), "a silent cluster-port connection stayed open");
    Ok(())
}
