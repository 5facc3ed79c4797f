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

/// The files in `dir`, sorted.
fn listing(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("readable")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn the_ca_key_stays_out_of_the_directory_the_daemons_read() {
    use std::os::unix::fs::PermissionsExt as _;
    let root = tempfile::tempdir().expect("tempdir");
    let (nodes, issuer) = (root.path().join("certs"), root.path().join("issuer"));
    let (out, issuer_dir) = (
        nodes.to_str().expect("utf-8"),
        issuer.to_str().expect("utf-8"),
    );
    let env = [("FN_CERTS_ISSUER_DIR", issuer_dir)];
    let node_files = ["ca.pem", "node-key.pem", "node.pem"];

    assert!(fn_certs_with(&["--out", out], &env).status.success());
    assert_eq!(listing(&nodes), node_files);
    assert_eq!(listing(&issuer), ["issuer-key.pem", "issuer.pem"]);
    let mode = std::fs::metadata(issuer.join("issuer-key.pem"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the CA's key is its owner's alone");

    // Rotation and a whole rollover find the CA there, and leave nothing of it in --out.
    let ca = std::fs::read(nodes.join("ca.pem")).expect("ca");
    assert!(
        fn_certs_with(&["--out", out, "--rotate"], &env)
            .status
            .success()
    );
    assert_eq!(std::fs::read(nodes.join("ca.pem")).expect("ca"), ca);
    for step in ["begin", "switch", "finish"] {
        let done = fn_certs_with(&["--out", out, "--ca-rollover", step], &env);
        assert!(done.status.success(), "{step}: {done:?}");
        assert_eq!(listing(&nodes), node_files, "after {step}");
    }
    assert_ne!(std::fs::read(nodes.join("ca.pem")).expect("ca"), ca);

    // Without it, the CA is not found: the CA's files are not in --out.
    let rotate = fn_certs(&["--out", out, "--rotate"]);
    assert!(!rotate.status.success());
    assert!(String::from_utf8_lossy(&rotate.stderr).contains("--issuer-dir"));
}

#[test]
fn a_ca_written_with_the_node_files_moves_to_the_issuer_dir() {
    let root = tempfile::tempdir().expect("tempdir");
    let (nodes, issuer) = (root.path().join("certs"), root.path().join("issuer"));
    let (out, issuer_dir) = (
        nodes.to_str().expect("utf-8"),
        issuer.to_str().expect("utf-8"),
    );
    // As fn-certs wrote it before --issuer-dir, a rollover under way.
    assert!(fn_certs(&["--out", out]).status.success());
    assert!(
        fn_certs(&["--out", out, "--ca-rollover", "begin"])
            .status
            .success()
    );
    let key = std::fs::read(nodes.join("issuer-key.pem")).expect("key");

    let kept = fn_certs(&["--out", out, "--issuer-dir", issuer_dir, "--keep"]);
    assert!(kept.status.success(), "{kept:?}");
    assert!(String::from_utf8_lossy(&kept.stdout).contains("moved"));
    assert_eq!(listing(&nodes), ["ca.pem", "node-key.pem", "node.pem"]);
    assert_eq!(
        listing(&issuer),
        [
            "issuer-key.pem",
            "issuer.pem",
            "next-issuer-key.pem",
            "next-issuer.pem"
        ]
    );
    assert_eq!(
        std::fs::read(issuer.join("issuer-key.pem")).expect("key"),
        key
    );
    for step in ["switch", "finish"] {
        let done = fn_certs(&[
            "--out",
            out,
            "--issuer-dir",
            issuer_dir,
            "--ca-rollover",
            step,
        ]);
        assert!(done.status.success(), "{step}: {done:?}");
    }
}

#[test]
fn node_files_without_a_ca_of_ours_are_replaced_only_with_force() {
    // An operator's own set: ca.pem, node.pem and node-key.pem, no issuer-key.pem.
    let made = tempfile::tempdir().expect("tempdir");
    let issuer = tempfile::tempdir().expect("tempdir");
    let out = made.path().to_str().expect("utf-8");
    let issuer_dir = issuer.path().to_str().expect("utf-8");
    assert!(
        fn_certs(&["--out", out, "--issuer-dir", issuer_dir])
            .status
            .success()
    );
    drop(issuer);
    let ca = std::fs::read(made.path().join("ca.pem")).expect("ca");

    let again = fn_certs(&["--out", out]);
    assert!(!again.status.success(), "an operator's set was replaced");
    let said = String::from_utf8_lossy(&again.stderr);
    for named in ["ca.pem", "node.pem", "node-key.pem", "--force", "--keep"] {
        assert!(said.contains(named), "{named}: {said}");
    }
    assert_eq!(std::fs::read(made.path().join("ca.pem")).expect("ca"), ca);

    // One file gone: --keep has no whole set, and says so rather than suggest --keep.
    std::fs::remove_file(made.path().join("node-key.pem")).expect("rm");
    let kept = fn_certs(&["--out", out, "--keep"]);
    assert!(!kept.status.success(), "kept half a set");
    let said = String::from_utf8_lossy(&kept.stderr);
    assert!(
        said.contains("node-key.pem missing") && said.contains("--force"),
        "{said}"
    );
    assert!(!said.contains("--keep to keep"), "{said}");
    assert_eq!(std::fs::read(made.path().join("ca.pem")).expect("ca"), ca);

    assert!(fn_certs(&["--out", out, "--force"]).status.success());
    assert_ne!(std::fs::read(made.path().join("ca.pem")).expect("ca"), ca);
}

/// A PKI made by fn-certs in `root`/certs with its CA in `root`/issuer, for `fn-node`.
fn made_in(root: &std::path::Path) -> (String, String, fn_tls::dev::DevCa) {
    let (nodes, issuer) = (root.join("certs"), root.join("issuer"));
    let (out, issuer_dir) = (
        nodes.to_str().expect("utf-8").to_owned(),
        issuer.to_str().expect("utf-8").to_owned(),
    );
    let made = fn_certs(&[
        "--out",
        &out,
        "--issuer-dir",
        &issuer_dir,
        "--san",
        "fn-node",
    ]);
    assert!(made.status.success(), "{made:?}");
    let read = |f: &str| std::fs::read_to_string(issuer.join(f)).expect("issuer file");
    let ca = fn_tls::dev::DevCa::from_pem(&read("issuer.pem"), &read("issuer-key.pem"))
        .expect("the CA fn-certs wrote");
    (out, issuer_dir, ca)
}

/// Whether the files in `dir` make a set peers accept, valid for more than 300 days and for
/// `fn-node`: the key matches, and the certificate verifies under `ca.pem` as a client's.
fn serves_for_a_while(dir: &std::path::Path) -> bool {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, UnixTime};
    let read = |f: &str| std::fs::read(dir.join(f)).expect("file");
    let Ok(tls) = fn_tls::NodeTls::from_pem(read("node.pem"), read("node-key.pem"), read("ca.pem"))
    else {
        return false;
    };
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read("ca.pem")) {
        roots.add(ca.expect("a CA")).expect("usable CA");
    }
    let provider = std::sync::Arc::new(fn_tls::crypto_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .expect("verifier");
    let node = CertificateDer::from_pem_slice(&read("node.pem")).expect("node");
    let year = std::time::SystemTime::now() + std::time::Duration::from_secs(300 * 24 * 3600);
    verifier
        .verify_client_cert(&node, &[], UnixTime::now())
        .is_ok()
        && tls.not_after() > year
        && names(dir).iter().any(|n| n == "fn-node")
}

/// A node certificate and key, PEM encoded, made from the CA and another one.
type BadSet = fn(&fn_tls::dev::DevCa, &fn_tls::dev::DevCa) -> (String, String);

#[test]
fn keep_renews_a_node_certificate_peers_would_refuse_or_soon_will() {
    let other_ca = fn_tls::dev::DevCa::new("another CA").expect("ca");
    let cases: [(&str, BadSet); 4] = [
        ("expired", |ca, _| {
            let n = ca.expired_node(&["fn-node"]).expect("node");
            (n.cert_pem, n.key_pem)
        }),
        ("within 30 days", |ca, _| {
            let n = ca.node_expiring_in(&["fn-node"], 10).expect("node");
            (n.cert_pem, n.key_pem)
        }),
        ("does not match", |ca, _| {
            let (a, b) = (
                ca.node(&["fn-node"]).expect("a"),
                ca.node(&["fn-node"]).expect("b"),
            );
            (a.cert_pem, b.key_pem)
        }),
        ("not valid under the CA bundle", |_, other| {
            let n = other.node(&["fn-node"]).expect("node");
            (n.cert_pem, n.key_pem)
        }),
    ];
    for (why, bad) in cases {
        let root = tempfile::tempdir().expect("tempdir");
        let (out, issuer_dir, ca) = made_in(root.path());
        let nodes = root.path().join("certs");
        let bundle = std::fs::read(nodes.join("ca.pem")).expect("ca");
        let (cert, key) = bad(&ca, &other_ca);
        std::fs::write(nodes.join("node.pem"), cert).expect("write");
        std::fs::write(nodes.join("node-key.pem"), key).expect("write");
        assert!(!serves_for_a_while(&nodes), "{why}: the broken set serves");

        let kept = fn_certs(&["--out", &out, "--issuer-dir", &issuer_dir, "--keep"]);
        assert!(kept.status.success(), "{why}: {kept:?}");
        let said = String::from_utf8_lossy(&kept.stdout);
        assert!(
            said.contains("renewed") && said.contains(why),
            "{why}: {said}"
        );
        assert!(serves_for_a_while(&nodes), "{why}: not renewed");
        assert_eq!(
            std::fs::read(nodes.join("ca.pem")).expect("ca"),
            bundle,
            "{why}: same CA"
        );
    }
}

#[test]
fn keep_without_the_ca_key_refuses_a_certificate_it_cannot_renew() {
    let root = tempfile::tempdir().expect("tempdir");
    let (out, issuer_dir, ca) = made_in(root.path());
    let nodes = root.path().join("certs");
    let node = std::fs::read(nodes.join("node.pem")).expect("node");

    // A good one is kept as it is.
    let kept = fn_certs(&["--out", &out, "--issuer-dir", &issuer_dir, "--keep"]);
    assert!(
        String::from_utf8_lossy(&kept.stdout).contains("keeping"),
        "{kept:?}"
    );
    assert_eq!(std::fs::read(nodes.join("node.pem")).expect("node"), node);

    let expired = ca.expired_node(&["fn-node"]).expect("node");
    std::fs::write(nodes.join("node.pem"), &expired.cert_pem).expect("write");
    std::fs::write(nodes.join("node-key.pem"), &expired.key_pem).expect("write");
    std::fs::remove_dir_all(root.path().join("issuer")).expect("rm");
    let kept = fn_certs(&["--out", &out, "--issuer-dir", &issuer_dir, "--keep"]);
    assert!(!kept.status.success(), "kept an expired certificate");
    let said = String::from_utf8_lossy(&kept.stderr);
    for named in ["expired", "issuer-key.pem", "--force"] {
        assert!(said.contains(named), "{named}: {said}");
    }
    assert_eq!(
        std::fs::read_to_string(nodes.join("node.pem")).expect("node"),
        expired.cert_pem
    );
}

/// A node certificate peers still accept, but that ends within 30 days, with no CA key to
/// renew it (an operator's own, short-lived set): kept, with a warning, and the stack starts.
#[test]
fn keep_without_the_ca_key_keeps_a_certificate_that_ends_soon_and_warns() {
    let root = tempfile::tempdir().expect("tempdir");
    let (out, issuer_dir, ca) = made_in(root.path());
    let nodes = root.path().join("certs");
    let soon = ca.node_expiring_in(&["fn-node"], 10).expect("node");
    std::fs::write(nodes.join("node.pem"), &soon.cert_pem).expect("write");
    std::fs::write(nodes.join("node-key.pem"), &soon.key_pem).expect("write");
    std::fs::remove_dir_all(root.path().join("issuer")).expect("rm");
    let kept = fn_certs(&["--out", &out, "--issuer-dir", &issuer_dir, "--keep"]);
    assert!(kept.status.success(), "{kept:?}");
    let warned = String::from_utf8_lossy(&kept.stderr);
    assert!(
        warned.contains("warning") && warned.contains("within 30 days"),
        "{warned}"
    );
    assert_eq!(
        std::fs::read_to_string(nodes.join("node.pem")).expect("node"),
        soon.cert_pem
    );
}

/// The node files gone (their volume removed), the CA still there: `--keep` writes new node
/// files from it, so every daemon that trusts the CA still trusts the node.
#[test]
fn keep_writes_node_files_from_the_ca_when_they_are_gone() {
    let root = tempfile::tempdir().expect("tempdir");
    let (out, issuer_dir, _ca) = made_in(root.path());
    let nodes = root.path().join("certs");
    let bundle = std::fs::read(nodes.join("ca.pem")).expect("ca");
    for file in ["ca.pem", "node.pem", "node-key.pem"] {
        std::fs::remove_file(nodes.join(file)).expect("rm");
    }
    let kept = fn_certs(&[
        "--out",
        &out,
        "--issuer-dir",
        &issuer_dir,
        "--keep",
        "--san",
        "fn-node",
    ]);
    assert!(kept.status.success(), "{kept:?}");
    assert!(serves_for_a_while(&nodes), "no usable set written");
    assert_eq!(
        std::fs::read(nodes.join("ca.pem")).expect("ca"),
        bundle,
        "same CA"
    );
}
