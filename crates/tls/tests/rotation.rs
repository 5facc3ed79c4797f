//! Certificate rotation end to end: a real tonic server (the standard health service) on
//! loopback whose certificate files are replaced while it serves, with open channels kept
//! and new handshakes checked at every step.

use std::path::Path;
use std::time::{Duration, SystemTime};

mod common;
use common::{health, start_server};

use fn_tls::dev::{self, DevCa, RolloverStep, files};
use fn_tls::watch::CertWatch;
use fn_tls::{DirectChannel, NodeTls, Reloaded, TlsArgs, TlsMode};
use prometheus_client::registry::Registry;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Node material read from the PKI directory `dir`, as a daemon loads it.
fn from_files(dir: &Path) -> NodeTls {
    let args = TlsArgs {
        node_cert: Some(dir.join(files::NODE)),
        node_cert_key: Some(dir.join(files::NODE_KEY)),
        node_cert_authority: Some(dir.join(files::BUNDLE)),
        tls_server_name: None,
        insecure: false,
        tls_reload_interval: Duration::ZERO,
        tls_retire_grace: fn_tls::RETIRE_GRACE,
    };
    match args.load().expect("loads") {
        TlsMode::Mutual(tls) => tls,
        TlsMode::Insecure => panic!("mutual TLS expected"),
    }
}

/// A copy of the PKI in `dir` as it is now, kept in memory: a client that does not rotate.
fn snapshot(dir: &Path) -> NodeTls {
    let read = |name: &str| std::fs::read(dir.join(name)).expect("read");
    NodeTls::from_pem(
        read(files::NODE),
        read(files::NODE_KEY),
        read(files::BUNDLE),
    )
    .expect("material")
}

async fn channel(client: &NodeTls, address: &str) -> Result<Channel, String> {
    common::channel(&TlsMode::Mutual(client.clone()), address).await
}

/// A new connection from `client`, and one health check on it.
async fn check(client: &NodeTls, address: &str) -> Result<(), String> {
    common::check(&TlsMode::Mutual(client.clone()), address).await
}

/// The certificate the server at `address` presents in a new handshake.
async fn presented(client: &NodeTls, address: &str) -> Vec<u8> {
    fn_tls::peer_certificate(client, address)
        .await
        .expect("handshake")
}

fn der(pem: &[u8]) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem).expect("pem").to_vec()
}

#[tokio::test]
async fn a_rotated_certificate_is_used_for_new_connections_and_open_ones_keep_working() {
    let dir = tempfile::tempdir().expect("tempdir");
    dev::write_dev_pki(dir.path(), &[]).expect("pki");
    let server_tls = from_files(dir.path());
    let server = start_server(&server_tls).await;
    let client = snapshot(dir.path());
    let open = channel(&client, &server.address).await.expect("connects");
    health(open.clone()).await.expect("serves");
    let before = server_tls.cert_pem();
    assert_eq!(
        presented(&client, &server.address).await,
        der(&before),
        "the first certificate"
    );

    dev::rotate_node(dir.path(), &[]).expect("rotate");
    assert_eq!(server_tls.reload().expect("accepted"), Reloaded::Replaced);
    assert_eq!(server_tls.reload().expect("read"), Reloaded::Unchanged);
    let after = std::fs::read(dir.path().join(files::NODE)).expect("read");
    assert_ne!(after, before);
    assert_eq!(
        presented(&client, &server.address).await,
        der(&after),
        "a new handshake gets the new certificate"
    );
    health(open)
        .await
        .expect("the connection opened before still works");
    check(&client, &server.address)
        .await
        .expect("and new connections too");
}

#[tokio::test]
async fn a_ca_rollover_in_three_steps_fails_no_connection() {
    let (dir, server_tls, client_tls, server) = both_following().await;
    let old_ca = std::fs::read_to_string(dir.path().join(files::BUNDLE)).expect("ca");
    let open = channel(&client_tls, &server.address)
        .await
        .expect("connects");
    let old_only = snapshot(dir.path());
    let old_node = std::fs::read(dir.path().join(files::NODE)).expect("node");
    let old_node_key = std::fs::read(dir.path().join(files::NODE_KEY)).expect("key");

    for step in [
        RolloverStep::Begin,
        RolloverStep::Switch,
        RolloverStep::Finish,
    ] {
        dev::ca_rollover(dir.path(), step, &[]).expect("step");
        // The server reloads first, the client next; a call in between must work too.
        assert_eq!(
            server_tls.reload().expect("server"),
            Reloaded::Replaced,
            "{step:?}"
        );
        check(&client_tls, &server.address)
            .await
            .unwrap_or_else(|e| panic!("{step:?}, only the server reloaded: {e}"));
        assert_eq!(
            client_tls.reload().expect("client"),
            Reloaded::Replaced,
            "{step:?}"
        );
        check(&client_tls, &server.address)
            .await
            .unwrap_or_else(|e| panic!("{step:?}, both reloaded: {e}"));
        health(open.clone())
            .await
            .unwrap_or_else(|e| panic!("{step:?}: the connection opened before the rollover: {e}"));
    }

    let new_ca = std::fs::read_to_string(dir.path().join(files::BUNDLE)).expect("ca");
    assert_ne!(new_ca, old_ca);
    let issuer = DevCa::from_pem(
        &std::fs::read_to_string(dir.path().join(files::ISSUER)).expect("issuer"),
        &std::fs::read_to_string(dir.path().join(files::ISSUER_KEY)).expect("issuer key"),
    )
    .expect("the new CA signs");
    assert_eq!(issuer.cert_pem(), new_ca, "the new CA is the issuer now");
    // A client that trusts only the new CA connects.
    let new_only = issuer.node_tls(&[]).expect("node of the new CA");
    check(&new_only, &server.address)
        .await
        .expect("a client of the new CA");
    // One that trusts only the old CA refuses the server.
    let err = check(&old_only, &server.address)
        .await
        .expect_err("the old CA's client");
    assert!(err.contains("UnknownIssuer"), "{err}");
    // A certificate of the old CA is refused by the server, even from a client that trusts
    // the new CA (so that only the server can be the one refusing).
    let old_cert_new_ca =
        NodeTls::from_pem(old_node, old_node_key, new_ca.clone().into_bytes()).expect("material");
    let err = check(&old_cert_new_ca, &server.address)
        .await
        .expect_err("a certificate of the old CA, after the rollover");
    assert!(err.contains("UnknownCA"), "the server refuses it: {err}");
    let old_cert_new_trust = NodeTls::from_pem(
        std::fs::read(dir.path().join(files::NODE)).expect("node"),
        std::fs::read(dir.path().join(files::NODE_KEY)).expect("key"),
        old_ca.into_bytes(),
    )
    .expect("material");
    assert!(
        check(&old_cert_new_trust, &server.address).await.is_err(),
        "trusting the old CA alone, the server's new certificate is refused"
    );
    assert!(
        !dir.path().join(files::NEXT_ISSUER).exists(),
        "finish removes the next CA's files"
    );
}

