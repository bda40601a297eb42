//! The one HTTP/1.1 accept loop behind the Admin API, the cluster port and the echo
//! upstream: bounded connections, graceful stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// Accepts connections until `shutdown` turns true and hands each to `on_connection`
/// with the `shutdown` receiver. At most `connections_max` connections are open at once
/// (a connection holds its permit until its task ends); further ones wait in the
/// listen backlog.
pub async fn accept_loop<C, Fut>(
    name: &'static str,
    listener: TcpListener,
    connections_max: usize,
    on_connection: C,
    mut shutdown: watch::Receiver<bool>,
) where
    C: Fn(TcpStream, SocketAddr, watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    debug_assert!(connections_max > 0);
    let permits = Arc::new(Semaphore::new(connections_max));
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, server = name, "accept failed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let connection = on_connection(stream, peer, shutdown.clone());
        tokio::spawn(async move {
            let _permit = permit;
            connection.await;
        });
    }
}

/// Serves `handler` over HTTP/1.1 on `listener` until `shutdown` turns true.
pub async fn serve_http1<H, Fut>(
    name: &'static str,
    listener: TcpListener,
    connections_max: usize,
    handler: H,
    shutdown: watch::Receiver<bool>,
) where
    H: Fn(SocketAddr, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let on_connection = move |stream: TcpStream, peer: SocketAddr, mut shutdown: watch::Receiver<bool>| {
        let handler = handler.clone();
        async move {
            let service = hyper::service::service_fn(move |request| {
                let answer = handler(peer, request);
                async move { Ok::<_, std::convert::Infallible>(answer.await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::select! {
                result = connection => {
                    if let Err(error) = result {
                        tracing::debug!(%error, %peer, server = name, "connection ended");
                    }
                }
                _ = shutdown.wait_for(|stop| *stop) => {}
            }
        }
    };
    accept_loop(name, listener, connections_max, on_connection, shutdown).await;
}
