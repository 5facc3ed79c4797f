//! A SIGHUP that comes while a writer is between its files: the files are read again after
//! the settling time before the set is rejected, as a periodic check does. A binary of its
//! own, because the signal goes to the whole test process.

use std::time::Duration;

use fn_tls::dev::{self, DevCa, files};
use fn_tls::watch::CertWatch;
use fn_tls::{TlsArgs, TlsMode};
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};

/// With `FN_TLS_RELOAD_INTERVAL=0s` (SIGHUP alone), a SIGHUP sent when the new key is
/// written and its certificate not yet: before, the set was rejected (logged and counted,
/// the files shown as rejected) and nothing read them again until the next SIGHUP.
#[tokio::test]
async fn a_sighup_between_a_writers_two_files_puts_the_new_set_in_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    dev::write_dev_pki(dir.path(), &[]).expect("pki");
    let args = TlsArgs {
        node_cert: Some(dir.path().join(files::NODE)),
        node_cert_key: Some(dir.path().join(files::NODE_KEY)),
        node_cert_authority: Some(dir.path().join(files::BUNDLE)),
        tls_server_name: None,
        insecure: false,
        tls_reload_interval: Duration::ZERO,
        tls_retire_grace: fn_tls::RETIRE_GRACE,
    };
    let TlsMode::Mutual(tls) = args.load().expect("loads") else {
        panic!("mutual TLS expected");
    };
    let mut registry = Registry::default();
    let hangups = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let watch = CertWatch::new(tls.clone(), Duration::ZERO, Some(hangups), &mut registry);
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(watch.run(cancel.clone()));
    let ca = DevCa::from_pem(
        &std::fs::read_to_string(dir.path().join(files::ISSUER)).expect("issuer"),
        &std::fs::read_to_string(dir.path().join(files::ISSUER_KEY)).expect("issuer key"),
    )
    .expect("ca");
    let next = ca.node(&[]).expect("node");

    // The key now, the SIGHUP, and the certificate 150 ms later (within the 500 ms settle).
    std::fs::write(dir.path().join(files::NODE_KEY), &next.key_pem).expect("key");
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).expect("raise");
    tokio::time::sleep(Duration::from_millis(150)).await;
    std::fs::write(dir.path().join(files::NODE), &next.cert_pem).expect("cert");

    let mut text = String::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        text.clear();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        if text.contains("fn_tls_certificate_reloads_total 1") {
            break;
        }
    }
    assert!(
        text.contains("fn_tls_certificate_reloads_total 1"),
        "the new set is not in use:\n{text}"
    );
    assert!(
        text.contains("fn_tls_certificate_reload_rejections_total 0"),
        "{text}"
    );
    assert!(
        text.contains("fn_tls_certificate_files_rejected 0"),
        "{text}"
    );
    assert_eq!(tls.cert_pem(), next.cert_pem.into_bytes());
    cancel.cancel();
    task.await.expect("joins").expect("ends");
}