#[tokio::test]
async fn a_bad_replacement_is_rejected_with_its_file_and_reason_and_the_old_set_stays() {
    let dir = tempfile::tempdir().expect("tempdir");
    dev::write_dev_pki(dir.path(), &[]).expect("pki");
    let server_tls = from_files(dir.path());
    let server = start_server(&server_tls).await;
    let client = snapshot(dir.path());
    let original = server_tls.cert_pem();
    let node = dir.path().join(files::NODE);
    let key = dir.path().join(files::NODE_KEY);
    let good_key = std::fs::read(&key).expect("key");
    let ca = DevCa::from_pem(
        &std::fs::read_to_string(dir.path().join(files::ISSUER)).expect("issuer"),
        &std::fs::read_to_string(dir.path().join(files::ISSUER_KEY)).expect("issuer key"),
    )
    .expect("ca");
    let other = DevCa::new("another CA").expect("other");

    let expired = ca.expired_node(&[]).expect("expired");
    let foreign = other.node(&[]).expect("foreign");
    let client_only = ca.client_only_node(&[]).expect("client only");
    let early = ca.node_valid_from(&[], 2).expect("not yet valid");
    /// What is written, which variable the error names, and a part of its reason.
    type Case<'a> = (&'a str, Vec<u8>, Vec<u8>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            "garbage key",
            original.clone(),
            b"garbage".to_vec(),
            "FN_NODE_CERT_KEY",
            "no usable PEM private key",
        ),
        (
            "a key that does not match",
            original.clone(),
            ca.node(&[]).expect("node").key_pem.into_bytes(),
            "FN_NODE_CERT_KEY",
            "does not match the certificate",
        ),
        (
            "garbage certificate",
            b"-----BEGIN CERTIFICATE-----\nnope\n".to_vec(),
            good_key.clone(),
            "FN_NODE_CERT",
            "FN_NODE_CERT",
        ),
        (
            "an expired certificate",
            expired.cert_pem.into_bytes(),
            expired.key_pem.into_bytes(),
            "FN_NODE_CERT",
            "expired at",
        ),
        (
            "a certificate from another CA",
            foreign.cert_pem.into_bytes(),
            foreign.key_pem.into_bytes(),
            "FN_NODE_CERT",
            "not valid under the CA bundle",
        ),
        (
            "a certificate no server may present (clientAuth only)",
            client_only.cert_pem.into_bytes(),
            client_only.key_pem.into_bytes(),
            "FN_NODE_CERT",
            "cannot serve as a server certificate",
        ),
        (
            "a certificate not valid yet (a clock ahead at the issuer)",
            early.cert_pem.into_bytes(),
            early.key_pem.into_bytes(),
            "FN_NODE_CERT",
            "clock",
        ),
    ];
    for (what, cert, new_key, var, reason) in cases {
        std::fs::write(&node, &cert).expect("write cert");
        std::fs::write(&key, &new_key).expect("write key");
        let err = server_tls.reload().expect_err(what).to_string();
        assert!(err.starts_with(var), "{what}: {err}");
        assert!(err.contains(reason), "{what}: {err}");
        let path = if var == "FN_NODE_CERT" { &node } else { &key };
        assert!(
            err.contains(&path.display().to_string()),
            "{what} names the file: {err}"
        );
        assert_eq!(server_tls.cert_pem(), original, "{what}: the old set stays");
        check(&client, &server.address)
            .await
            .unwrap_or_else(|e| panic!("{what}: still serving with the old set: {e}"));
        assert_eq!(presented(&client, &server.address).await, der(&original));
    }

    dev::rotate_node(dir.path(), &[]).expect("a good replacement");
    assert_eq!(server_tls.reload().expect("accepted"), Reloaded::Replaced);
    let good = std::fs::read(&node).expect("read");
    assert_eq!(presented(&client, &server.address).await, der(&good));
}

