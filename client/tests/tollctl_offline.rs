//! `tollctl` without a cluster: `validate` runs the nodes' own loader, so it accepts a
//! Kong file a node would load and refuses, naming the file, the entity and the field,
//! what a node would refuse; `completions` writes a shell's script.

use std::process::Command;

fn tollctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollctl"))
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("writes the file");
    path
}

#[test]
fn validate_accepts_kong_files_and_names_what_it_refuses() {
    let dir = tempfile::tempdir().expect("a temp dir");
    // A Kong 1.1 file: a regex path written the pre-3.0 way, nested routes and plugins.
    let good = write(
        dir.path(),
        "kong.yaml",
        "_format_version: \"1.1\"\n_workspace: default\nservices:\n- name: svc\n  url: http://example.test\n  routes:\n  - name: r\n    paths: [\"/items/\\\\d+$\"]\n  plugins:\n  - name: rate-limiting\n    config: {minute: 5}\n",
    );
    let answer = tollctl().args(["validate", "-f"]).arg(&good).output().expect("runs");
    assert!(answer.status.success(), "{}", String::from_utf8_lossy(&answer.stderr));
    let stdout = String::from_utf8_lossy(&answer.stdout);
    assert!(stdout.contains("valid (3 entities)"), "{stdout}");
    // What is not carried over is said, not dropped silently.
    let stderr = String::from_utf8_lossy(&answer.stderr);
    assert!(stderr.contains("'_workspace' is not carried over"), "{stderr}");

    let bad = write(
        dir.path(),
        "bad.yaml",
        "_format_version: \"3.0\"\nservices:\n- name: ok\n  host: a.test\n- name: bad\n  host: b.test\n  routes:\n  - paths: [\"nope\"]\n",
    );
    let answer = tollctl().args(["validate", "-f"]).arg(&bad).output().expect("runs");
    assert_eq!(answer.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&answer.stderr);
    assert!(stderr.contains("bad.yaml"), "{stderr}");
    assert!(stderr.contains("services[1].routes[0].paths[0]: should start with"), "{stderr}");

    let json = tollctl().args(["-o", "json", "validate", "-f"]).arg(&good).output().expect("runs");
    let answer: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert_eq!(answer["entities"], 3);
}

#[test]
fn completions_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let answer = tollctl().args(["completions", shell]).output().expect("runs");
        assert!(answer.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&answer.stdout);
        assert!(script.contains("tollctl") && script.contains("sync"), "{shell}: {script}");
    }
}
