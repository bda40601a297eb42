//! Upstreams that are not plain HTTP/1.1: gRPC over h2c and over TLS (tonic on both
//! ends, trailers included), HTTPS with Kong's verification options, and WebSocket.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tollgate_tests::{proxy_request, TestCluster, CONVERGE_TIMEOUT};

type BoxFuture<T, E> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send + 'static>>;

#[derive(Clone, PartialEq, prost::Message)]
struct EchoRequest {
    #[prost(string, tag = "1")]
    message: String,
    /// Server streaming: how many replies; a message of "fail" ends the stream with
    /// an error status after them.
    #[prost(uint32, tag = "2")]
    count: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EchoReply {
    #[prost(string, tag = "1")]
    message: String,
    #[prost(uint32, tag = "2")]
    index: u32,
}

struct Unary;

impl tonic::server::UnaryService<EchoRequest> for Unary {
    type Response = EchoReply;
    type Future = BoxFuture<tonic::Response<EchoReply>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<EchoRequest>) -> Self::Future {
        Box::pin(async move {
            let request = request.into_inner();
            if request.message == "fail" {
                return Err(tonic::Status::not_found("nothing called fail"));
            }
            Ok(tonic::Response::new(EchoReply { message: request.message, index: 0 }))
        })
    }
}

struct ServerStreaming;

type ReplyStream = futures_util::stream::Iter<std::vec::IntoIter<Result<EchoReply, tonic::Status>>>;

impl tonic::server::ServerStreamingService<EchoRequest> for ServerStreaming {
    type Response = EchoReply;
    type ResponseStream = ReplyStream;
    type Future = BoxFuture<tonic::Response<ReplyStream>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<EchoRequest>) -> Self::Future {
        Box::pin(async move {
            let request = request.into_inner();
            let mut replies: Vec<Result<EchoReply, tonic::Status>> = (0..request.count)
                .map(|index| Ok(EchoReply { message: format!("{} #{index}", request.message), index }))
                .collect();
            if request.message == "fail" {
                replies.push(Err(tonic::Status::resource_exhausted("enough for today")));
            }
            Ok(tonic::Response::new(futures_util::stream::iter(replies)))
        })
    }
}

/// The test upstream: gRPC under `/test.Echo/`, and a JSON echo of what arrived for
/// every other path (HTTP/1.1 or h2, clear text or TLS).
async fn upstream_handle(
    request: http::Request<Incoming>,
    tls: bool,
) -> Result<http::Response<tonic::body::Body>, Infallible> {
    let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<EchoReply, EchoRequest>::default());
    Ok(match request.uri().path() {
        "/test.Echo/Unary" => grpc.unary(Unary, request).await,
        "/test.Echo/Stream" => grpc.server_streaming(ServerStreaming, request).await,
        path => {
            let answer = json!({
                "path": path,
                "tls": tls,
                "version": format!("{:?}", request.version()),
                "host": request.headers().get("host").and_then(|h| h.to_str().ok()),
            });
            http::Response::new(tonic::body::Body::new(Full::new(Bytes::from(answer.to_string()))))
        }
    })
}

/// Starts the test upstream on a free port; with `tls`, HTTPS with ALPN h2 and
/// http/1.1. Returns its port.
async fn start_upstream(tls: Option<Arc<rustls::ServerConfig>>) -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let is_tls = acceptor.is_some();
                let service = hyper::service::service_fn(move |request| upstream_handle(request, is_tls));
                let _ = match acceptor {
                    None => builder.serve_connection(TokioIo::new(stream), service).await,
                    Some(acceptor) => match acceptor.accept(stream).await {
                        Ok(stream) => builder.serve_connection(TokioIo::new(stream), service).await,
                        Err(_) => return,
                    },
                };
            });
        }
    });
    Ok(port)
}