/// A node certificate ending in three days, from the dev CA whose files are in `dir`.
fn expiring_in_three_days(dir: &Path) -> dev::NodeCert {
    let ca = DevCa::from_pem(
        &std::fs::read_to_string(dir.join(files::ISSUER)).expect("issuer"),
        &std::fs::read_to_string(dir.join(files::ISSUER_KEY)).expect("issuer key"),
    )
    .expect("ca");
    ca.node_expiring_in(&[], 3).expect("node")
}

/// The scrape of `registry` once it holds `line` (asserted, within 5 s).
async fn scrape_once(registry: &Registry, line: &str) -> String {
    let mut text = String::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        text.clear();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
        if text.contains(line) {
            break;
        }
    }
    assert!(text.contains(line), "{line:?} not in\n{text}");
    text
}

#[tokio::test]
async fn the_watch_picks_up_a_replacement_and_moves_the_expiry_gauge() {
    let dir = tempfile::tempdir().expect("tempdir");
    dev::write_dev_pki(dir.path(), &[]).expect("pki");
    let tls = from_files(dir.path());
    let mut registry = Registry::default();
    let checks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&checks);
    let watch = CertWatch::new(tls.clone(), Duration::from_millis(100), None, &mut registry)
        .on_replaced(move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(watch.run(cancel.clone()));

    // A certificate ending in three days replaces the one-year certificate.
    let short = expiring_in_three_days(dir.path());
    std::fs::write(dir.path().join(files::NODE_KEY), &short.key_pem).expect("key");
    std::fs::write(dir.path().join(files::NODE), &short.cert_pem).expect("cert");
    let end = fn_tls::expiry::not_after(short.cert_pem.as_bytes()).expect("not after");

    let mut text = scrape_once(&registry, "fn_tls_certificate_reloads_total 1").await;
    assert!(
        text.contains("fn_tls_certificate_reload_rejections_total 0"),
        "{text}"
    );
    assert!(
        text.contains("fn_tls_certificate_files_rejected 0"),
        "{text}"
    );
    assert_eq!(tls.not_after(), end);
    assert_eq!(
        checks.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the daemon's own check ran after the reload"
    );
    let gauge: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("fn_tls_certificate_expiry_seconds "))
        .expect("the gauge")
        .parse()
        .expect("a number");
    let left = end
        .duration_since(std::time::SystemTime::now())
        .expect("in the future")
        .as_secs_f64();
    assert!(
        (gauge - left).abs() < 2.0,
        "the gauge follows the new certificate: {gauge} against {left}"
    );

    // A bad replacement is counted once, however many checks see it...
    std::fs::write(dir.path().join(files::NODE_KEY), "garbage").expect("key");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    text.clear();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(
        text.contains("fn_tls_certificate_reload_rejections_total 1"),
        "{text}"
    );
    // ... and shown for as long as it stays on disk, until the files are good again.
    assert!(
        text.lines()
            .any(|l| l == "fn_tls_certificate_files_rejected 1"),
        "{text}"
    );
    assert_eq!(tls.not_after(), end, "the good set stays");
    std::fs::write(dir.path().join(files::NODE_KEY), &short.key_pem).expect("key");
    let text = scrape_once(&registry, "fn_tls_certificate_files_rejected 0").await;
    assert!(
        text.contains("fn_tls_certificate_reloads_total 1"),
        "the files put back are the set in use: {text}"
    );

    cancel.cancel();
    task.await.expect("joins").expect("ends");
}

/// A rotation that deletes a file before it writes the new one is not a rejection: the
/// watch looks again before it counts (before, a check in between logged an error).
#[tokio::test]
async fn a_file_replaced_by_delete_then_create_is_not_a_rejection() {
    let dir = tempfile::tempdir().expect("tempdir");
    dev::write_dev_pki(dir.path(), &[]).expect("pki");
    let tls = from_files(dir.path());
    let mut registry = Registry::default();
    let watch = CertWatch::new(tls.clone(), Duration::from_millis(50), None, &mut registry);
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(watch.run(cancel.clone()));

    let short = expiring_in_three_days(dir.path());
    let end = fn_tls::expiry::not_after(short.cert_pem.as_bytes()).expect("not after");
    std::fs::remove_file(dir.path().join(files::NODE)).expect("delete");
    // Several checks see the certificate missing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(dir.path().join(files::NODE_KEY), &short.key_pem).expect("key");
    std::fs::write(dir.path().join(files::NODE), &short.cert_pem).expect("cert");

    let text = scrape_once(&registry, "fn_tls_certificate_reloads_total 1").await;
    assert!(
        text.contains("fn_tls_certificate_reload_rejections_total 0"),
        "{text}"
    );
    assert_eq!(tls.not_after(), end);
    cancel.cancel();
    task.await.expect("joins").expect("ends");
}

