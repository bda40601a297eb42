//! The binary's start-up contract: clear refusals before anything listens.

use std::process::Command;

fn tollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
}

#[test]
fn refuses_a_public_admin_address_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let output = tollgate()
        .args(["run", "--node-id", "1", "--admin-listen", "0.0.0.0:0", "--cluster-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("TOLLGATE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--admin-token"), "{stderr}");
}

#[test]
fn requires_a_node_id_and_reads_it_from_the_environment_too() {
    let output = tollgate().arg("run").env_remove("TOLLGATE_NODE_ID").output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--node-id"));

    let dir = tempfile::tempdir().unwrap();
    let output = tollgate()
        .arg("run")
        .env("TOLLGATE_NODE_ID", "7")
        .env("TOLLGATE_ADMIN_LISTEN", "0.0.0.0:0")
        .env("TOLLGATE_DATA_DIR", dir.path())
        .output()
        .unwrap();
    // Got past the id (from the variable) to the token check (from the variable too).
    assert!(String::from_utf8_lossy(&output.stderr).contains("--admin-token"));
}

#[test]
fn rejects_out_of_range_settings_by_name() {
    let output = tollgate().args(["run", "--node-id", "1", "--raft-heartbeat-ms", "1"]).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("raft_heartbeat_ms"));
}
