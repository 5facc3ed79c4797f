//! fn-certs as an operator runs it: an existing CA is never replaced by accident.

use std::process::Command;

fn fn_certs(args: &[&str]) -> std::process::Output {
    fn_certs_with(args, &[])
}

/// fn-certs with `args` and only the `FN_CERTS_*` variables in `env`.
fn fn_certs_with(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fn-certs"));
    for (var, _) in std::env::vars() {
        if var.starts_with("FN_CERTS_") {
            command.env_remove(var);
        }
    }
    command
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("runs fn-certs")
}

/// The names of the node certificate in `dir`.
fn names(dir: &std::path::Path) -> Vec<String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(dir.join("node.pem")).expect("node.pem");
    let der = CertificateDer::from_pem_slice(&pem).expect("a certificate");
    fn_tls::expiry::Validity::of(&der).expect("x509").names
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

#[test]
fn names_are_trimmed_compared_as_addresses_and_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().to_str().expect("utf-8");
    let sans = [("FN_CERTS_SANS", "fn-node, npm ,2001:0db8::1")];
    let made = fn_certs_with(&["--out", out], &sans);
    assert!(made.status.success(), "{made:?}");
    let names = names(dir.path());
    assert!(
        names.iter().any(|n| n == "npm") && names.iter().any(|n| n == "2001:db8::1"),
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n.starts_with(' ')), "{names:?}");

    // Every later run of the same stack keeps them: the address is the same address.
    let kept = fn_certs_with(&["--out", out, "--keep"], &sans);
    assert!(kept.status.success(), "{kept:?}");
    assert!(String::from_utf8_lossy(&kept.stdout).contains("keeping"));

    for bad in ["fn-node,,npm", "fn-node, ", "fn node"] {
        let refused = fn_certs_with(&["--out", out, "--rotate"], &[("FN_CERTS_SANS", bad)]);
        assert!(!refused.status.success(), "{bad:?} accepted");
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(
            said.contains("empty name") || said.contains("not a DNS name or an IP address"),
            "{bad:?}: {said}"
        );
    }
}