/// A rotation without `--san` keeps the names of the certificate it replaces (it issued
/// one for the defaults alone, which every peer dialling the node by name refused); a
/// file holding the key before the certificate loads.
#[test]
fn a_rotation_keeps_the_names_and_a_key_first_file_loads() {
    let names = |dir: &Path| {
        let pem = std::fs::read(dir.join(files::NODE)).expect("node");
        let der = CertificateDer::pem_slice_iter(&pem)
            .next()
            .expect("a certificate")
            .expect("parses");
        fn_tls::expiry::Validity::of(&der).expect("validity").names
    };
    let dir = tempfile::tempdir().expect("tempdir");
    dev::write_dev_pki(dir.path(), &["npm", "runner-1"]).expect("pki");
    let before = names(dir.path());
    assert!(before.contains(&"npm".to_owned()), "{before:?}");
    dev::rotate_node(dir.path(), &[]).expect("rotate");
    assert_eq!(names(dir.path()), before, "rotate without names");
    dev::ca_rollover(dir.path(), RolloverStep::Begin, &[]).expect("begin");
    dev::ca_rollover(dir.path(), RolloverStep::Switch, &[]).expect("switch");
    assert_eq!(names(dir.path()), before, "switch without names");
    dev::rotate_node(dir.path(), &["lb"]).expect("rotate with a name");
    assert!(names(dir.path()).contains(&"lb".to_owned()));
    assert!(
        !names(dir.path()).contains(&"npm".to_owned()),
        "the names given win"
    );

    // One file with the key first, then the certificate, as both FN_NODE_CERT and
    // FN_NODE_CERT_KEY.
    let combined = dir.path().join("combined.pem");
    let mut both = std::fs::read(dir.path().join(files::NODE_KEY)).expect("key");
    both.extend(std::fs::read(dir.path().join(files::NODE)).expect("cert"));
    std::fs::write(&combined, both).expect("write");
    let args = TlsArgs {
        node_cert: Some(combined.clone()),
        node_cert_key: Some(combined),
        node_cert_authority: Some(dir.path().join(files::BUNDLE)),
        tls_server_name: None,
        insecure: false,
        tls_reload_interval: Duration::ZERO,
        tls_retire_grace: fn_tls::RETIRE_GRACE,
    };
    assert!(
        matches!(args.load(), Ok(TlsMode::Mutual(_))),
        "a key-first file loads"
    );
}

/// A writer that renames the key into place, then the certificate a while later: the watch
/// that reads between the two takes one more look before it logs and counts a rejection
/// (a good rotation set off alerts on the rejection counter).
#[tokio::test(start_paused = true)]
async fn a_rotation_read_between_its_two_files_is_not_counted_as_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    dev::write_dev_pki(dir.path(), &[]).expect("pki");
    let tls = from_files(dir.path());
    let mut registry = Registry::default();
    let watch = CertWatch::new(tls.clone(), Duration::from_secs(1), None, &mut registry);
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(watch.run(cancel.clone()));
    let ca = DevCa::from_pem(
        &std::fs::read_to_string(dir.path().join(files::ISSUER)).expect("issuer"),
        &std::fs::read_to_string(dir.path().join(files::ISSUER_KEY)).expect("issuer key"),
    )
    .expect("ca");
    let next = ca.node(&[]).expect("node");

    // The key now; the watch looks at 1 s and reads at 1.5 s, before the certificate.
    std::fs::write(dir.path().join(files::NODE_KEY), &next.key_pem).expect("key");
    tokio::time::sleep(Duration::from_millis(1700)).await;
    std::fs::write(dir.path().join(files::NODE), &next.cert_pem).expect("cert");
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(
        text.contains("fn_tls_certificate_reload_rejections_total 0"),
        "{text}"
    );
    assert!(
        text.contains("fn_tls_certificate_reloads_total 1"),
        "{text}"
    );
    assert_eq!(tls.cert_pem(), next.cert_pem.into_bytes());
    cancel.cancel();
    task.await.expect("joins").expect("ends");
}

/// A [`DirectChannel`] from `client` to `address`.
fn direct_channel(client: &NodeTls, address: &str) -> DirectChannel {
    DirectChannel::new(
        &TlsMode::Mutual(client.clone()),
        address,
        Duration::from_secs(5),
    )
    .expect("address")
}

