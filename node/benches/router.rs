//! Route lookup time with 10 000 routes (and 100, for comparison).
//!
//! `cargo bench -p tollgate-node --bench router`
//!
//! A plain timing loop rather than criterion: criterion's dependency tree would be
//! compiled by every `cargo test --workspace` run (dev-dependencies are), for one
//! number. Each figure is the median of 15 batches of 200 000 lookups.

use serde_json::json;
use tollgate_node::proxy::router::{RequestView, Router};
use tollgate_raft_store::entities::Route;
use tollgate_raft_store::EntityKind;

fn routes(count: usize) -> Vec<Route> {
    (0..count)
        .map(|i| {
            let mut route = json!({
                "id": uuid::Uuid::new_v4().to_string(),
                "name": format!("r{i}"),
                "paths": [format!("/api/v1/resource-{i}")],
                "protocols": ["http", "https"],
                "created_at": i,
            });
            if i % 3 == 0 {
                route["hosts"] = json!([format!("h{}.example.com", i % 50)]);
            }
            if i % 10 == 0 {
                route["methods"] = json!(["GET", "POST"]);
            }
            if i % 100 == 0 {
                route["paths"] = json!([format!("~/api/v2/items-{i}/\\d+$")]);
            }
            let object = route.as_object().expect("object");
            tollgate_raft_store::entities::read(EntityKind::Route, object).expect("a route")
        })
        .collect()
}

fn median_ns(router: &Router, host: &str, path: &str) -> f64 {
    const BATCH: usize = 200_000;
    let headers = http::HeaderMap::new();
    let view = RequestView { method: "GET", host, path, headers: &headers, protocol: "http" };
    let mut samples: Vec<f64> = (0..15)
        .map(|_| {
            let started = tokio::time::Instant::now();
            for _ in 0..BATCH {
                std::hint::black_box(router.find(std::hint::black_box(&view)));
            }
            started.elapsed().as_nanos() as f64 / BATCH as f64
        })
        .collect();
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

fn main() {
    for count in [100, 10_000] {
        let compiled = routes(count);
        let started = tokio::time::Instant::now();
        let router = Router::compile(compiled.iter());
        let compile_ms = started.elapsed().as_secs_f64() * 1e3;
        let middle = count / 2 + 1;
        println!("{count} routes (compiled in {compile_ms:.1} ms):");
        println!(
            "  prefix hit      {:>8.1} ns",
            median_ns(&router, "other.com", &format!("/api/v1/resource-{middle}/items"))
        );
        println!("  host + prefix   {:>8.1} ns", median_ns(&router, "h3.example.com", "/api/v1/resource-3/items"));
        println!(
            "  regex hit       {:>8.1} ns",
            median_ns(&router, "other.com", &format!("/api/v2/items-{}/42", (count / 2) / 100 * 100))
        );
        println!("  miss            {:>8.1} ns", median_ns(&router, "other.com", "/nothing/here"));
    }
}
