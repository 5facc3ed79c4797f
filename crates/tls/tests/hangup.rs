//! SIGHUP in a daemon without TLS: nothing to reload, and not a reason to exit. A binary of
//! its own, because the signal goes to the whole test process.

use std::time::Duration;

use fn_tls::watch::CertWatch;
use fn_tls::{TlsArgs, TlsMode};
use prometheus_client::registry::Registry;

#[tokio::test]
async fn sighup_without_tls_leaves_the_process_running() {
    let args = TlsArgs {
        node_cert: None,
        node_cert_key: None,
        node_cert_authority: None,
        tls_server_name: None,
        insecure: true,
        tls_reload_interval: Duration::ZERO,
        tls_retire_grace: fn_tls::RETIRE_GRACE,
    };
    let mode = args.load().expect("insecure mode loads");
    assert!(matches!(mode, TlsMode::Insecure));
    let watch = CertWatch::for_mode(&mode, &args, &mut Registry::default()).expect("installed");
    assert!(watch.is_none(), "no TLS, no watch");
    // Before, SIGHUP's default action ended the process here: the test binary died of the
    // signal, and the run reported it failed.
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).expect("raise");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