/// Waits (at most 10 s) until `server_tls` holds one connection, and no retired one.
async fn the_old_connection_closes(server_tls: &NodeTls) {
    let start = std::time::Instant::now();
    loop {
        let seen = server_tls.recheck_connections(SystemTime::now(), Duration::from_secs(600));
        if seen.open == 1 && seen.next_close.is_none() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the old connection, idle, is still open: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A new PKI in a temporary directory, and a server and a client that both follow its
/// files, as two daemons sharing the volume; the server serving.
async fn both_following() -> (tempfile::TempDir, NodeTls, NodeTls, common::Server) {
    let dir = tempfile::tempdir().expect("tempdir");
    dev::write_dev_pki(dir.path(), &[]).expect("pki");
    let server_tls = from_files(dir.path());
    let client_tls = from_files(dir.path());
    let server = start_server(&server_tls).await;
    (dir, server_tls, client_tls, server)
}

/// A server that follows the files of a new PKI, and a client that keeps the PKI's first
/// certificates (one that does not follow a rollover), with a tonic channel to the server.
struct LeftBehind {
    dir: tempfile::TempDir,
    server_tls: NodeTls,
    left_behind: NodeTls,
    server: common::Server,
    open: Channel,
}

impl LeftBehind {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        dev::write_dev_pki(dir.path(), &[]).expect("pki");
        let server_tls = from_files(dir.path());
        let left_behind = snapshot(dir.path());
        let server = start_server(&server_tls).await;
        let open = channel(&left_behind, &server.address)
            .await
            .expect("connects");
        LeftBehind {
            dir,
            server_tls,
            left_behind,
            server,
            open,
        }
    }
}

/// Runs the three steps of a CA rollover in `dir`, `after` each.
fn roll_over(dir: &Path, after: impl Fn(RolloverStep)) {
    for step in [
        RolloverStep::Begin,
        RolloverStep::Switch,
        RolloverStep::Finish,
    ] {
        dev::ca_rollover(dir, step, &[]).expect("step");
        after(step);
    }
}

/// The connections of a CA rollover's client that did not follow it (its certificate is
/// the old CA's): once the server trusts the new CA alone, a check retires them; the calls
/// on them go on during the grace, new calls on them are refused at once (before, they
/// were served for the whole grace), and the next check after it closes them at the
/// socket, so neither a tonic channel nor a [`DirectChannel`] on them carries another call
/// (before, both did until a restart).
#[tokio::test]
async fn connections_whose_peer_no_longer_verifies_are_retired_then_closed() {
    let LeftBehind {
        dir,
        server_tls,
        left_behind,
        server,
        open,
    } = LeftBehind::start().await;
    let direct = direct_channel(&left_behind, &server.address);
    common::direct_health(&direct).await.expect("direct call");
    health(open.clone()).await.expect("tonic call");
    // A call in flight across the retirement: a watch of the server's health.
    let mut watch = HealthClient::new(open.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("a watch")
        .into_inner();
    let first = watch.message().await.expect("the watch runs");
    assert_eq!(first.map(|m| m.status), Some(ServingStatus::Serving as i32));
    let now = SystemTime::now();
    let kept = server_tls.recheck_connections(now, Duration::ZERO);
    assert_eq!(
        (kept.open, kept.retired, kept.closed),
        (2, 0, 0),
        "{kept:?}"
    );

    roll_over(dir.path(), |_| {
        assert_eq!(server_tls.reload().expect("server"), Reloaded::Replaced);
    });
    let grace = Duration::from_millis(200);
    let retired = server_tls.recheck_connections(SystemTime::now(), grace);
    assert_eq!(
        (retired.open, retired.retired, retired.closed),
        (2, 2, 0),
        "{retired:?}"
    );
    let refused = health(open.clone())
        .await
        .expect_err("a retired connection takes no new call");
    assert!(
        refused.contains("Unavailable") && refused.contains("no longer trusts"),
        "{refused}"
    );
    let refused = common::direct_health(&direct)
        .await
        .expect_err("nor a new call of the DirectChannel");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("no longer trusts"),
        "{refused:?}"
    );
    // The call in flight goes on for the grace.
    server
        .reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the watch is answered")
        .expect("the call in flight goes on");
    assert_eq!(
        next.map(|m| m.status),
        Some(ServingStatus::NotServing as i32)
    );

    tokio::time::sleep(grace).await;
    let closed = server_tls.recheck_connections(SystemTime::now(), grace);
    assert_eq!(closed.closed, 2, "{closed:?}");
    let refused = health(open)
        .await
        .expect_err("the tonic channel's connection is closed");
    assert!(refused.contains("rpc"), "{refused}");
    let refused = common::direct_health(&direct)
        .await
        .expect_err("the DirectChannel's connection is closed");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let left = server_tls.recheck_connections(SystemTime::now(), Duration::ZERO);
    assert_eq!(
        left.open, 0,
        "no connection of the old CA's client is left: {left:?}"
    );
}

/// With no grace (`FN_TLS_RETIRE_GRACE=0s`) a retired connection is closed by the check
/// that retires it (before: at the next check, up to a minute later, serving calls meanwhile).
#[tokio::test]
async fn with_no_grace_a_retired_connection_is_closed_at_once() {
    let LeftBehind {
        dir,
        server_tls,
        left_behind: _left_behind,
        server: _server,
        open,
    } = LeftBehind::start().await;
    health(open.clone()).await.expect("tonic call");
    roll_over(dir.path(), |_| {
        assert_eq!(server_tls.reload().expect("server"), Reloaded::Replaced);
    });
    let retired = server_tls.recheck_connections(SystemTime::now(), Duration::ZERO);
    assert_eq!(
        (
            retired.open,
            retired.retired,
            retired.closed,
            retired.next_close
        ),
        (1, 1, 1, None),
        "{retired:?}"
    );
    health(open)
        .await
        .expect_err("the retired connection is closed");
}

/// A client whose CA bundle no longer holds its server's issuer retires the connection; a
/// [`DirectChannel`] then puts the next call on a new connection (new certificates at both
/// ends), and the retired one, idle, closes on its own long before its grace ends (before,
/// the channel kept calling on it).
#[tokio::test]
async fn a_direct_channel_moves_off_a_retired_connection_at_once() {
    moves_off_a_retired_connection(false).await;
}

/// The same when the channel connected between the server's switch to the new CA and its
/// own: the server's certificate on it verifies to the end, but the one the client
/// presented does not, so the server retires the connection, and the client, which trusts
/// the same bundle, moves off it without waiting to be cut off.
#[tokio::test]
async fn a_direct_channel_moves_off_a_connection_where_its_own_certificate_is_no_longer_trusted() {
    moves_off_a_retired_connection(true).await;
}

async fn moves_off_a_retired_connection(connect_after_the_servers_switch: bool) {
    let (dir, server_tls, client_tls, server) = both_following().await;
    let direct = direct_channel(&client_tls, &server.address);
    if !connect_after_the_servers_switch {
        common::direct_health(&direct).await.expect("first call");
    }
    for step in [
        RolloverStep::Begin,
        RolloverStep::Switch,
        RolloverStep::Finish,
    ] {
        dev::ca_rollover(dir.path(), step, &[]).expect("step");
        assert_eq!(server_tls.reload().expect("server"), Reloaded::Replaced);
        if connect_after_the_servers_switch && step == RolloverStep::Switch {
            common::direct_health(&direct).await.expect("first call");
        }
        assert_eq!(client_tls.reload().expect("client"), Reloaded::Replaced);
    }
    let grace = Duration::from_secs(600);
    let retired = client_tls.recheck_connections(SystemTime::now(), grace);
    assert_eq!((retired.open, retired.retired), (1, 1), "{retired:?}");
    common::direct_health(&direct)
        .await
        .expect("the next call goes on a new connection");
    // The server sees the new connection, and no retired one for long: the channel
    // dropped the old one, and hyper closes a connection no one holds once it is idle.
    the_old_connection_closes(&server_tls).await;
    common::direct_health(&direct)
        .await
        .expect("calls go on on the new connection");
}

/// A connection a [`DirectChannel`] dialled takes no new calls, though still trusted, once
/// the certificate it presented is replaced (a rotation): the next call goes on a new
/// connection with the new certificate, and the old one, idle, closes on its own; nothing
/// is closed by force. So when a rollover's last step removes the old CA, no connection
/// that carries its certificates is left to cut.
#[tokio::test]
async fn a_direct_channel_moves_to_a_new_connection_after_its_own_certificate_is_rotated() {
    let (dir, server_tls, client_tls, server) = both_following().await;
    let direct = direct_channel(&client_tls, &server.address);
    common::direct_health(&direct).await.expect("first call");
    let grace = Duration::from_secs(600);
    let unchanged = client_tls.recheck_connections(SystemTime::now(), grace);
    assert_eq!((unchanged.open, unchanged.moved), (1, 0), "{unchanged:?}");

    dev::rotate_node(dir.path(), &[]).expect("rotate");
    assert_eq!(client_tls.reload().expect("client"), Reloaded::Replaced);
    let moved = client_tls.recheck_connections(SystemTime::now(), grace);
    assert_eq!(
        (moved.open, moved.moved, moved.retired, moved.next_close),
        (1, 1, 0, None),
        "{moved:?}"
    );
    common::direct_health(&direct)
        .await
        .expect("the next call goes on a new connection");
    the_old_connection_closes(&server_tls).await;
    // The new connection presents the new certificate: nothing more to move.
    let settled = client_tls.recheck_connections(SystemTime::now(), grace);
    assert_eq!((settled.open, settled.moved), (1, 0), "{settled:?}");
}

/// A client whose own certificate is rotated to one its server does not trust yet (it ran
/// a CA rollover's first two steps before the server ran the first) moves its calls off its
/// connection, but when the new connection is refused it goes on calling on the old one,
/// which the server still accepts (before, every call failed with the server's UnknownCA).
#[tokio::test]
async fn a_direct_channel_keeps_a_moved_connection_when_no_new_one_can_be_had() {
    let server_dir = tempfile::tempdir().expect("tempdir");
    dev::write_dev_pki(server_dir.path(), &[]).expect("pki");
    let client_dir = tempfile::tempdir().expect("tempdir");
    for file in [
        files::NODE,
        files::NODE_KEY,
        files::BUNDLE,
        files::ISSUER,
        files::ISSUER_KEY,
    ] {
        std::fs::copy(server_dir.path().join(file), client_dir.path().join(file)).expect("copy");
    }
    let server_tls = from_files(server_dir.path());
    let client_tls = from_files(client_dir.path());
    let server = start_server(&server_tls).await;
    let direct = direct_channel(&client_tls, &server.address);
    common::direct_health(&direct).await.expect("first call");
    for step in [RolloverStep::Begin, RolloverStep::Switch] {
        dev::ca_rollover(client_dir.path(), step, &[]).expect("step");
        assert_eq!(client_tls.reload().expect("client"), Reloaded::Replaced);
    }
    let grace = Duration::from_secs(600);
    let moved = client_tls.recheck_connections(SystemTime::now(), grace);
    assert_eq!((moved.moved, moved.retired), (1, 0), "{moved:?}");
    assert!(
        check(&client_tls, &server.address).await.is_err(),
        "the server refuses a new connection with the client's new certificate"
    );
    for call in 0..3 {
        common::direct_health(&direct)
            .await
            .unwrap_or_else(|e| panic!("call {call} goes on the old connection: {e:?}"));
    }
    let open = server_tls.recheck_connections(SystemTime::now(), grace);
    assert_eq!(open.open, 1, "the old connection, still in use: {open:?}");
}

/// A connection retired because its server is no longer trusted is not kept when no new
/// connection can be had: calls fail, saying why, rather than go to an untrusted peer.
#[tokio::test]
async fn a_direct_channel_does_not_keep_a_retired_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    dev::write_dev_pki(dir.path(), &[]).expect("pki");
    let server_tls = snapshot(dir.path());
    let client_tls = from_files(dir.path());
    let server = start_server(&server_tls).await;
    let direct = direct_channel(&client_tls, &server.address);
    common::direct_health(&direct).await.expect("first call");
    roll_over(dir.path(), |_| {
        assert_eq!(client_tls.reload().expect("client"), Reloaded::Replaced);
    });
    let retired = client_tls.recheck_connections(SystemTime::now(), Duration::from_secs(600));
    assert_eq!(retired.retired, 1, "{retired:?}");
    let refused = common::direct_health(&direct)
        .await
        .expect_err("no call goes to a server no longer trusted");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("cannot connect"), "{refused:?}");
}

