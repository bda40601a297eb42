//! The direct HTTP/1.1 path (`node/src/proxy/direct.rs`) against a scripted upstream
//! that answers in every framing HTTP/1.1 has, and misbehaves on purpose.
//!
//! This run: on the direct path where it applies (the default).

const PROXY_MODE: tollgate_tests::ProxyMode = tollgate_tests::ProxyMode::Direct;

include!("suites/direct_path.rs");