/// A CA and a leaf for `localhost` (and 127.0.0.1) that it signed, made with the
/// openssl CLI: (CA PEM, leaf chain PEM, leaf key PEM).
fn ca_and_leaf(dir: &Path, label: &str) -> anyhow::Result<(String, String, String)> {
    let path = |name: &str| dir.join(format!("{label}-{name}"));
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let status = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "openssl {args:?} failed");
        Ok(())
    };
    let (ca_key, ca_crt) = (path("ca.key"), path("ca.crt"));
    let (leaf_key, leaf_csr, leaf_crt, ext) = (path("leaf.key"), path("leaf.csr"), path("leaf.crt"), path("leaf.ext"));
    let text = |p: &std::path::PathBuf| p.to_string_lossy().into_owned();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "1",
        "-subj",
        &format!("/CN={label} test CA"),
        "-keyout",
        &text(&ca_key),
        "-out",
        &text(&ca_crt),
    ])?;
    run(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        &text(&leaf_key),
        "-out",
        &text(&leaf_csr),
    ])?;
    std::fs::write(&ext, "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")?;
    run(&[
        "x509",
        "-req",
        "-in",
        &text(&leaf_csr),
        "-CA",
        &text(&ca_crt),
        "-CAkey",
        &text(&ca_key),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &text(&ext),
        "-out",
        &text(&leaf_crt),
    ])?;
    Ok((std::fs::read_to_string(ca_crt)?, std::fs::read_to_string(leaf_crt)?, std::fs::read_to_string(leaf_key)?))
}

fn server_tls(chain: &str, key: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(chain.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes())?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

type GrpcClient = tonic::client::Grpc<
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, tonic::body::Body>,
>;

/// A gRPC client speaking h2c to a proxy listener.
fn grpc_client(proxy_url: &str) -> anyhow::Result<GrpcClient> {
    let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    Ok(tonic::client::Grpc::with_origin(http, proxy_url.parse()?))
}

/// A request with `x-via` metadata (a plain request header), which picks the route.
fn with_via(message: &str, count: u32, via: &'static str) -> tonic::Request<EchoRequest> {
    let mut request = tonic::Request::new(EchoRequest { message: message.into(), count });
    request.metadata_mut().insert("x-via", tonic::metadata::MetadataValue::from_static(via));
    request
}

async fn unary(client: &mut GrpcClient, message: &str, via: &'static str) -> Result<EchoReply, tonic::Status> {
    client.ready().await.map_err(|error| tonic::Status::unavailable(error.to_string()))?;
    let codec = tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default();
    let path = http::uri::PathAndQuery::from_static("/test.Echo/Unary");
    let request = with_via(message, 0, via);
    Ok(client.unary(request, path, codec).await?.into_inner())
}

/// Server streaming: the replies received, then how the stream ended.
async fn streaming(
    client: &mut GrpcClient,
    message: &str,
    count: u32,
    via: &'static str,
) -> anyhow::Result<(Vec<EchoReply>, Result<(), tonic::Status>)> {
    client.ready().await?;
    let codec = tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default();
    let path = http::uri::PathAndQuery::from_static("/test.Echo/Stream");
    let request = with_via(message, count, via);
    let mut stream = client.server_streaming(request, path, codec).await?.into_inner();
    let mut replies = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(reply)) => replies.push(reply),
            Ok(None) => return Ok((replies, Ok(()))),
            Err(status) => return Ok((replies, Err(status))),
        }
    }
}