/// A server whose certificate ends in two days, serving, and a client of its CA; and when
/// the server's certificate ends.
async fn short_lived_server() -> (NodeTls, NodeTls, common::Server, SystemTime) {
    let ca = DevCa::new("ca").expect("ca");
    let server_tls = ca
        .tls_for(&ca.node_expiring_in(&["localhost"], 2).expect("short"))
        .expect("server");
    let client_tls = ca.node_tls(&[]).expect("client");
    let server = start_server(&server_tls).await;
    let end = fn_tls::expiry::not_after(server_tls.cert_pem().as_slice()).expect("not after");
    (server_tls, client_tls, server, end)
}

/// A dialled connection whose server's certificate ends within `RENEW_AHEAD` takes no new
/// calls (a new connection finds the renewed one), long before the end would close it.
#[tokio::test]
async fn a_dialled_connection_whose_servers_certificate_ends_soon_takes_no_new_calls() {
    let (_server_tls, client_tls, server, end) = short_lived_server().await;
    let direct = direct_channel(&client_tls, &server.address);
    common::direct_health(&direct).await.expect("call");
    let grace = Duration::from_secs(600);
    let early = end - fn_tls::RENEW_AHEAD - Duration::from_secs(60);
    let kept = client_tls.recheck_connections(early, grace);
    assert_eq!((kept.open, kept.moved), (1, 0), "{kept:?}");
    let late = end - fn_tls::RENEW_AHEAD + Duration::from_secs(60);
    let moved = client_tls.recheck_connections(late, grace);
    assert_eq!(
        (moved.moved, moved.retired, moved.next_close),
        (1, 0, None),
        "{moved:?}"
    );
}

