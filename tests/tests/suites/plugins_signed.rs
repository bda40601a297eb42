// The signed-credential plugins (jwt, hmac-auth) of the plugins suite, apart for
// size; included after `suites/plugins.rs`, whose helpers they use, by the same test
// files (tests/tests/plugins.rs and tests/tests/plugins_hyper.rs).

fn b64url(bytes: &[u8]) -> String {
    tollgate_tests::base64(bytes, true)
}

fn base64(bytes: &[u8]) -> String {
    tollgate_tests::base64(bytes, false)
}

/// `header.claims` of a token, base64url encoded.
fn signing_input(alg: &str, claims: &Value) -> String {
    format!(
        "{}.{}",
        b64url(json!({"alg": alg, "typ": "JWT"}).to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    )
}

fn hs256(secret: &str, claims: &Value) -> String {
    let input = signing_input("HS256", claims);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!("{input}.{}", b64url(ring::hmac::sign(&key, input.as_bytes()).as_ref()))
}

fn pem(label: &str, der: &[u8]) -> String {
    let encoded = base64(der);
    let lines: Vec<&str> = encoded.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap_or_default()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_verifies_hmac_rsa_and_ecdsa_and_refuses_none_confusion_and_bad_claims() -> anyhow::Result<()> {
    use ring::signature::KeyPair;
    let echo = EchoServer::start().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    let (_, routes) = service_with_routes(&client, &echo, "tokens", &["/jwt", "/strict"]).await?;
    client.post("/consumers", &json!({"username": "alice"})).await?;
    client.post("/consumers/alice/jwt", &json!({"key": "hs-issuer", "secret": "hs-secret"})).await?;

    // RS256 with a key made by openssl; ES256 with one made by ring.
    let dir = tempfile::tempdir()?;
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let status = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .stderr(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "openssl {args:?}");
        Ok(())
    };
    openssl(&["genrsa", "-out", "rsa.pem", "2048"])?;
    openssl(&["rsa", "-in", "rsa.pem", "-pubout", "-out", "rsa.pub"])?;
    let rsa_public = std::fs::read_to_string(dir.path().join("rsa.pub"))?;
    client
        .post("/consumers/alice/jwt", &json!({"key": "rs-issuer", "algorithm": "RS256", "rsa_public_key": rsa_public}))
        .await?;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(&ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| anyhow::anyhow!("ec key"))?;
    let ec = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        pkcs8.as_ref(),
        &rng,
    )
    .map_err(|_| anyhow::anyhow!("ec key"))?;
    let mut spki = vec![
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
        0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    spki.extend_from_slice(ec.public_key().as_ref());
    client
        .post(
            "/consumers/alice/jwt",
            &json!({"key": "es-issuer", "algorithm": "ES256", "rsa_public_key": pem("PUBLIC KEY", &spki)}),
        )
        .await?;
    // A public key that does not parse is refused with the field named.
    let refused = client
        .post("/consumers/alice/jwt", &json!({"key": "bad", "algorithm": "RS256", "rsa_public_key": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"}))
        .await
        .unwrap_err();
    assert_eq!(refused.status(), Some(400), "{refused}");

    client.post(&format!("/routes/{}/plugins", routes[0]), &json!({"name": "jwt"})).await?;
    client
        .post(
            &format!("/routes/{}/plugins", routes[1]),
            &json!({"name": "jwt", "config": {"claims_to_verify": ["exp", "nbf"], "maximum_expiration": 3600}}),
        )
        .await?;
    settle(&cluster).await?;
    let proxy = cluster.nodes[0].proxy_url();
    let bearer = |token: &str| format!("Bearer {token}");
    let get = |path: &'static str, token: String| {
        let proxy = proxy.clone();
        async move { proxy_request(&proxy, "GET", None, path, &[("authorization", &bearer(&token))]).await }
    };
    let now = tollgate_tests::system_now().duration_since(std::time::UNIX_EPOCH)?.as_secs();

    // HS256, in the header or the `jwt` query argument.
    let token = hs256("hs-secret", &json!({"iss": "hs-issuer"}));
    let ok = get("/jwt/x", token.clone()).await?;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(upstream_header(&ok, "x-consumer-username"), Some("alice"));
    assert_eq!(proxy_request(&proxy, "GET", None, &format!("/jwt/x?jwt={token}"), &[]).await?.status, 200);
    // RS256 signed by openssl.
    let input = signing_input("RS256", &json!({"iss": "rs-issuer"}));
    std::fs::write(dir.path().join("input"), &input)?;
    openssl(&["dgst", "-sha256", "-sign", "rsa.pem", "-out", "sig", "input"])?;
    let rs = format!("{input}.{}", b64url(&std::fs::read(dir.path().join("sig"))?));
    assert_eq!(get("/jwt/x", rs).await?.status, 200);
    // ES256 signed by ring (fixed r||s).
    let input = signing_input("ES256", &json!({"iss": "es-issuer"}));
    let signature = ec.sign(&rng, input.as_bytes()).map_err(|_| anyhow::anyhow!("sign"))?;
    assert_eq!(get("/jwt/x", format!("{input}.{}", b64url(signature.as_ref()))).await?.status, 200);

    let refusal = |reply: &tollgate_tests::ProxyReply| (reply.status, reply.body.clone());
    assert_eq!(
        refusal(&proxy_request(&proxy, "GET", None, "/jwt/x", &[]).await?),
        (401, json!({"message": "Unauthorized"}))
    );
    assert_eq!(
        refusal(&get("/jwt/x", hs256("wrong", &json!({"iss": "hs-issuer"}))).await?),
        (401, json!({"message": "Invalid signature"}))
    );
    assert_eq!(
        refusal(&get("/jwt/x", hs256("hs-secret", &json!({"iss": "nobody"}))).await?),
        (401, json!({"message": "No credentials found for given 'iss'"}))
    );
    // alg: none, and HS256 "signed" with the RSA public key as the secret: refused
    // before any signature check.
    let none = format!("{}.", signing_input("none", &json!({"iss": "hs-issuer"})));
    assert_eq!(refusal(&get("/jwt/x", none).await?), (401, json!({"message": "Invalid algorithm"})));
    let confused = hs256(&rsa_public, &json!({"iss": "rs-issuer"}));
    assert_eq!(refusal(&get("/jwt/x", confused).await?), (401, json!({"message": "Invalid algorithm"})));

    // Claims: exp and nbf verified, maximum_expiration 1 h.
    let good = hs256("hs-secret", &json!({"iss": "hs-issuer", "exp": now + 600, "nbf": now - 10}));
    assert_eq!(get("/strict/x", good).await?.status, 200);
    let expired = hs256("hs-secret", &json!({"iss": "hs-issuer", "exp": now - 10, "nbf": now - 20}));
    assert_eq!(refusal(&get("/strict/x", expired).await?), (401, json!({"exp": "token expired"})));
    let early = hs256("hs-secret", &json!({"iss": "hs-issuer", "exp": now + 600, "nbf": now + 600}));
    assert_eq!(refusal(&get("/strict/x", early).await?), (401, json!({"nbf": "token not valid yet"})));
    let long = hs256("hs-secret", &json!({"iss": "hs-issuer", "exp": now + 7200, "nbf": now - 10}));
    assert_eq!(refusal(&get("/strict/x", long).await?), (401, json!({"exp": "exceeds maximum allowed expiration"})));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hmac_auth_checks_signature_date_skew_and_enforced_headers() -> anyhow::Result<()> {
    let echo = EchoServer::start().await?;
    let cluster = PROXY_MODE.cluster(1, &[]).await?;
    let client = cluster.client();
    let (_, routes) = service_with_routes(&client, &echo, "signed", &["/signed"]).await?;
    client.post("/consumers", &json!({"username": "alice"})).await?;
    client.post("/consumers/alice/hmac-auth", &json!({"username": "alice-hmac", "secret": "hmac-secret"})).await?;
    client
        .post(
            &format!("/routes/{}/plugins", routes[0]),
            &json!({"name": "hmac-auth", "config": {"enforce_headers": ["date", "request-line"], "algorithms": ["hmac-sha256", "hmac-sha512"], "clock_skew": 60, "hide_credentials": true}}),
        )
        .await?;
    settle(&cluster).await?;
    let proxy = cluster.nodes[0].proxy_url();
    let sign = |algorithm: &'static str, secret: &str, date: &str, path: &str, headers: &str| -> String {
        let lines: Vec<String> = headers
            .split(' ')
            .map(|h| if h == "request-line" { format!("GET {path} HTTP/1.1") } else { format!("{h}: {date}") })
            .collect();
        let ring_algorithm = if algorithm == "hmac-sha512" { ring::hmac::HMAC_SHA512 } else { ring::hmac::HMAC_SHA256 };
        let tag =
            ring::hmac::sign(&ring::hmac::Key::new(ring_algorithm, secret.as_bytes()), lines.join("\n").as_bytes());
        format!(
            r#"hmac username="alice-hmac", algorithm="{algorithm}", headers="{headers}", signature="{}""#,
            base64(tag.as_ref())
        )
    };
    let now = httpdate::fmt_http_date(tollgate_tests::system_now());
    let send = |authorization: String, date: String| {
        let proxy = proxy.clone();
        async move {
            proxy_request(&proxy, "GET", None, "/signed/x?a=1", &[("authorization", &authorization), ("date", &date)])
                .await
        }
    };

    let good =
        send(sign("hmac-sha256", "hmac-secret", &now, "/signed/x?a=1", "date request-line"), now.clone()).await?;
    assert_eq!(good.status, 200, "{}", good.body);
    assert_eq!(upstream_header(&good, "x-consumer-username"), Some("alice"));
    assert_eq!(upstream_header(&good, "authorization"), None, "hide_credentials");
    let sha512 =
        send(sign("hmac-sha512", "hmac-secret", &now, "/signed/x?a=1", "date request-line"), now.clone()).await?;
    assert_eq!(sha512.status, 200, "{}", sha512.body);

    let wrong = send(sign("hmac-sha256", "not-it", &now, "/signed/x?a=1", "date request-line"), now.clone()).await?;
    assert_eq!((wrong.status, wrong.body["message"].as_str()), (401, Some("HMAC signature does not match")));
    // Signed for another path: the request line is part of the signature.
    let moved =
        send(sign("hmac-sha256", "hmac-secret", &now, "/signed/other", "date request-line"), now.clone()).await?;
    assert_eq!(moved.status, 401);
    // An enforced header left out of the signature, or a disallowed algorithm.
    let partial = send(sign("hmac-sha256", "hmac-secret", &now, "/signed/x?a=1", "date"), now.clone()).await?;
    assert_eq!((partial.status, partial.body["message"].as_str()), (401, Some("HMAC signature cannot be verified")));
    let sha1 = send(sign("hmac-sha1", "hmac-secret", &now, "/signed/x?a=1", "date request-line"), now.clone()).await?;
    assert_eq!(sha1.status, 401);
    // A date outside the clock skew (a replayed request).
    let old = httpdate::fmt_http_date(tollgate_tests::system_now() - std::time::Duration::from_secs(600));
    let replayed = send(sign("hmac-sha256", "hmac-secret", &old, "/signed/x?a=1", "date request-line"), old).await?;
    assert_eq!(replayed.status, 401);
    assert!(replayed.body["message"].as_str().is_some_and(|m| m.contains("valid date")), "{}", replayed.body);
    let missing = proxy_request(&proxy, "GET", None, "/signed/x", &[]).await?;
    assert_eq!((missing.status, missing.body["message"].as_str()), (401, Some("Unauthorized")));

    // validate_request_body: `Digest: SHA-256=<base64>` must be the body's digest, and
    // no Digest is only right for an empty body.
    let digest_route = client.post("/services/signed/routes", &json!({"paths": ["/digest"]})).await?;
    let validating = json!({"name": "hmac-auth", "config": {"validate_request_body": true}});
    client.post(&format!("/routes/{}/plugins", id(&digest_route)), &validating).await?;
    settle(&cluster).await?;
    let post = |body: &'static str, digest_of: Option<&'static str>| {
        let (proxy, now) = (proxy.clone(), now.clone());
        let authorization = sign("hmac-sha256", "hmac-secret", &now, "", "date");
        async move {
            let mut request = http::Request::post(format!("{proxy}/digest/x"))
                .header("authorization", authorization)
                .header("date", now)
                .header("content-type", "text/plain");
            if let Some(text) = digest_of {
                let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
                request = request.header("digest", format!("SHA-256={}", base64(digest.as_ref())));
            }
            tollgate_tests::ProxyClient::new()
                .send(request.body(http_body_util::Full::new(bytes::Bytes::from(body)))?)
                .await
        }
    };
    let matching = post("hello", Some("hello")).await?;
    assert_eq!(matching.status, 200, "{}", matching.body);
    assert_eq!(matching.body["body"], "hello", "the body read for the digest goes upstream whole");
    let tampered = post("hello", Some("other")).await?;
    assert_eq!((tampered.status, tampered.body["message"].as_str()), (401, Some("HMAC signature does not match")));
    assert_eq!(post("hello", None).await?.status, 401);
    assert_eq!(post("", None).await?.status, 200);
    Ok(())
}
