//! fn-certs as an operator runs it: an existing CA is never replaced by accident.

use std::process::Command;

fn fn_certs(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fn-certs"))
        .args(args)
        .env_remove("FN_CERTS_DIR")
        .env_remove("FN_CERTS_SANS")
        .env_remove("FN_CERTS_KEEP")
        .env_remove("FN_CERTS_FORCE")
        .output()
        .expect("runs fn-certs")
}

#[test]
fn an_existing_ca_is_replaced_only_with_force() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().to_str().expect("utf-8");
    assert!(fn_certs(&["--out", out, "--san", "npm"]).status.success());
    let ca = std::fs::read(dir.path().join("ca.pem")).expect("ca");

    let again = fn_certs(&["--out", out]);
    assert!(!again.status.success(), "an existing CA was replaced");
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(
        said.contains("--rotate") && said.contains("--force"),
        "{said}"
    );
    assert_eq!(std::fs::read(dir.path().join("ca.pem")).expect("ca"), ca);

    assert!(fn_certs(&["--out", out, "--keep"]).status.success());
    assert!(fn_certs(&["--out", out, "--rotate"]).status.success());
    assert_eq!(
        std::fs::read(dir.path().join("ca.pem")).expect("ca"),
        ca,
        "same CA"
    );

    // A rollover begun and abandoned: --force ends it with the CA it replaces, so a later
    // switch cannot issue from a CA no bundle holds.
    assert!(
        fn_certs(&["--out", out, "--ca-rollover", "begin"])
            .status
            .success()
    );
    assert!(dir.path().join("next-issuer-key.pem").exists());
    assert!(fn_certs(&["--out", out, "--force"]).status.success());
    assert_ne!(
        std::fs::read(dir.path().join("ca.pem")).expect("ca"),
        ca,
        "a new CA"
    );
    for stale in ["next-issuer.pem", "next-issuer-key.pem"] {
        assert!(!dir.path().join(stale).exists(), "{stale} left behind");
    }
    let switch = fn_certs(&["--out", out, "--ca-rollover", "switch"]);
    assert!(!switch.status.success(), "switched to the abandoned CA");
}

#[test]
fn kept_certificates_must_carry_the_names_asked_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().to_str().expect("utf-8");
    assert!(fn_certs(&["--out", out]).status.success());
    let kept = fn_certs(&["--out", out, "--keep", "--san", "fn-node"]);
    assert!(!kept.status.success(), "kept a certificate without fn-node");
    let said = String::from_utf8_lossy(&kept.stderr);
    assert!(
        said.contains("lacks fn-node") && said.contains("--rotate"),
        "{said}"
    );
    assert!(
        fn_certs(&["--out", out, "--rotate", "--san", "fn-node"])
            .status
            .success()
    );
    assert!(
        fn_certs(&["--out", out, "--keep", "--san", "fn-node"])
            .status
            .success()
    );
    assert!(fn_certs(&["--out", out, "--keep"]).status.success());
}