/// A server whose certificates live an hour (renewed at half their life): a dialled
/// connection moves off only in the last third of the certificate's life, not at every
/// check (before: always within `RENEW_AHEAD`, so a new connection each minute, for ever).
#[tokio::test]
async fn a_short_lived_servers_connection_moves_off_only_in_the_last_third_of_its_life() {
    let ca = DevCa::new("ca").expect("ca");
    let cert = ca
        .node_valid_around_now(
            &["localhost"],
            Duration::from_secs(10 * 60),
            Duration::from_secs(50 * 60),
        )
        .expect("an hour-long certificate");
    let server_tls = ca.tls_for(&cert).expect("server");
    let client_tls = ca.node_tls(&[]).expect("client");
    let server = start_server(&server_tls).await;
    let end = fn_tls::expiry::not_after(server_tls.cert_pem().as_slice()).expect("not after");
    let direct = direct_channel(&client_tls, &server.address);
    common::direct_health(&direct).await.expect("call");
    let grace = Duration::from_secs(600);
    let kept = client_tls.recheck_connections(SystemTime::now(), grace);
    assert_eq!((kept.open, kept.moved), (1, 0), "{kept:?}");
    let late = end - Duration::from_secs(19 * 60);
    let moved = client_tls.recheck_connections(late, grace);
    assert_eq!((moved.moved, moved.retired), (1, 0), "{moved:?}");
}

/// A tonic channel does not move its calls off a retired connection (a [`DirectChannel`]
/// does): the connection dialled for it is shut down `CONTROL_GRACE` (2 s) after its
/// server no longer verifies, not after the grace, and the channel dials again for its next
/// call rather than go on calling a server no longer trusted. The DirectChannel's
/// connection keeps the grace for the calls on it.
#[tokio::test]
async fn a_tonic_channels_connection_is_closed_soon_after_its_server_no_longer_verifies() {
    let (server_tls, client_tls, server, end) = short_lived_server().await;
    let open = channel(&client_tls, &server.address)
        .await
        .expect("connects");
    health(open.clone()).await.expect("tonic call");
    let direct = direct_channel(&client_tls, &server.address);
    common::direct_health(&direct).await.expect("direct call");
    let grace = Duration::from_secs(600);
    let now = SystemTime::now();
    let both = server_tls.recheck_connections(now, grace);
    assert_eq!(both.open, 2, "{both:?}");

    // Checked as of after the server's certificate ends.
    let expired = end + Duration::from_secs(60);
    let retired = client_tls.recheck_connections(expired, grace);
    assert_eq!(
        (retired.open, retired.retired, retired.closed),
        (2, 2, 0),
        "{retired:?}"
    );
    let soon = retired.next_close.expect("a close is due");
    assert!(
        soon <= tokio::time::Instant::now() + fn_tls::CONTROL_GRACE,
        "{retired:?}"
    );
    tokio::time::sleep_until(soon).await;
    let closed = client_tls.recheck_connections(expired, grace);
    assert_eq!((closed.open, closed.closed), (2, 1), "{closed:?}");
    assert!(
        closed.next_close.is_some(),
        "the DirectChannel's grace: {closed:?}"
    );
    let start = std::time::Instant::now();
    while server_tls.recheck_connections(now, grace).open != 1 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the tonic channel's connection is still open at the server"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // At the real time the server verifies: the channel's next call dials again.
    health(open).await.expect("a new connection");
    assert_eq!(server_tls.recheck_connections(now, grace).open, 2);
}