/// Unary and server-streaming calls through the proxy, with the status an upstream
/// sends in its trailers arriving intact.
async fn check_grpc(proxy_url: &str, via: &'static str) -> anyhow::Result<()> {
    let mut client = grpc_client(proxy_url)?;
    assert_eq!(unary(&mut client, "hello", via).await?.message, "hello");
    let refused = unary(&mut client, "fail", via).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    assert_eq!(refused.message(), "nothing called fail");

    let (replies, end) = streaming(&mut client, "tick", 3, via).await?;
    let messages: Vec<_> = replies.iter().map(|r| r.message.as_str()).collect();
    assert_eq!(messages, ["tick #0", "tick #1", "tick #2"]);
    assert!(end.is_ok(), "{end:?}");
    // The error status after two messages can only travel in the trailers.
    let (replies, end) = streaming(&mut client, "fail", 2, via).await?;
    assert_eq!(replies.len(), 2);
    let status = end.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.message(), "enough for today");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_server_streaming_pass_through_with_trailers_over_h2c_and_tls() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (ca, chain, key) = ca_and_leaf(dir.path(), "grpc")?;
    let plain_port = start_upstream(None).await?;
    let tls_port = start_upstream(Some(server_tls(&chain, &key)?)).await?;
    let cluster = TestCluster::start(1).await?;
    let client = cluster.client();
    let ca = client.post("/ca_certificates", &json!({ "cert": ca })).await?;
    let ca_id = ca.body["id"].as_str().expect("id").to_string();
    client
        .post("/services", &json!({"name": "grpc-plain", "protocol": "grpc", "host": "127.0.0.1", "port": plain_port}))
        .await?;
    client
        .post(
            "/services",
            &json!({"name": "grpc-tls", "protocol": "grpcs", "host": "localhost", "port": tls_port,
                    "tls_verify": true, "ca_certificates": [ca_id]}),
        )
        .await?;
    client
        .post(
            "/services/grpc-plain/routes",
            &json!({"protocols": ["grpc"], "paths": ["/test.Echo/"], "strip_path": false, "headers": {"x-via": ["plain"]}}),
        )
        .await?;
    let last = client
        .post(
            "/services/grpc-tls/routes",
            &json!({"protocols": ["grpc"], "paths": ["/test.Echo/"], "strip_path": false, "headers": {"x-via": ["tls"]}}),
        )
        .await?;
    cluster.published(last.config_version.unwrap_or(0)).await?;
    let proxy = cluster.nodes[0].proxy_url();

    // h2c end to end: the client's `x-via` header picks the route.
    check_grpc(&proxy, "plain").await?;
    // h2 over TLS to the upstream, verified against the CA from /ca_certificates.
    check_grpc(&proxy, "tls").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_are_verified_against_ca_certificates_when_asked() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (ca, chain, key) = ca_and_leaf(dir.path(), "trusted")?;
    let (other_ca, _, _) = ca_and_leaf(dir.path(), "other")?;
    let port = start_upstream(Some(server_tls(&chain, &key)?)).await?;
    let cluster = TestCluster::start(1).await?;
    let client = cluster.client();

    // A CA certificate must be a PEM certificate; the field is named, nothing changes.
    let refused = client.post("/ca_certificates", &json!({"cert": "-----BEGIN CERTIFICATE-----\nnope\n"})).await;
    let refused = refused.unwrap_err();
    assert_eq!(refused.status(), Some(400), "{refused}");
    assert!(refused.api_error().is_some_and(|e| e.fields.contains_key("cert")), "{refused}");

    let trusted = client.post("/ca_certificates", &json!({ "cert": ca })).await?.body["id"].clone();
    let other = client.post("/ca_certificates", &json!({ "cert": other_ca })).await?.body["id"].clone();
    let url = format!("https://localhost:{port}/base");
    client
        .post("/services", &json!({"name": "verified", "url": url, "tls_verify": true, "ca_certificates": [trusted]}))
        .await?;
    client
        .post("/services", &json!({"name": "wrong-ca", "url": url, "tls_verify": true, "ca_certificates": [other]}))
        .await?;
    // Kong's default: tls_verify unset does not verify.
    client.post("/services", &json!({"name": "unverified", "url": url})).await?;
    let mut last = 0;
    for name in ["verified", "wrong-ca", "unverified"] {
        let route = client.post(&format!("/services/{name}/routes"), &json!({"paths": [format!("/{name}")]})).await?;
        last = route.config_version.unwrap_or(0);
    }
    cluster.published(last).await?;
    let proxy = cluster.nodes[0].proxy_url();

    for name in ["verified", "unverified"] {
        let reply = proxy_request(&proxy, "GET", None, &format!("/{name}/x"), &[]).await?;
        assert_eq!(reply.status, 200, "{name}: {}", reply.body);
        assert_eq!(reply.body["tls"], true);
        assert_eq!(reply.body["version"], "HTTP/1.1", "https services speak HTTP/1.1");
        assert_eq!(reply.body["path"], "/base/x");
    }
    let reply = proxy_request(&proxy, "GET", None, "/wrong-ca/x", &[]).await?;
    assert_eq!(reply.status, 502, "a certificate from another CA is refused: {}", reply.body);

    // A CA certificate a service uses cannot be deleted from under it.
    let trusted = trusted.as_str().expect("id");
    let in_use = client.delete(&format!("/ca_certificates/{trusted}")).await.unwrap_err();
    assert_eq!(in_use.status(), Some(400), "{in_use}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_messages_echo_through_the_proxy() -> anyhow::Result<()> {
    // A real WebSocket upstream: every text and binary message comes back.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let upstream = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(message)) = socket.next().await {
                    if (message.is_text() || message.is_binary()) && socket.send(message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let cluster = TestCluster::start(1).await?;
    let client = cluster.client();
    client.post("/services", &json!({"name": "ws", "url": format!("http://{upstream}")})).await?;
    let last = client.post("/services/ws/routes", &json!({"paths": ["/ws"]})).await?;
    cluster.published(last.config_version.unwrap_or(0)).await?;

    let proxy = cluster.nodes[0].proxy_url();
    let address = proxy.trim_start_matches("http://").to_string();
    let stream = tokio::net::TcpStream::connect(&address).await?;
    let (mut socket, response) = tokio_tungstenite::client_async(format!("ws://{address}/ws/chat"), stream).await?;
    assert_eq!(response.status(), 101);
    let messages = [
        Message::text("hello through tollgate"),
        Message::binary(vec![0u8, 1, 2, 255]),
        Message::text("x".repeat(70_000)),
    ];
    for message in messages {
        socket.send(message.clone()).await?;
        let back = tokio::time::timeout(CONVERGE_TIMEOUT, socket.next()).await?.expect("a reply")?;
        assert_eq!(back, message);
    }
    socket.close(None).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_health_probes_speak_tls_and_check_the_certificate_when_asked() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_, chain, key) = ca_and_leaf(dir.path(), "probed")?;
    let port = start_upstream(Some(server_tls(&chain, &key)?)).await?;
    let cluster = TestCluster::start(1).await?;
    let client = cluster.client();
    // The same TLS target under two upstreams: probes that skip the certificate check
    // find it healthy; probes that check it against the system's roots cannot trust a
    // private CA, and find it unhealthy (Kong's https_verify_certificate).
    let target = format!("localhost:{port}");
    let mut last = 0;
    for (name, verify) in [("unchecked", false), ("checked", true)] {
        let healthchecks = json!({"active": {
            "type": "https", "https_verify_certificate": verify, "http_path": "/health",
            "healthy": {"interval": 1, "successes": 1},
            "unhealthy": {"interval": 1, "tcp_failures": 1}
        }});
        client.post("/upstreams", &json!({"name": name, "healthchecks": healthchecks})).await?;
        let written = client.post(&format!("/upstreams/{name}/targets"), &json!({"target": target})).await?;
        last = written.config_version.unwrap_or(0);
    }
    cluster.published(last).await?;
    for (name, expected) in [("unchecked", "HEALTHY"), ("checked", "UNHEALTHY")] {
        tollgate_tests::eventually(&format!("{name} to be {expected}"), std::time::Duration::from_secs(20), || async {
            let view = client.get(&format!("/upstreams/{name}/health")).await.ok()?;
            let health = &view.body["data"][0];
            (health["health"] == expected && health["observed_by"].is_string()).then_some(())
        })
        .await?;
    }
    Ok(())
}
