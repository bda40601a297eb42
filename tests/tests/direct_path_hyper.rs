//! The direct HTTP/1.1 path (`node/src/proxy/direct.rs`) against a scripted upstream
//! that answers in every framing HTTP/1.1 has, and misbehaves on purpose.
//!
//! This run: with every request through hyper (`--proxy-direct off`).

const PROXY_MODE: tollgate_tests::ProxyMode = tollgate_tests::ProxyMode::Hyper;

include!("suites/direct_path.rs");