/// An open connection is checked at the time of the check: its peer's certificate expired,
/// it is retired; the clock back (a time of day put right), it is kept.
#[tokio::test]
async fn a_connection_whose_peer_certificate_expires_is_retired() {
    let ca = DevCa::new("ca").expect("ca");
    let server_tls = ca.node_tls(&[]).expect("server");
    let client_tls = ca
        .tls_for(&ca.node_expiring_in(&[], 2).expect("short"))
        .expect("client");
    let server = start_server(&server_tls).await;
    let open = channel(&client_tls, &server.address)
        .await
        .expect("connects");
    health(open.clone()).await.expect("call");
    let now = SystemTime::now();
    let grace = Duration::from_secs(600);
    let today = server_tls.recheck_connections(now, grace);
    assert_eq!((today.open, today.retired), (1, 0), "{today:?}");
    let in_three_days = now + Duration::from_secs(3 * 86_400);
    let later = server_tls.recheck_connections(in_three_days, grace);
    assert_eq!((later.retired, later.closed), (1, 0), "{later:?}");
    assert!(later.next_close.is_some(), "{later:?}");
    let back = server_tls.recheck_connections(now, grace);
    assert_eq!(
        (back.restored, back.retired, back.next_close),
        (1, 0, None),
        "{back:?}"
    );
    health(open).await.expect("the kept connection serves");
}

/// A clock stepped back past the start of a certificate the peer presented (an NTP step, a
/// VM resumed) does not retire a connection whose peer verified at its handshake: the check
/// verifies at no earlier time than that. fn-certs' certificates start a day before they are
/// made, so three days back is before this one's start.
#[tokio::test]
async fn a_clock_stepped_back_before_the_peers_certificate_keeps_its_connection() {
    let ca = DevCa::new("ca").expect("ca");
    let server_tls = ca.node_tls(&[]).expect("server");
    let client_tls = ca.node_tls(&[]).expect("client");
    let server = start_server(&server_tls).await;
    let open = channel(&client_tls, &server.address)
        .await
        .expect("connects");
    health(open.clone()).await.expect("call");
    let three_days_back = SystemTime::now() - Duration::from_secs(3 * 86_400);
    let grace = Duration::from_secs(600);
    for (side, tls) in [("server", &server_tls), ("client", &client_tls)] {
        let back = tls.recheck_connections(three_days_back, grace);
        assert_eq!((back.open, back.retired), (1, 0), "{side}: {back:?}");
    }
    health(open).await.expect("the connection still serves");
}

/// The watch checks the open connections after it puts a new set in use, and closes a
/// retired one when its grace ends, without another reload; the metric counts it.
#[tokio::test]
async fn the_watch_retires_and_closes_what_a_new_ca_bundle_no_longer_trusts() {
    let LeftBehind {
        dir,
        server_tls,
        server: _server,
        open,
        ..
    } = LeftBehind::start().await;
    health(open.clone()).await.expect("call");
    let (registry, cancel, task) = watch_retiring_after(&server_tls, Duration::from_millis(300));

    roll_over(dir.path(), |_| {});
    let start = std::time::Instant::now();
    while health(open.clone()).await.is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the connection of a client the server no longer trusts still carries calls"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(
        text.contains("fn_tls_connections_retired_total 1"),
        "{text}"
    );
    cancel.cancel();
    task.await.expect("joins").expect("ends");
}

/// A FIFO put in place of the node certificate (opened as before, a read blocked until some
/// writer came, and the watch with it, for ever) is refused at once as not a regular file:
/// the watch keeps closing retired connections at the end of their grace, the rejection is
/// counted and shown, and a good file put back is picked up.
#[tokio::test]
async fn a_fifo_in_place_of_the_certificate_is_refused_and_the_watch_goes_on() {
    let LeftBehind {
        dir,
        server_tls,
        server: _server,
        open,
        ..
    } = LeftBehind::start().await;
    // A call in flight across the retirement: it ends when its connection is closed.
    let mut in_flight = HealthClient::new(open)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("a watch")
        .into_inner();
    in_flight.message().await.expect("the watch runs");
    let (registry, cancel, task) = watch_retiring_after(&server_tls, Duration::from_secs(2));

    roll_over(dir.path(), |_| {});
    scrape_once(&registry, "fn_tls_connections_retired_total 1").await;
    let node = dir.path().join(files::NODE);
    let good = std::fs::read(&node).expect("node certificate");
    std::fs::remove_file(&node).expect("remove");
    nix::unistd::mkfifo(
        &node,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .expect("mkfifo");

    // Closed at the end of the grace (2 s), well before a hung read's bound (10 s).
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = in_flight.message().await {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the retired connection was not closed at the end of its grace"
    );
    let text = scrape_once(&registry, "fn_tls_certificate_files_rejected 1").await;
    assert!(
        text.contains("fn_tls_certificate_reload_rejections_total 1"),
        "{text}"
    );
    let refused = server_tls
        .changed_on_disk()
        .expect_err("a FIFO is no certificate")
        .to_string();
    assert!(
        refused.contains("FN_NODE_CERT") && refused.contains("not a regular file (a FIFO)"),
        "{refused}"
    );

    std::fs::remove_file(&node).expect("remove the FIFO");
    std::fs::write(&node, &good).expect("put the certificate back");
    scrape_once(&registry, "fn_tls_certificate_files_rejected 0").await;
    cancel.cancel();
    task.await.expect("joins").expect("ends");
}

/// A certificate watch of `tls` that checks every 100 ms and retires a connection whose
/// peer no longer verifies after `grace`, running: its metrics, what stops it, its task.
fn watch_retiring_after(
    tls: &NodeTls,
    grace: Duration,
) -> (
    Registry,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<Result<(), std::convert::Infallible>>,
) {
    let mut registry = Registry::default();
    let watch = CertWatch::new(tls.clone(), Duration::from_millis(100), None, &mut registry)
        .retire_grace(grace);
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(watch.run(cancel.clone()));
    (registry, cancel, task)
}
